"""A streaming pipeline of real processes, for the tests and benchmarks that need one: `stemstream aggregator`
and node streamers started from the CLI (every node with the same command; the aggregator designates the
writer host), configured by one settings file, with the four receivers as sender threads of this process.

    with ProcessPipeline(tmp_path, 2, streaming={"node_slots": 4}) as pipe:  # returns once both are armed
        sent = pipe.send(SimulatorConfig(ScanShape(32, 32)), scan_number=1)
        record, h5 = pipe.record(1)
        print(record.status, pipe.memory.peak)

Every process runs in the work directory, in its own session, logs to ``<work>/<name>.log`` and is stopped
by :meth:`ProcessPipeline.close` (SIGTERM to its process group, SIGKILL after a grace period). Every wait is
bounded and its timeout error carries the end of each log.
"""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import zmq

from counting.geometry import N_SECTORS
from counting.raw import open_raw_scan
from counting.simulator import SimulatedCamera, SimulatorConfig
from flows.settings import load_settings, write_settings_file
from stemstream_testing.support import CLI, free_port
from streaming.aggregator.forwarder import offset_address
from streaming.camera.push import DEFAULT_HWM
from streaming.camera.rendering import SharedRendering
from streaming.camera.sender import SendResult, run_sender
from streaming.protocol import control as p
from streaming.protocol.record import ScanRecord
from tasks.launch.processes import ProcessGroup, process_tree, rss_kb


@dataclass
class Sent:
    """What the four senders of a scan did, and when (wall-clock times, as in the stop record)."""

    results: list[SendResult]  # module order
    started: float  # the senders started (their sources were ready)
    ended: float  # the last sector of the last module was handed to the OS

    @property
    def sent(self) -> int:
        """Sectors sent, all modules."""
        return sum(r.sent for r in self.results)

    @property
    def overflowed(self) -> int:
        """Sectors a real-time sender dropped because the aggregator did not take them in time."""
        return sum(r.overflowed for r in self.results)


