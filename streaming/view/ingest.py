"""The live view's intake: a ROUTER socket the nodes connect to (CURVE server when keys are configured,
allowing only the nodes' keys), answering each scan's agreed BF geometry to nodes not yet settled on it;
and a look at the scan directory for each scan's written file. One thread."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import h5py
import zmq

from counting.geometry import FRAME_COLS, FRAME_ROWS
from counting.microscope_meta import MICROSCOPE_GROUP
from counting.storage.attrs import plain
from streaming.protocol import live as live_wire
from streaming.transport.ratelog import RateLimitedLog
from streaming.transport.security import CurveServerConfig
from streaming.view.state import ViewState

log = logging.getLogger(__name__)
_ratelog = RateLimitedLog(log)
PATTERN_BYTES = 4 * FRAME_ROWS * FRAME_COLS  # a snapshot's summed pattern, uint32
FOREIGN_FILES = 4096  # files known not to be this view's scans (by path and mtime), never re-opened


# Snapshots queued per node connection: each supersedes the last, so a few suffice, and the bound on what one
# connection can make the view hold is INTAKE_HWM x max_part_bytes (8 x 128 MiB at the 4096^2 cap).
INTAKE_HWM = 8


def max_part_bytes(max_positions: int) -> int:
    """The intake socket's MAXMSGSIZE: the largest part of a snapshot, one int64 position array of a whole
    scan (a final snapshot) or the pattern, with headroom."""
    return max(8 * max_positions, PATTERN_BYTES) + 64 * 1024


def _microscope_attrs(f: h5py.File) -> dict | None:
    """The file's /metadata/microscope attributes (counting.microscope_meta) as plain values, or None."""
    group = f.get(MICROSCOPE_GROUP)
    if not isinstance(group, h5py.Group):
        return None
    return {k: plain(v, lists=True) for k, v in group.attrs.items()}


class LiveIngest:
    """Takes snapshots into ``state`` until stopped; finds written files under ``scan_dir`` every second."""

    def __init__(
        self,
        state: ViewState,
        bind: str,
        curve: CurveServerConfig | None = None,
        scan_dir: Path | None = None,
    ) -> None:
        self.state, self.scan_dir = state, scan_dir
        self._ctx = zmq.Context()
        self._auth = None
        self.socket = self._ctx.socket(zmq.ROUTER)  # nodes' snapshots in, the agreed geometry back
        self.socket.setsockopt(zmq.RCVHWM, INTAKE_HWM)
        self.socket.setsockopt(zmq.SNDHWM, 16)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, max_part_bytes(state.max_positions))
        if curve is not None:
            from streaming.transport.security import apply_server

            self._auth = apply_server(self.socket, curve, self._ctx)
        try:
            self.socket.bind(bind)
        except zmq.ZMQError as exc:
            self.close()
            raise OSError(f"the live view cannot take snapshots on {bind}: {exc}") from None
        self.address = self.socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.received = 0
        self._seen: dict[Path, float] = {}  # files looked at: this view's, by mtime
        self._foreign: dict[Path, tuple[float, str]] = {}  # files of no scan of this view yet: mtime, key
        self.failures = 0  # exceptions the loop survived (beyond malformed snapshots)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stemstream-live-ingest", daemon=True)
        state.intake_alive = self._thread.is_alive

    def start(self) -> LiveIngest:
        """Start the thread."""
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the thread, close the socket and the context."""
        self._stop.set()
        if getattr(self, "_thread", None) is not None and self._thread.is_alive():
            self._thread.join(5)
        self.socket.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self._ctx.term()

    @property
    def alive(self) -> bool:
        """The intake thread runs (for /api/state: a dead intake must not pass for a quiet one)."""
        return self._thread.is_alive()

    def _run(self) -> None:
        next_look = 0.0
        while not self._stop.is_set():
            try:
                if self.socket.poll(100):
                    for _ in range(64):  # bounded: the file look is not starved
                        try:
                            parts = self.socket.recv_multipart(flags=zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._take(parts)
                if self.scan_dir is not None and time.monotonic() > next_look:
                    next_look = time.monotonic() + 1.0
                    self._look()
            except zmq.ContextTerminated:
                return
            except Exception as exc:  # the intake outlives anything one message or file does to it
                self.failures += 1
                _ratelog("live intake error", "the live intake survived %s: %s", type(exc).__name__, exc)

    def _take(self, parts: list) -> None:
        try:
            kind, header, arrays = live_wire.decode(parts[1:])
            if kind != live_wire.SNAP:
                raise live_wire.LiveWireError(f"unexpected kind {kind[:20]!r}")
            agreed = self.state.apply(header, arrays)
            self.received += 1
            if agreed is not None and header.get("geometry") != agreed:  # not settled on it yet: tell it
                reply = live_wire.encode(
                    live_wire.GEOMETRY, {"scan_key": header["scan_key"], "geometry": agreed}
                )
                self.socket.send_multipart([parts[0].bytes, *reply], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # the node asks again with its next snapshot
        except Exception as exc:  # per message: count, log at a bounded rate, keep going
            self.state.malformed += 1
            _ratelog("malformed live snapshot", "dropped: %s: %s", type(exc).__name__, str(exc)[:200])

    def _look(self) -> None:
        try:
            files = sorted(self.scan_dir.glob("*.h5"))
        except OSError:
            return
        for path in files:
            try:
                mtime = path.stat().st_mtime
                if self._seen.get(path) == mtime or self._known_foreign(path, mtime):
                    continue
                self._seen[path] = mtime
                with h5py.File(path, "r") as f:
                    key = f["metadata/stemstream"].attrs.get("scan_key", "")
                    microscope = _microscope_attrs(f)
                key = key.decode() if isinstance(key, bytes) else str(key)
            except (OSError, KeyError):
                continue
            if key and self.state.scan(key) is not None:
                self.state.set_file(key, str(path))
                if microscope:  # added by the session after the file was written: its phase in nm
                    self.state.set_microscope(key, microscope)
            else:  # not (yet) a scan of this view: look again only when it changes, or the scan appears
                self._seen.pop(path, None)
                if len(self._foreign) < FOREIGN_FILES:
                    self._foreign[path] = (mtime, key)

    def _known_foreign(self, path: Path, mtime: float) -> bool:
        """A file already opened and found to be no scan of this view, unchanged since (L7: never opened
        again every second); when its scan has appeared meanwhile, it is named now, without opening it."""
        known = self._foreign.get(path)
        if known is None or known[0] != mtime:
            return False
        if known[1] and self.state.scan(known[1]) is not None:
            self.state.set_file(known[1], str(path))
            del self._foreign[path]
            self._seen[path] = mtime
        return True
