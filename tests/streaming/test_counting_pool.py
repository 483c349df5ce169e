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
from streaming.node.workers.pool import CountingPool, SlotMemory

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


def test_new_calibration_reaches_running_workers_without_a_restart():
    """recalibrate() goes through the pipes: same worker processes, tasks submitted before it count with the
    old dark, tasks after it with the new one; the pool was warm when made (no compile on the first task)."""
    memory = SlotMemory(n_slots=4, batch_size=8)
    pool = CountingPool(memory, None, None, workers=2)
    try:
        frames = fill(memory)
        pids = pool.worker_pids()
        t0 = time.monotonic()
        pool.submit(0, memory.batch_size, T)
        pool.submit(1, memory.batch_size, T)
        dark = np.full((576, 576), 20.0, np.float32)
        gain = np.full((576, 576), 0.9, np.float32)
        pool.recalibrate(dark, gain)
        pool.submit(2, memory.batch_size, T)
        pool.submit(3, memory.batch_size, T)
        got = collect(pool, 4)
        assert time.monotonic() - t0 < 5  # warm workers: no kernel compilation, no process start
        assert pool.worker_pids() == pids and pool.restarts == 0
        for slot, counter in ((0, Counter(None, T)), (1, Counter(None, T))) + tuple(
            (s, Counter(dark, T, gain)) for s in (2, 3)
        ):
            np.testing.assert_array_equal(got[slot].indices, counter.count(frames[slot]).indices)
        # the new calibration made a difference
        assert len(got[2].indices) < len(Counter(None, T).count(frames[2]).indices)
    finally:
        pool.close()
        memory.close()


def test_a_restarted_worker_recounts_with_the_calibration_its_tasks_named():
    memory = SlotMemory(n_slots=2, batch_size=8)
    pool = CountingPool(memory, None, None, workers=1)
    try:
        frames = fill(memory)
        os.kill(pool.worker_pids()[0], signal.SIGSTOP)  # holds the task until it is killed below
        pool.submit(0, memory.batch_size, T)
        dark = np.full((576, 576), 20.0, np.float32)
        pool.recalibrate(dark, None)
        pool.submit(1, memory.batch_size, T)
        os.kill(pool.worker_pids()[0], signal.SIGKILL)
        got = collect(pool, 2)
        assert pool.restarts == 1
        np.testing.assert_array_equal(got[0].indices, Counter(None, T).count(frames[0]).indices)
        np.testing.assert_array_equal(got[1].indices, Counter(dark, T).count(frames[1]).indices)
    finally:
        pool.close()
        memory.close()