class ProcessPipeline:
    """An aggregator process for ``n_nodes`` nodes and node processes, in ``work``.

    transport: loopback TCP on free ports, or ipc:// sockets in ``work``. streaming, counting: settings
    overrides, written with everything else to ``<work>/settings.json`` and given to every process
    (``stemstream --settings FILE``). start_nodes: nodes started now (default n_nodes; the constructor
    returns once they are armed). node_args: CLI options added to every node's command. names: --name of the
    i-th node started (None: no --name, each node's default). rss_interval: seconds between memory samples.
    """

    def __init__(
        self,
        work: Path,
        n_nodes: int,
        *,
        transport: Literal["tcp", "ipc"] = "tcp",
        streaming: dict[str, object] | None = None,
        counting: dict[str, object] | None = None,
        start_nodes: int | None = None,
        node_args: Sequence[str] = (),
        names: str | None = "n{}",
        rss_interval: float = 0.05,
        armed_timeout: float = 60.0,
    ) -> None:
        self.work, self.out = work, work / "out"
        work.mkdir(parents=True, exist_ok=True)

        def address(name: str) -> str:
            return f"ipc://{work}/{name}" if transport == "ipc" else f"tcp://127.0.0.1:{free_port()}"

        self.receiver, self.nodes_address, self.monitor = (
            address(n) for n in ("receiver", "nodes", "monitor")
        )
        overrides: dict[str, object] = {
            "receivers": [self.receiver],
            "nodes_bind": self.nodes_address,
            "monitor_bind": self.monitor,
            "n_nodes": n_nodes,
        }
        if transport == "ipc":
            overrides["writer_bind"] = address("writer")
        settings = load_settings(streaming=overrides | (streaming or {}), counting=counting or None)
        self.settings_file = write_settings_file(settings, work / "settings.json")
        st = settings.streaming
        # The receivers connect to every forwarding process (streaming.aggregator_processes).
        self.receivers = ",".join(
            offset_address(self.receiver, i * st.aggregator_port_stride)
            for i in range(st.aggregator_processes)
        )
        self.node_args, self.names = list(node_args), names
        self.procs: dict[str, subprocess.Popen] = {}  # by log name, the aggregator (agg) first
        self.state: p.AggregatorState | None = None  # the monitor's latest
        self._group = ProcessGroup(work)
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self.memory = RssSampler(self, rss_interval)
        try:
            self._start(
                "agg",
                ["aggregator", "--receivers", self.receiver, "--nodes-bind", self.nodes_address]
                + ["--nodes", str(n_nodes), "--monitor-bind", self.monitor],
            )
            self._watcher.start()
            started = n_nodes if start_nodes is None else start_nodes
            for _ in range(started):
                self.start_node()
            if started:
                self.wait_armed(started, armed_timeout)
            self.memory.start()
        except BaseException:
            self.close()
            raise

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        argv = [*CLI, "--settings", str(self.settings_file), *args]
        child = self._group.start(name, argv, env={"PYTHONUNBUFFERED": "1"}, cwd=self.work)
        self.procs[name] = child.popen
        return child.popen

    def start_node(self, log: str | None = None, output_dir: str = "out") -> subprocess.Popen:
        """Start `stemstream node` (the same command for every node); returns its Popen. log: its log
        name (default its --name, else n<i>); output_dir: relative to the work directory."""
        i = len(self.procs) - 1
        name = self.names.format(i) if self.names else None
        args = ["node", "--aggregator", self.nodes_address, "--output-dir", output_dir, *self.node_args]
        return self._start(log or name or f"n{i}", args + (["--name", name] if name else []))

    def _watch(self) -> None:
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(self.monitor)
        try:
            while not self._stop.is_set():
                if sub.poll(100):
                    kind, body = sub.recv_multipart()
                    self.state = p.decode(kind, body, p.AggregatorState)
        finally:
            sub.close(linger=0)

    def wait_state(self, until: Callable[[p.AggregatorState], bool], timeout: float) -> p.AggregatorState:
        """The first monitor state for which until(state) holds (bounded wait: TimeoutError)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state
            if state is not None and until(state):
                return state
            time.sleep(0.02)
        raise TimeoutError(f"monitor: condition not met in {timeout} s (last {self.state}); {self.tails()}")

    def wait_armed(self, n: int, timeout: float = 60.0) -> p.AggregatorState:
        """Until n nodes are connected and armed."""
        return self.wait_state(lambda s: s.nodes_ready >= n, timeout)

    def send(
        self,
        source: SimulatorConfig | SimulatedCamera | Sequence[Path],
        scan_number: int,
        rate: float | None = None,
        *,
        realtime: bool = False,
        send_timeout: float = 120.0,
        hwm: int = DEFAULT_HWM,
    ) -> Sent:
        """Send a scan as the four receivers do: one thread per module (streaming.camera.sender.run_sender).

        source: a SimulatorConfig or a SimulatedCamera (rendered once, shared by the four threads), or raw
        v5 file paths (each thread opens them). rate: frames/s per module; realtime: pace at rate and drop
        (count as overflowed) what the aggregator cannot take at once."""
        if isinstance(source, SimulatorConfig | SimulatedCamera):
            camera = source if isinstance(source, SimulatedCamera) else SimulatedCamera(source)
            sources = [SharedRendering(camera)] * N_SECTORS  # each frame rendered once, for all four
        else:
            sources = [open_raw_scan(source) for _ in range(N_SECTORS)]
        ends = [0.0] * N_SECTORS
        options = {"scan_number": scan_number, "send_timeout": send_timeout, "hwm": hwm, "realtime": realtime}

        def one(m: int) -> SendResult:
            result = run_sender(sources[m], [self.receivers], m, rate, **options)
            ends[m] = time.time()
            return result

        started = time.time()
        with ThreadPoolExecutor(N_SECTORS, thread_name_prefix="receiver") as pool:
            results = list(pool.map(one, range(N_SECTORS)))
        return Sent(results, started, max(ends))

    def record(self, scan_number: int, timeout: float = 300.0) -> tuple[ScanRecord, Path]:
        """A scan's stop record and its HDF5 path, once written (bounded wait: TimeoutError)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = sorted(self.out.glob(f"*_{scan_number:05d}.json"))
            if found:
                return ScanRecord.load(found[0]), found[0].with_suffix(".h5")
            time.sleep(0.05)
        raise TimeoutError(f"scan {scan_number} not written in {timeout} s; {self.tails()}")

    def log(self, name: str) -> str:
        """A process's whole log."""
        return (self.work / f"{name}.log").read_text(errors="replace")

    def tails(self, chars: int = 1500) -> dict[str, str]:
        """The end of each process's log, for failure messages."""
        return {name: self.log(name)[-chars:] for name in self.procs}

    def close(self) -> None:
        """Stop the monitor reader, the memory sampler and every process (SIGTERM, SIGKILL after 15 s)."""
        self._stop.set()
        self.memory.stop()
        if self._watcher.is_alive():
            self._watcher.join(5)
        self._group.stop(grace=15.0)

    def __enter__(self) -> ProcessPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RssSampler:
    """The pipeline's memory, sampled every interval in a thread: peak summed VmRSS (bytes) of every process
    and its counting workers, and per node the peak VmHWM (kB) of the node and of its workers."""

    def __init__(self, pipeline: ProcessPipeline, interval: float) -> None:
        self.pipeline, self.interval = pipeline, interval
        self.peak = 0
        self.hwm_kb: dict[str, int] = {}  # "<node>" and "<node>-worker"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def total(self) -> int:
        """Summed VmRSS (bytes) of every pipeline process and its descendants now."""
        procs = list(self.pipeline.procs.values())  # a copy: nodes may start meanwhile
        return sum(rss_kb(q) * 1024 for pr in procs for q in process_tree(pr.pid))

    def reset(self) -> int:
        """Start a new peak from now; returns the summed VmRSS now."""
        self.peak = now = self.total()
        return now

    def start(self) -> None:
        """Start sampling (from the summed VmRSS now)."""
        self.reset()
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling (the figures stay)."""
        self._stop.set()
        with contextlib.suppress(RuntimeError):  # never started
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            now = self.total()  # before reading peak: a reset() meanwhile is not undone
            self.peak = max(self.peak, now)
            for name, proc in list(self.pipeline.procs.items())[1:]:  # the nodes
                node, *workers = process_tree(proc.pid)
                for key, pids in ((name, [node]), (f"{name}-worker", workers)):
                    for pid in pids:
                        self.hwm_kb[key] = max(self.hwm_kb.get(key, 0), rss_kb(pid, "VmHWM"))
