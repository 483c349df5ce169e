"""A simulated scan with known aberrations, written as a counted file, and `stemstream replay` of it as a real
process: what the live phase page's browser test and its screenshot script feed the page with.

    path = write_phase_scan(tmp / "scan_00005.h5", side=40, scan_number=5)
    with ReplayProcess(path, rate=600) as replay:
        browser.open(replay.url(timeout=60))
        ...
        replay.wait("replayed: ", 60)
    assert replay.returncode == 0 and not replay.stderr
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np

from counting.geometry import ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import CountedScan, write_counted_scan
from stemstream_testing.support import CLI

TRUTH = {"defocus": 0.05, "astigmatism": 0.02, "astigmatism_angle": 30.0, "rotation": 20.0}


def write_phase_scan(
    path: Path, side: int, seed: int = 3, dose: float = 200.0, scan_number: int = 1, **aberrations: float
) -> Path:
    """A side x side counted scan at dose e/frame with the given aberrations (TRUTH when none), counted by
    the simulator's fast path and written in stempy's layout (a new file: never replaces one)."""
    config = SimulatorConfig(ScanShape(side, side), dose=dose, seed=seed, **(aberrations or TRUTH))
    events = np.empty((side * side, 1), object)
    masks = np.zeros((side * side, 1), np.uint8)
    for positions, batch_masks, offsets, indices in SimulatedCamera(config).iter_counted(256):
        for i, pos in enumerate(positions):
            events[pos, 0] = indices[offsets[i] : offsets[i + 1]]
            masks[pos, 0] = batch_masks[i]
    scan = CountedScan(ScanShape(side, side), events, masks, {"stemstream": {"scan_number": scan_number}})
    return write_counted_scan(path, scan)


class ReplayProcess:
    """`stemstream replay PATH --rate RATE --port 0` in a process of its own (its environment: this one's,
    with env added); its stdout lines are read as they come. Leaving the block interrupts it (Ctrl-C) and
    waits for it (killed after 30 s); then ``returncode`` and ``stderr`` say how it ended."""

    def __init__(self, path: Path, rate: float, env: dict[str, str] | None = None) -> None:
        self.args = [*CLI, "replay", str(path), "--rate", str(rate), "--port", "0"]
        self.env = {**os.environ, **(env or {})}
        self.lines: list[str] = []
        self.ended = False
        self.returncode: int | None = None
        self.stderr = ""
        self._new = threading.Condition()
        self._proc: subprocess.Popen | None = None
        self._reader = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> ReplayProcess:
        self._proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            start_new_session=True,
        )
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._new:
                self.lines.append(line.rstrip("\n"))
                self._new.notify_all()
        with self._new:
            self.ended = True
            self._new.notify_all()

    def wait(self, prefix: str, timeout: float) -> str:
        """The first stdout line starting with prefix (AssertionError, with every line so far, if the process
        ends or timeout seconds pass without one)."""
        with self._new:
            self._new.wait_for(lambda: self._first(prefix) is not None or self.ended, timeout)
            line = self._first(prefix)
            assert line is not None, f"no {prefix!r} line from replay in {timeout:.0f} s: {self.lines}"
            return line

    def _first(self, prefix: str) -> str | None:
        return next((x for x in self.lines if x.startswith(prefix)), None)

    def url(self, timeout: float) -> str:
        """The page's address, from the ``live:`` line."""
        return self.wait("live: ", timeout).removeprefix("live: ")

    def __exit__(self, *exc: object) -> None:
        proc = self._proc
        assert proc is not None
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)  # Ctrl-C: the replay's page stops
            self.returncode = proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            self.returncode = proc.wait(10)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
            self._reader.join(10)  # the rest of its output read before the pipes close
            self.stderr = proc.stderr.read() if proc.stderr else ""
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
