"""One simulated camera rendered once for the four module senders running as threads of one process.

Each module's sender needs only its own sector of every frame, so four senders each iterating the camera
would render every frame four times. Here the first sender to need a batch renders it, the others read the
same read-only batch, and a batch is let go once all four have passed it (the simulator's ring takes its
memory back when the last view of it goes). No sender runs more than ``ahead`` batches before the slowest,
so memory stays bounded; a sender that stops early no longer holds the others back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np

from counting.geometry import N_SECTORS, SECTOR_ROWS, FrameBatch
from counting.simulator import SimulatedCamera

_DONE = 1 << 62  # the progress of a sender that stopped


class SharedRendering:
    """A SimulatedCamera's batches, rendered once, read by one sender per module (threads)."""

    def __init__(self, camera: SimulatedCamera, ahead: int = 2, batch_size: int = 64) -> None:
        self.camera = camera
        self.ahead = ahead
        batch_size = min(batch_size, max(1, camera.config.pool_size // 2))
        camera.reserve(batch_size)  # the simulator's memory grows here, not while the scan streams
        self._batches = camera.iter_batches(batch_size)
        self._cond = threading.Condition()
        self._window: dict[int, FrameBatch] = {}  # rendered batches some sender has not passed yet
        self._rendered = 0
        self._ended = False
        self._progress = [0] * N_SECTORS  # per module: batches passed

    def sectors(self, module: int) -> Iterator[tuple[int, int, np.ndarray]]:
        """(frame_number, position, sector view) of every frame, for one module, in frame order."""
        rows = slice(module * SECTOR_ROWS, (module + 1) * SECTOR_ROWS)
        i = 0
        try:
            while (batch := self._batch(i)) is not None:
                frames, numbers, positions = (
                    batch.frames,
                    batch.frame_numbers.tolist(),
                    batch.positions.tolist(),
                )
                del batch
                for k, number in enumerate(numbers):
                    yield number, positions[k], frames[k, rows]
                del frames
                i += 1
                self._passed(module, i)
        finally:
            self._passed(module, _DONE)

    def _batch(self, i: int) -> FrameBatch | None:
        with self._cond:
            while True:
                if i in self._window:
                    return self._window[i]
                if self._ended:
                    return None
                if i == self._rendered and i - min(self._progress) < self.ahead:
                    batch = next(self._batches, None)  # rendered under the lock: the others need it next
                    if batch is None:
                        self._ended = True
                    else:
                        self._window[i] = batch
                        self._rendered += 1
                    self._cond.notify_all()
                    return batch
                self._cond.wait(1.0)  # a slower sender passes a batch, or the renderer finishes one

    def _passed(self, module: int, batches: int) -> None:
        with self._cond:
            self._progress[module] = batches
            slowest = min(self._progress)
            for k in [k for k in self._window if k < slowest]:
                del self._window[k]
            self._cond.notify_all()
