"""Messages a node read from the aggregator while it had no slot for them, kept in arrival order.

A node keeps reading while every slot is taken, so sectors of frames already in flight (which may sit
behind new frames in the stream) can still complete them. What cannot be placed yet waits here, bounded by
``limit``; a control message (a scan's end, the next scan) must not overtake the sectors before it, so it
waits too, and so does everything after it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from streaming.protocol import control as p


class HoldQueue:
    """Held [kind, parts] messages, replayed in order."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque = deque()
        self.controls = 0  # control messages waiting (each blocks everything after it)

    def __len__(self) -> int:
        return len(self._items)

    def has_room(self) -> bool:
        """May another message be held?"""
        return len(self._items) < self.limit

    def must_hold(self, kind: bytes) -> bool:
        """True when a newly read message has to wait behind what is held."""
        return bool(self.controls) or (bool(self._items) and kind != p.DATA)

    def hold(self, kind: bytes, parts: list) -> None:
        """Keep a message for later."""
        self._items.append((kind, parts))
        self.controls += kind != p.DATA

    def replay(self, place: Callable[[list], bool], control: Callable[[bytes, list], None]) -> None:
        """Place held sectors that now fit (``place`` returns False when one still does not), and run held
        control messages once nothing before them waits."""
        waiting: deque = deque()
        blocked = False
        while self._items:
            kind, parts = self._items.popleft()
            if kind != p.DATA:
                if blocked:
                    waiting.append((kind, parts))
                    continue
                self.controls -= 1
                control(kind, parts)
            elif not place(parts):
                blocked = True
                waiting.append((kind, parts))
        self._items = waiting
