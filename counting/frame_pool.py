"""The simulator's frame memory: a ring of frame slots rendered in place and lent out as read-only views.

Why: writing a fresh 663 kB frame costs more memory bandwidth than 50 k frames/s allows. So slot q holds the
noise background q mod pool_size; the renderer adds one frame's electrons to it in place and logs each
pixel's old value (an undo log), and takes them off again before the slot's next frame.

Ownership rule: a batch lent out (publish) keeps its slots until every view of it is gone; only then are they
rendered into again (claim). The caller needs no release call, and a yielded batch never changes, however long
it is kept (threshold estimation and the tests keep whole scans). Every view of a batch has one per-batch
root array as its base (numpy stops collapsing bases at an array whose base is a buffer), so "nobody holds
the batch" is "the root array has been freed", which a weak reference to it tells. (This replaces counting
sys.getrefcount against a measured, interpreter-dependent baseline: same rule, same speed.)

Kept batches cost memory, then copies, never correctness: claim grows the ring once to about three batches
beyond the pool (a for-loop holds the previous batch while asking for the next, and often one more); past
that, a held window makes claim return None and the caller renders into a fresh array. Growth copies the
backgrounds into new memory, so views lent out keep their old memory untouched.

Not thread-safe: the camera calls it under its lock.
"""

from __future__ import annotations

import weakref

import numpy as np

from counting.simulator.kernels import restore


class FramePool:
    """Ring of flat uint16 frame slots over pool_size backgrounds, with per-slot undo logs."""

    def __init__(self, backgrounds: np.ndarray, log_capacity: int):
        """backgrounds: (pool_size, pixels) uint16, taken over as the first ring (not copied).
        log_capacity: undo-log entries one rendered frame can need."""
        self.pool_size = len(backgrounds)
        self._log_cap = max(log_capacity, 1)
        self._set_ring(backgrounds)

    def slots_for(self, i0: int, n: int) -> int:
        """The slot holding frame i0's background (i0 mod pool_size), with the ring grown so that n slots
        from there exist: where a caller rendering frames i0..i0+n-1 into fresh memory copies from."""
        slot0 = i0 % self.pool_size
        if slot0 + n > len(self.ring):
            self._grow(self.pool_size + n)
        return slot0

    def claim(self, i0: int, n: int) -> int | None:
        """First slot of n consecutive slots with frames i0..i0+n-1's backgrounds that no lent batch holds,
        to render in place and publish; None when held batches block them all (render a copy instead)."""
        slot0 = self.slots_for(i0, n)
        start = self._free_window(slot0, n)
        if start is None and len(self.ring) < self._bound(n):
            self.reserve(n)
            start = self._free_window(slot0, n)
        return start

    def reserve(self, n: int) -> None:
        """Grow the ring now to what batches of n frames will need, rather than in the middle of a scan."""
        if len(self.ring) < self._bound(n):
            self._grow(self._bound(n))

    def _bound(self, n: int) -> int:
        return self.pool_size * -(-3 * n // self.pool_size) + n

    def publish(self, slot0: int, n: int) -> np.ndarray:
        """Lend slots [slot0, slot0 + n) out as a read-only (n, pixels) view; they stay held while any
        view of it lives."""
        root = np.frombuffer(memoryview(self.ring[slot0 : slot0 + n]).toreadonly(), np.uint16)
        self._lent.append((slot0, slot0 + n, weakref.ref(root)))
        return root.reshape(n, self.ring.shape[1])

    def _free_window(self, slot0: int, n: int) -> int | None:
        # Any slot with the same residue holds the same background, so any such window will do.
        for start in range(slot0, len(self.ring) - n + 1, self.pool_size):
            if self._take_back(start, start + n):
                return start
        return None

    def _take_back(self, start: int, stop: int) -> bool:
        """True (and forget their loans) if no batch lent on slots [start, stop) is still alive."""
        overlapping = [loan for loan in self._lent if loan[0] < stop and start < loan[1]]
        if any(root() is not None for _, _, root in overlapping):
            return False
        self._lent = [loan for loan in self._lent if not (loan[0] < stop and start < loan[1])]
        return True

    def _grow(self, length: int) -> None:
        """Rebuild the ring with `length` slots in new memory, each slot back to its clean background."""
        pool = self.pool_size
        ring = np.empty((length, self.ring.shape[1]), np.uint16)
        for q in range(pool):
            ring[q] = self.ring[q]
            restore(ring[q], self.log_idx[q], self.log_val[q], self.log_n[q])
        for q in range(pool, length):
            ring[q] = ring[q % pool]
        self._set_ring(ring)

    def _set_ring(self, ring: np.ndarray) -> None:
        self.ring = ring
        # Undo log of slot q: (pixel index, old value) of its last frame's first log_n[q] writes.
        self.log_idx = np.zeros((len(ring), self._log_cap), np.int32)
        self.log_val = np.zeros((len(ring), self._log_cap), np.uint16)
        self.log_n = np.zeros(len(ring), np.int64)
        self._lent: list[tuple[int, int, weakref.ref]] = []
