"""The node's slot memory: the batches frames are assembled into and counted in place, shared with the
counting workers (never pickled)."""

from __future__ import annotations

import numpy as np

from counting.geometry import FRAME_BYTES, FRAME_SHAPE
from streaming.node.workers.shared_blocks import create_block


class SlotMemory:
    """n_slots batches of batch_size frames, in shared memory (or private memory when shared=False)."""

    def __init__(self, n_slots: int, batch_size: int, shared: bool = True):
        if n_slots < 1 or batch_size < 1:
            raise ValueError("need at least one slot of at least one frame")
        self.n_slots, self.batch_size = n_slots, batch_size
        size = n_slots * batch_size * FRAME_BYTES
        self._shm = create_block(size) if shared else None
        buf = self._shm.buf if self._shm is not None else bytearray(size)
        self.array = np.ndarray((n_slots, batch_size, *FRAME_SHAPE), np.uint16, buffer=buf)
        # Touch every page now: otherwise the first scan pays the page faults of hundreds of MB (first use
        # of each slot), and the first scan must be as fast as the later ones.
        self.array[...] = 0

    @property
    def name(self) -> str | None:
        """Shared-memory name for workers to attach to."""
        return self._shm.name if self._shm is not None else None

    def slots(self) -> list[np.ndarray]:
        """One (batch, 576, 576) view per slot."""
        return [self.array[i] for i in range(self.n_slots)]

    def close(self) -> None:
        """Release the memory (the owner unlinks it)."""
        self.array = None  # drop the view before closing the buffer
        if self._shm is not None:
            self._shm.close()
            self._shm.unlink()
            self._shm = None
