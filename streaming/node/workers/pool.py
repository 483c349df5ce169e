"""Counting batch slots in worker processes, with the frames in shared memory (never pickled).

The node process assembles frames into slots of a shared-memory block; a worker process counts a slot in
place and sends back only the events. Each worker has its own duplex pipe, so the node can poll the pipes
together with its ZeroMQ sockets, and a worker that dies is noticed at once (its pipe closes): it is
restarted and the slots it held are counted again, so no frame is lost to a crashed worker.

Nothing per scan restarts or recompiles anything: the workers start, and compile (or load from numba's
cache) the counting kernel, when the pool is made, which is before the node reports ready; a new dark and
gain reach the running workers in shared memory, announced by a small message on their pipes (a 2.6 MB
message could block the node while a worker is busy), each task naming the calibration it is counted
with; new thresholds only prepare a new Counter in the worker (tens of milliseconds).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import signal
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from counting.geometry import FRAME_BYTES, FRAME_SHAPE
from counting.kernel import Counter, EventList, Thresholds
from streaming.node.workers.shared_blocks import create_block
from streaming.node.workers.slots import SlotMemory
from streaming.node.workers.spawning import main_not_imported

__all__ = ["CountResult", "CountingPool", "SlotMemory"]  # SlotMemory: its old home, still imported

WARM_UP_TIMEOUT = 120.0  # seconds for the workers to start and load the kernel (a cold numba cache compiles)
_WARM_UP_THRESHOLDS = Thresholds(20.5, 600.0)
PAGE_VALUES = 2048  # uint16 values per 4 KiB page
_KEEP_CALIBRATIONS = 4  # recent calibrations a worker keeps, and shared blocks the pool keeps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Calibration:
    """A dark reference and gain to count with; tasks name it by version."""

    version: int
    dark: np.ndarray | None
    gain: np.ndarray | None


@dataclass(frozen=True)
class CalibrationRef:
    """A calibration in a shared-memory block: the dark, then the gain, as float32 frames when present."""

    version: int
    block: str
    has_dark: bool
    has_gain: bool

    def load(self) -> Calibration:
        """Copy the calibration out of its block (FileNotFoundError if the pool has dropped it)."""
        shm = SharedMemory(name=self.block)
        try:
            frames = np.ndarray((2, *FRAME_SHAPE), np.float32, buffer=shm.buf)
            dark = frames[0].copy() if self.has_dark else None
            gain = frames[1].copy() if self.has_gain else None
            del frames
        finally:
            shm.close()
        return Calibration(self.version, dark, gain)


@dataclass(frozen=True)
class CountTask:
    """Count frames[:n] of a slot with these thresholds and this calibration (a Calibration version)."""

    task_id: int
    slot: int
    n: int
    background: float
    xray: float
    calibration: int = 0


@dataclass(frozen=True)
class WarmUp:
    """Count a synthetic frame once (loads the kernel) and answer with a CountResult of task_id -1."""


@dataclass(frozen=True)
class CountResult:
    """Events of a counted slot."""

    task_id: int
    slot: int
    events: EventList
    seconds: float


def _worker_main(conn: Connection, shm_name: str, shape: tuple, calibration: Calibration) -> None:
    """Worker process: count slots on request until told to stop; take new calibrations as they come."""
    # The node's SIGTERM (its group's, or its parent-death signal) is the node's to handle: the workers
    # finish the counts in flight for its stop and end when it closes their pipe (EOF) or sends None.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    shm = SharedMemory(name=shm_name)
    try:
        slots = np.ndarray(shape, np.uint16, buffer=shm.buf)
        int(slots.reshape(-1)[::PAGE_VALUES].sum())  # map every page now, not during the first scan
        calibrations = {calibration.version: calibration}
        counters: dict[tuple[int, float, float], Counter] = {}
        while True:
            task = conn.recv()
            if task is None:
                break
            if isinstance(task, CalibrationRef):
                calibrations[task.version] = task.load()  # a dropped block: exit, and be restarted
                for old in sorted(calibrations)[:-_KEEP_CALIBRATIONS]:
                    del calibrations[old]
                continue
            if isinstance(task, WarmUp):
                conn.send(_warm_up(calibrations[max(calibrations)]))
                continue
            key = (task.calibration, task.background, task.xray)
            if key not in counters:  # one scan's thresholds at a time
                cal = calibrations[task.calibration]
                counters = {key: Counter(cal.dark, Thresholds(task.background, task.xray), cal.gain)}
            t0 = time.perf_counter()
            events = counters[key].count(slots[task.slot, : task.n])
            conn.send(CountResult(task.task_id, task.slot, events, time.perf_counter() - t0))
        del slots
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        shm.close()


def _warm_up(calibration: Calibration) -> CountResult:
    """Count one synthetic frame with the calibration, as a real task would (same types, same kernel)."""
    frames = np.zeros((1, *FRAME_SHAPE), np.uint16)
    frames[0, 100:103, 200:203] = 400  # a few candidates, so the whole kernel path runs
    frames[0, 101, 201] = 500
    t0 = time.perf_counter()
    events = Counter(calibration.dark, _WARM_UP_THRESHOLDS, calibration.gain).count(frames)
    return CountResult(-1, -1, events, time.perf_counter() - t0)


class CountingPool:
    """Counts slots in ``workers`` processes, or inline in the caller when workers == 0."""

    def __init__(
        self,
        memory: SlotMemory,
        dark: np.ndarray | None,
        gain: np.ndarray | None,
        workers: int,
        warm_up_timeout: float = WARM_UP_TIMEOUT,
    ):
        """Start the workers and warm them up (or the inline counter, with workers == 0): returns once
        each has counted a frame, so the first scan counts as fast as later ones."""
        self.memory = memory
        self.workers = workers
        self._calibration = Calibration(0, dark, gain)
        self._recent: dict[int, Calibration] = {0: self._calibration}  # versions tasks in flight may name
        self._blocks: dict[int, SharedMemory] = {}  # shared copies of recent calibrations, by version
        self._ctx = mp.get_context("spawn")
        self._procs: list[mp.Process | None] = [None] * workers
        self._conns: list[Connection | None] = [None] * workers
        self._held: list[dict[int, CountTask]] = [{} for _ in range(workers)]
        self._inline: list[CountResult] = []
        self._early: list[CountResult] = []  # results that arrived while warming up
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
        self.warm_up(warm_up_timeout)

    @property
    def dark(self) -> np.ndarray | None:
        """The dark reference counted with now."""
        return self._calibration.dark

    @property
    def gain(self) -> np.ndarray | None:
        """The gain counted with now."""
        return self._calibration.gain

    def warm_up(self, timeout: float = WARM_UP_TIMEOUT) -> float:
        """Have every worker (or the inline counter) count a synthetic frame and wait for all of them; returns
        the seconds it took. A worker that does not answer in time is only logged: it warms up on its own."""
        t0 = time.monotonic()
        if self.workers == 0:
            _warm_up(self._calibration)
            return time.monotonic() - t0
        waiting = set()
        for i, conn in enumerate(self._conns):
            with contextlib.suppress(BrokenPipeError, OSError):  # a dead worker is restarted by collect()
                conn.send(WarmUp())
                waiting.add(i)
        deadline = t0 + timeout
        while waiting and time.monotonic() < deadline:
            for conn in wait([self._conns[i] for i in waiting], timeout=deadline - time.monotonic()):
                i = self._conns.index(conn)
                try:
                    while conn.poll():
                        result = conn.recv()
                        if result.task_id == -1:
                            waiting.discard(i)
                        else:  # cannot happen before the first submit; kept all the same
                            self._held[i].pop(result.task_id, None)
                            self._early.append(result)
                except (EOFError, OSError):
                    waiting.discard(i)
                    self._restart(i)
        seconds = time.monotonic() - t0
        if waiting:
            log.warning("counting worker(s) %s not warmed up after %.0f s", sorted(waiting), seconds)
        else:
            log.info("%d counting worker(s) started and warmed up in %.2f s", self.workers, seconds)
        return seconds

    def _start(self, i: int) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self.memory.name, self.memory.array.shape, self._calibration),
            name=f"stemstream-count-{i}",
            daemon=True,
        )
        with main_not_imported():
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
        bg, xray = float(thresholds.background), float(thresholds.xray)
        task = CountTask(self._next_id, slot, n, bg, xray, self._calibration.version)
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
        key = (task.background, task.xray)
        if key not in self._inline_counter:
            self._inline_counter = {key: Counter(self.dark, Thresholds(*key), self.gain)}
        t0 = time.perf_counter()
        events = self._inline_counter[key].count(self.memory.array[task.slot, : task.n])
        return CountResult(task.task_id, task.slot, events, time.perf_counter() - t0)

    def collect(self, timeout: float = 0.0, events: dict | None = None) -> list[CountResult]:
        """Results ready (up to timeout, or in a poll's events); dead workers restarted, their tasks re-sent."""
        if self.workers == 0:
            out, self._inline = self._inline, []
            return out
        results, self._early = self._early, []
        if events is None:
            ready = wait(self.connections(), timeout=0 if results else timeout)
        else:  # the caller polled the pipes already: no selector made, no system call for pipes not ready
            ready = [c for c in self.connections() if c.fileno() in events]  # zmq.Poller gives fds
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
        held = list(self._held[i].values())
        for version in sorted({t.calibration for t in held} - {self._calibration.version}):
            with contextlib.suppress(BrokenPipeError, OSError):  # an older one its recounted tasks name
                self._conns[i].send(self._shared(self._recent[version]))
        for task in held:
            self._dispatch(i, task)

    def recalibrate(self, dark: np.ndarray | None, gain: np.ndarray | None) -> None:
        """Count with another dark and gain from the next submitted task on. The running workers get it
        through their pipes, no process restarts; tasks already submitted keep the calibration they had."""
        self._calibration = Calibration(self._calibration.version + 1, dark, gain)
        in_flight = {t.calibration for held in self._held for t in held.values()}
        self._recent = {v: c for v, c in self._recent.items() if v in in_flight}
        self._recent[self._calibration.version] = self._calibration
        self._inline_counter = {}
        if not self.workers:
            return
        ref = self._shared(self._calibration)
        for i, conn in enumerate(self._conns):
            if conn is None:
                continue
            try:
                conn.send(ref)
            except (BrokenPipeError, OSError):
                self._restart(i)  # started with the new calibration

    def _shared(self, calibration: Calibration) -> CalibrationRef:
        """The calibration's shared-memory block (made now if needed; only the newest few are kept)."""
        if calibration.version not in self._blocks:
            shm = create_block(2 * FRAME_BYTES * 2)  # two float32 frames
            frames = np.ndarray((2, *FRAME_SHAPE), np.float32, buffer=shm.buf)
            for k, a in enumerate((calibration.dark, calibration.gain)):
                if a is not None:
                    frames[k] = a
            del frames
            self._blocks[calibration.version] = shm
            for old in sorted(self._blocks)[:-_KEEP_CALIBRATIONS]:
                _drop_block(self._blocks.pop(old))
        return CalibrationRef(
            calibration.version,
            self._blocks[calibration.version].name,
            calibration.dark is not None,
            calibration.gain is not None,
        )

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes (for monitoring and fault-injection tests)."""
        return [p.pid for p in self._procs if p is not None and p.pid is not None]

    def stop(self) -> None:
        """Shutting down: a worker that ends from now on (by the same signal) is not restarted. Only sets
        a flag, so it is safe from a signal handler or another thread; close() does the rest."""
        self.closing = True

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
        for shm in self._blocks.values():
            _drop_block(shm)
        self._blocks = {}


def _drop_block(shm: SharedMemory) -> None:
    shm.close()
    with contextlib.suppress(FileNotFoundError):
        shm.unlink()
