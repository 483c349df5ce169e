"""The simulator's frame pool: lent slots stay untouched while any view of them lives, then come back."""

from __future__ import annotations

import numpy as np

from counting.frame_pool import FramePool


def _pool(pool_size: int = 4, pixels: int = 6) -> FramePool:
    backgrounds = np.arange(pool_size * pixels, dtype=np.uint16).reshape(pool_size, pixels)
    return FramePool(backgrounds, log_capacity=3)


def test_a_lent_window_comes_back_once_every_view_is_gone():
    pool = _pool()
    first = pool.publish(pool.claim(0, 1), 1)
    assert pool.claim(0, 1) == 0  # slot 0 is held: the ring grew into new memory (5 slots)
    assert len(pool.ring) == 5 and not np.shares_memory(first, pool.ring)
    frames = pool.publish(0, 1)
    assert not frames.flags.writeable
    part = frames[0, 2:]  # any view of the batch holds it
    del frames
    assert pool.claim(0, 1) == 4  # slot 4 holds the same background as slot 0
    del part
    assert pool.claim(0, 1) == 0


def test_growth_keeps_lent_memory_and_restores_backgrounds():
    pool = _pool()
    clean = pool.ring.copy()
    slot = pool.claim(0, 4)
    pool.ring[slot, 1] = 999  # a rendered frame, with its undo log
    pool.log_idx[slot, 0], pool.log_val[slot, 0], pool.log_n[slot] = 1, clean[0, 1], 1
    kept = pool.publish(slot, 4)
    assert pool.claim(0, 4) is not None  # held: the ring grows and a fresh window is found
    assert len(pool.ring) > 4
    assert kept[0, 1] == 999  # what was lent is untouched
    for q in range(len(pool.ring)):
        assert np.array_equal(pool.ring[q], clean[q % 4])  # every new slot holds its clean background


def test_claim_gives_up_when_held_batches_block_every_window():
    pool = _pool(pool_size=2)
    kept = []
    for _ in range(10):
        slot = pool.claim(0, 2)
        if slot is None:
            break
        kept.append(pool.publish(slot, 2))
    assert slot is None  # the caller renders into fresh memory instead
    assert pool.slots_for(0, 2) == 0


def test_reserve_grows_the_ring_once_up_front_so_a_held_window_never_grows_it_later():
    pool = _pool(pool_size=4)
    pool.reserve(2)
    grown = len(pool.ring)
    assert grown > 4
    kept = []
    for i in range(0, 40, 2):  # a reader holding the last three batches, as a sender's lead allows
        slot = pool.claim(i % 4, 2)
        assert slot is not None
        kept = [*kept[-2:], pool.publish(slot, 2)]
    assert len(pool.ring) == grown
    pool.reserve(2)  # already enough: nothing changes
    assert len(pool.ring) == grown
