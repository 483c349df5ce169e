"""The recorder's pending file as a journal: every entry is appended (and fsynced) when it is queued, and a
``done`` line follows once the database has it, so a session killed at any moment leaves the entries not
yet recorded on disk, for ``stemstream scans rebuild`` to replay.

Format (JSON Lines): ``{"seq": n, "kind": ..., "data": {...}}`` per entry, ``{"done": n}`` per recorded
entry. A pending file of the earlier format (one JSON list of ``{"kind", "data"}``) is still read. A last
line cut short by a crash is ignored (its entry was never acknowledged to the caller)."""

from __future__ import annotations

import contextlib
import json
import os
import threading
from pathlib import Path

from counting.storage.durable import fsync_directory


class PendingJournal:
    """An append-only pending file, created on the first entry under a name no other file has."""

    def __init__(self, path: Path) -> None:
        self.wanted = path
        self.path: Path | None = None  # once created
        self._fd: int | None = None
        self._lock = threading.Lock()  # entries come from the callers, done lines from the recorder thread

    def append(self, seq: int, kind: str, data: dict) -> None:
        """Add an entry, durable (file fsynced) before this returns; OSError if it cannot be written."""
        line = json.dumps({"seq": seq, "kind": kind, "data": data}, default=str)
        self._write(line, sync=True)

    def done(self, seq: int) -> None:
        """Note that an entry was recorded (not fsynced: replaying a recorded entry is harmless)."""
        with contextlib.suppress(OSError):  # then it is replayed once more, which changes nothing
            self._write(json.dumps({"done": seq}), sync=False, create=False)

    def close(self) -> None:
        """Close the file (it stays where it is)."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def retire(self) -> Path | None:
        """Everything in it was recorded: rename it out of the pending files' way (never deleted)."""
        self.close()
        if self.path is None or not self.path.exists():
            return None
        return mark_replayed(self.path)

    def _write(self, line: str, sync: bool, create: bool = True) -> None:
        with self._lock:
            if self._fd is None:
                if not create:  # closed: the file no longer takes lines
                    return
                self._create()
            os.write(self._fd, (line + "\n").encode())  # one write on an O_APPEND file: whole lines
            if sync:
                os.fsync(self._fd)

    def _create(self) -> None:
        """O_EXCL under the wanted name or the next free numbered one: never replaces an earlier file."""
        self.wanted.parent.mkdir(parents=True, exist_ok=True)
        k = 0
        while True:
            path = self.wanted if k == 0 else self.wanted.with_name(f"{self.wanted.stem}-{k}.json")
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
            except FileExistsError:
                k += 1
                continue
            break
        fsync_directory(path.parent)  # the new name survives a crash too
        self._fd, self.path = fd, path


def read_pending(path: Path) -> list[tuple[str, dict]]:
    """The entries of a pending file not yet recorded, in order (either format)."""
    text = Path(path).read_text()
    if text.lstrip().startswith("["):  # the earlier format: the whole list written at close
        return [(op["kind"], op["data"]) for op in json.loads(text)]
    entries: dict[int, tuple[str, dict]] = {}
    lines = text.split("\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError:
            if n == len(lines) - 1:  # the last line, cut short by a crash: never acknowledged
                break
            raise ValueError(f"line {n + 1} is not JSON") from None
        if "done" in item:
            entries.pop(int(item["done"]), None)
        else:
            entries[int(item["seq"])] = (item["kind"], item["data"])
    return [entries[seq] for seq in sorted(entries)]


def mark_replayed(path: Path) -> Path:
    """Rename a pending file whose entries are all recorded to ``<stem>.recorded[-k].json``."""
    k = 0
    while True:
        target = path.with_name(f"{path.stem}.recorded{f'-{k}' if k else ''}.json")
        try:
            os.link(path, target)  # fails on an existing name: an earlier file is never replaced
        except FileExistsError:
            k += 1
            continue
        except OSError:  # no hard links on this file system
            if target.exists():
                k += 1
                continue
            path.rename(target)
            return target
        path.unlink()
        return target
