"""Counting batch slots in worker processes, with the frames in shared memory (never pickled).

The node process assembles frames into slots of a shared-memory block; a worker process counts a slot in
place and sends back only the events. Each worker has its own duplex pipe, so the node can poll the pipes
together with its ZeroMQ sockets, and a worker that dies is noticed at once (its pipe closes): it is
restarted and the slots it held are counted again, so no frame is lost to a crashed worker.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from counting.geometry import FRAME_BYTES, FRAME_SHAPE
from counting.kernel import Counter, EventList, Thresholds

log = logging.getLogger(__name__)


class SlotMemory:
    """n_slots batches of batch_size frames, in shared memory (or private memory when shared=False)."""

    def __init__(self, n_slots: int, batch_size: int, shared: bool = True):
        if n_slots < 1 or batch_size < 1:
            raise ValueError("need at least one slot of at least one frame")
        self.n_slots, self.batch_size = n_slots, batch_size
        size = n_slots * batch_size * FRAME_BYTES
        self._shm = SharedMemory(create=True, size=size) if shared else None
        buf = self._shm.buf if self._shm is not None else bytearray(size)
        self.array = np.ndarray((n_slots, batch_size, *FRAME_SHAPE), np.uint16, buffer=buf)

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


@dataclass(frozen=True)
class CountTask:
    """Count frames[:n] of a slot with these thresholds."""

    task_id: int
    slot: int
    n: int
    background: float
    xray: float


@dataclass(frozen=True)
class CountResult:
    """Events of a counted slot."""

    task_id: int
    slot: int
    events: EventList
    seconds: float


def _worker_main(conn: Connection, shm_name: str, shape: tuple, dark, gain) -> None:
    """Worker process: count slots on request until told to stop."""
    import time

    shm = SharedMemory(name=shm_name)
    try:
        slots = np.ndarray(shape, np.uint16, buffer=shm.buf)
        counters: dict[tuple[float, float], Counter] = {}
        while True:
            task = conn.recv()
            if task is None:
                break
            key = (task.background, task.xray)
            if key not in counters:
                counters = {key: Counter(dark, Thresholds(*key), gain)}  # one scan's thresholds at a time
            t0 = time.perf_counter()
            events = counters[key].count(slots[task.slot, : task.n])
            conn.send(CountResult(task.task_id, task.slot, events, time.perf_counter() - t0))
        del slots
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        shm.close()


class CountingPool:
    """Counts slots in ``workers`` processes, or inline in the caller when workers == 0."""

    def __init__(self, memory: SlotMemory, dark: np.ndarray | None, gain: np.ndarray | None, workers: int):
        self.memory = memory
        self.dark, self.gain = dark, gain
        self.workers = workers
        self._ctx = mp.get_context("spawn")
        self._procs: list[mp.Process | None] = [None] * workers
        self._conns: list[Connection | None] = [None] * workers
        self._held: list[dict[int, CountTask]] = [{} for _ in range(workers)]
        self._inline: list[CountResult] = []
        self._inline_counter: dict[tuple[float, float], Counter] = {}
        self._next_id = 0
        self._rr = 0
        self.restarts = 0
        self.closing = False
        self.generation = 0  # bumped when a worker pipe is replaced, so pollers can re-register
        if workers and memory.name is None:
            raise ValueError("worker processes need shared slot memory")
        for i in range(workers):
            self._start(i)

    def _start(self, i: int) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self.memory.name, self.memory.array.shape, self.dark, self.gain),
            name=f"stemstream-count-{i}",
            daemon=True,
        )
        proc.start()
        child.close()
        self._procs[i], self._conns[i] = proc, parent

    def connections(self) -> list[Connection]:
        """Pipes to poll for results (with zmq.Poller, by file descriptor)."""
        return [c for c in self._conns if c is not None]

    @property
    def outstanding(self) -> int:
        """Tasks submitted and not yet returned."""
        return sum(len(h) for h in self._held) + len(self._inline)

    def submit(self, slot: int, n: int, thresholds: Thresholds) -> int:
        """Queue a slot for counting; returns the task id."""
        task = CountTask(self._next_id, slot, n, float(thresholds.background), float(thresholds.xray))
        self._next_id += 1
        if self.workers == 0:
            self._inline.append(self._count_inline(task))
            return task.task_id
        i = self._rr % self.workers
        self._rr += 1
        self._dispatch(i, task)
        return task.task_id

    def _dispatch(self, i: int, task: CountTask) -> None:
        self._held[i][task.task_id] = task
        try:
            self._conns[i].send(task)
        except (BrokenPipeError, OSError):
            self._restart(i)

    def _count_inline(self, task: CountTask) -> CountResult:
        import time

        key = (task.background, task.xray)
        if key not in self._inline_counter:
            self._inline_counter = {key: Counter(self.dark, Thresholds(*key), self.gain)}
        t0 = time.perf_counter()
        events = self._inline_counter[key].count(self.memory.array[task.slot, : task.n])
        return CountResult(task.task_id, task.slot, events, time.perf_counter() - t0)

    def collect(self, timeout: float = 0.0) -> list[CountResult]:
        """Results ready now (waiting up to timeout); restarts dead workers and re-sends their tasks."""
        if self.workers == 0:
            out, self._inline = self._inline, []
            return out
        from multiprocessing.connection import wait

        ready = wait(self.connections(), timeout=timeout)
        results: list[CountResult] = []
        for conn in ready:
            i = self._conns.index(conn)
            try:
                while conn.poll():
                    result = conn.recv()
                    self._held[i].pop(result.task_id, None)
                    results.append(result)
            except (EOFError, OSError):
                self._restart(i)
        return results

    def _restart(self, i: int) -> None:
        if self.closing:  # shutting down: a worker ended by the same SIGTERM is not a failure
            return
        proc = self._procs[i]
        if proc is not None:
            proc.join(timeout=1)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=1)
        log.warning(
            "counting worker %d exited (code %s); restarting it and recounting %d slots",
            i,
            proc.exitcode if proc else None,
            len(self._held[i]),
        )
        self.restarts += 1
        self.generation += 1
        if self._conns[i] is not None:
            self._conns[i].close()
        self._start(i)
        for task in list(self._held[i].values()):
            self._dispatch(i, task)

    def recalibrate(self, dark: np.ndarray | None, gain: np.ndarray | None) -> None:
        """Count with another dark and gain from now on (restarts the workers; none may hold a slot)."""
        if self.outstanding:
            raise RuntimeError("cannot change the calibration while slots are being counted")
        self.dark, self.gain = dark, gain
        self._inline_counter = {}
        if self.workers:
            self.close()
            self.closing = False
            for i in range(self.workers):
                self._start(i)
            self.generation += 1

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes (for monitoring and fault-injection tests)."""
        return [p.pid for p in self._procs if p is not None and p.pid is not None]

    def close(self) -> None:
        """Stop the workers (politely, then by force) and drop their pipes."""
        self.closing = True
        for conn in self._conns:
            if conn is not None:
                with contextlib.suppress(BrokenPipeError, OSError):
                    conn.send(None)
        for proc in self._procs:
            if proc is not None:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=2)
        for conn in self._conns:
            if conn is not None:
                conn.close()
        self._procs = [None] * self.workers
        self._conns = [None] * self.workers
