"""Counting slots in worker processes: same events as in-process counting, and a killed worker loses nothing."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from counting.geometry import ScanShape
from counting.kernel import Counter, Thresholds
from counting.simulator import SimulatedCamera, SimulatorConfig
from streaming.counting_pool import CountingPool, SlotMemory

pytestmark = pytest.mark.timeout(120)
T = Thresholds(30.5, 600.0)


def fill(memory: SlotMemory) -> list[np.ndarray]:
    cam = SimulatedCamera(SimulatorConfig(ScanShape(8, 8), dose=150.0, seed=1))
    frames = np.concatenate([b.frames for b in cam.iter_batches(64)])
    for i in range(memory.n_slots):
        memory.array[i] = frames[i * memory.batch_size : (i + 1) * memory.batch_size]
    return [memory.array[i].copy() for i in range(memory.n_slots)]


def collect(pool: CountingPool, n: int, timeout: float = 60.0) -> dict:
    got, deadline = {}, time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for r in pool.collect(0.1):
            got[r.slot] = r.events
    return got


def test_worker_processes_count_like_the_kernel_and_survive_a_killed_worker():
    memory = SlotMemory(n_slots=8, batch_size=8)
    pool = CountingPool(memory, None, None, workers=2)
    try:
        frames = fill(memory)
        victim = pool.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)  # killed before or while it holds slots
        for slot in range(memory.n_slots):
            pool.submit(slot, memory.batch_size, T)
        got = collect(pool, memory.n_slots)
        assert sorted(got) == list(range(memory.n_slots))
        assert pool.restarts >= 1 and victim not in pool.worker_pids()
        counter = Counter(None, T)
        for slot, events in got.items():
            ref = counter.count(frames[slot])
            np.testing.assert_array_equal(events.indices, ref.indices)
            np.testing.assert_array_equal(events.offsets, ref.offsets)
    finally:
        pids = pool.worker_pids()
        pool.close()
        memory.close()
    for pid in pids:  # no worker outlives the pool
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or stat.read_text().split()[2] == "Z"
