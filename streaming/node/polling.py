"""The node loop's poller: groups of sockets and pipes (the data connections, the writer, the counting
workers' pipes), each replaced as a whole when what it depends on changes (a restarted worker has a new
pipe, a new writer address a new socket, a full node stops reading)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq


class LoopPoller:
    """One zmq.Poller over named groups; a group is registered again only when its key changes."""

    def __init__(self) -> None:
        self._poller = zmq.Poller()
        self._keys: dict[str, object] = {}
        self._groups: dict[str, list[Any]] = {}

    def watch(self, group: str, key: object, members: Callable[[], list[Any]]) -> None:
        """Poll ``members()`` as ``group`` for as long as ``key`` stays equal (asked only when it changes)."""
        if group in self._keys and self._keys[group] == key:
            return
        for member in self._groups.get(group, []):
            self._poller.unregister(member)
        items = [m for m in members() if m is not None]
        for member in items:
            self._poller.register(member, zmq.POLLIN)
        self._keys[group], self._groups[group] = key, items

    def members(self, group: str) -> list[Any]:
        """What ``group`` polls now."""
        return self._groups.get(group, [])

    def poll(self, timeout_ms: int) -> dict[Any, int]:
        """Wait up to timeout_ms for any member; the ready ones."""
        return dict(self._poller.poll(timeout_ms))
