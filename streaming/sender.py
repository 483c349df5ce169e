"""Emulate the 4D Camera's four receiving servers: push every sector of a scan to the aggregator.

One sender per module, as in production (one receiver process per sector). Each sector goes out as the
2-part wire message ``[SectorHeader.encode(), sector bytes]`` on a PUSH socket that connects to the
aggregator's receiver address for that module. The sector bytes are sent zero-copy (``copy=False``).

Sockets follow production (interactEM's detstream-producer): SNDHWM 1000, a send timeout (10 s), plus
IMMEDIATE so nothing queues before the aggregator is there. A send that times out raises SenderError:
the aggregator is down, or not polling because its nodes are not all ready (the arm handshake).

Real time (``realtime=True``): the camera cannot wait. A receiver paces at ``rate`` and never blocks on the
aggregator: a sector its socket cannot take at once (HWM full) is dropped and counted (``overflowed``), as a
real receiver's full buffer loses frames. It starts once its connection is up (receivers connect before
a scan); only the end-of-scan flush may wait (the camera has stopped by then).

``threads > 1`` emulates a receiver with several sending threads: each has its own PUSH connection and
thread_id, and its header's frames_this_thread counts only its frames. They are driven from one loop
(the GIL makes OS threads useless here), which keeps sends in frame order per connection.

Fault injection for tests (options, never patches): drop chosen (frame_number, module) sectors, and
interleave garbage messages of every malformed kind (see GARBAGE_KINDS; sent blocking even in real time).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path

import msgpack
import numpy as np
import zmq

from counting.geometry import N_SECTORS, SECTOR_BYTES, SECTOR_ROWS
from counting.raw import RawScan, block_dtype, module_from_path, open_raw_scan
from counting.simulator import SimulatedCamera, SimulatorConfig
from streaming.wire import SectorHeader

log = logging.getLogger(__name__)

DEFAULT_HWM = 1000  # production sndhwm
DEFAULT_SEND_TIMEOUT = 10.0  # production sndtimeo, seconds
DEFAULT_LINGER = 10.0  # seconds to wait at exit for queued sectors to leave
GARBAGE_KINDS = (
    "one_part",  # the header alone
    "three_parts",  # an extra part after the payload
    "bad_msgpack",  # the header is not msgpack
    "short_header",  # a msgpack array of 3 ints
    "payload_size",  # a 1,000-byte payload
    "field_range",  # module 4 (0..3 allowed)
    "position",  # x outside the scan width
)
_MIN_SLEEP = 0.001  # the pacer sleeps at least this long, so high rates do not sleep per frame
_NOBLOCK = int(zmq.NOBLOCK)  # a plain int: pyzmq's enum flags cost more per message than the check

PathLike = str | os.PathLike[str]
Source = RawScan | SimulatedCamera


class SenderError(RuntimeError):
    """A sender could not deliver its sectors; the message says which module and why."""


@dataclass(frozen=True)
class SenderFaults:
    """Faults to inject: sectors to drop and garbage messages to interleave (per module sender)."""

    drop: frozenset[tuple[int, int]] = frozenset()  # (frame_number, module) pairs never sent
    garbage: int = 0  # malformed messages each module sender interleaves, cycling through GARBAGE_KINDS

    def __post_init__(self) -> None:
        object.__setattr__(self, "drop", frozenset((int(f), int(m)) for f, m in self.drop))
        if self.garbage < 0:
            raise ValueError(f"garbage must be >= 0, got {self.garbage}")


@dataclass(frozen=True)
class SendResult:
    """What one module sender did."""

    module: int
    scan_number: int
    sent: int  # sectors handed to the aggregator's socket
    dropped: int  # sectors skipped by fault injection
    garbage: int  # malformed messages sent
    frames_this_thread: tuple[int, ...]  # the header value of each sending thread
    seconds: float
    overflowed: int = 0  # real time only: sectors dropped because the aggregator did not take them in time


@dataclass(frozen=True)
class _ScanInfo:
    scan_number: int
    width: int
    height: int
    frames: int  # sectors this module will try to send (before drops)


# ------------------------------------------------------------------------------------------------ sources
def _module_sectors(source: Source, module: int) -> tuple[_ScanInfo, Iterator[tuple[int, int, int, object]]]:
    """The scan identity and (frame_number, x, y, sector buffer) of every sector of one module, in order."""
    if isinstance(source, SimulatedCamera):
        return _simulated_sectors(source, module)
    if isinstance(source, RawScan):
        if source.version == 5:
            return _raw_v5_sectors(source, module)
        return _raw_reassembled_sectors(source, module)
    raise TypeError(f"source must be a RawScan or SimulatedCamera, got {type(source).__name__}")


def _simulated_sectors(camera: SimulatedCamera, module: int):
    scan = camera.scan
    info = _ScanInfo(0, scan.width, scan.height, camera.total_frames)

    def gen() -> Iterator[tuple[int, int, int, object]]:
        # The simulator recycles its ring memory once Python holds no reference to a batch, but libzmq may
        # still be queueing a zero-copy message then (seen: frames overwritten after the ring wrapped).
        # A 166 kB copy costs ~12 us, so send copies of the simulator's sectors.
        for frame_number, position, _, sector in camera.iter_sectors(module=module):
            yield frame_number, position % scan.width, position // scan.width, sector.copy()

    return info, gen()


def _raw_v5_sectors(raw: RawScan, module: int):
    """Straight from the module's files, memory-mapped: the sender only reads its own module, as a
    receiver only has its own sector, and sends page-cache memory without a copy."""
    files = [
        np.memmap(p, dtype=block_dtype(5), mode="r")
        for p in raw.paths
        if module_from_path(p) == module and Path(p).stat().st_size > 0
    ]
    data = [f["data"] for f in files]
    numbers = np.concatenate([f["frame_number"] for f in files]).astype(np.int64) if files else np.zeros(0)
    xs = np.concatenate([f["x"] for f in files]).astype(np.int64) if files else np.zeros(0)
    ys = np.concatenate([f["y"] for f in files]).astype(np.int64) if files else np.zeros(0)
    file_of = np.repeat(np.arange(len(files)), [len(f) for f in files])
    index_of = np.concatenate([np.arange(len(f)) for f in files]) if files else np.zeros(0, np.int64)
    order = np.argsort(numbers, kind="stable")  # a module's files interleave frames round-robin
    info = _ScanInfo(raw.scan_number, raw.scan_shape.width, raw.scan_shape.height, int(order.size))

    def gen() -> Iterator[tuple[int, int, int, object]]:
        for k in order.tolist():
            yield int(numbers[k]), int(xs[k]), int(ys[k]), data[file_of[k]][index_of[k]]

    return info, gen()


def _raw_reassembled_sectors(raw: RawScan, module: int):
    """v4 files hold column strips but the wire carries row strips: assemble frames, send row strip m."""
    width = raw.scan_shape.width
    info = _ScanInfo(raw.scan_number, width, raw.scan_shape.height, raw.num_frames)

    def gen() -> Iterator[tuple[int, int, int, object]]:
        rows = slice(module * SECTOR_ROWS, (module + 1) * SECTOR_ROWS)
        for batch in raw.iter_batches(batch_size=16):
            for k in range(len(batch)):
                pos = int(batch.positions[k])
                yield int(batch.frame_numbers[k]), pos % width, pos // width, batch.frames[k, rows]

    return info, gen()


def _open_source(spec: object) -> Source:
    """Rebuild a source in a child process from its picklable description."""
    if isinstance(spec, SimulatorConfig):
        return SimulatedCamera(spec)
    paths, version = spec  # type: ignore[misc]
    return open_raw_scan(paths, version)


def _source_spec(source: Source | SimulatorConfig | Sequence[PathLike]) -> object:
    """A picklable description of a source: a simulator config, or raw paths and version."""
    if isinstance(source, SimulatorConfig):
        return source
    if isinstance(source, SimulatedCamera):
        return source.config  # frames depend only on the config, so the child renders the same scan
    if isinstance(source, RawScan):
        return (tuple(str(p) for p in source.paths), source.version)
    if isinstance(source, str | os.PathLike):
        return ((str(source),), None)
    return (tuple(str(p) for p in source), None)


# ------------------------------------------------------------------------------------------------ sending
class _Pacer:
    """Token bucket: `rate` tokens per second, a small burst, sleeps instead of spinning."""

    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 frames/s, got {rate}")
        self._rate = rate
        self._burst = max(1.0, 2.0 * rate * _MIN_SLEEP)
        self._tokens = 1.0
        self._last = time.monotonic()

    def take(self) -> None:
        """Wait until one frame may be sent."""
        self._refill()
        if self._tokens < 1.0:
            time.sleep(max((1.0 - self._tokens) / self._rate, _MIN_SLEEP))
            self._refill()
        self._tokens -= 1.0

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now


class _Clock:
    """Real time: frame k is due at start + k / rate, as on the camera's frame clock. A sender that fell
    behind (CPU) catches up at once: the camera does not slow down, its frames already exist."""

    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 frames/s, got {rate}")
        self._period = 1.0 / rate
        self._due: float | None = None

    def take(self) -> None:
        """Wait until the next frame is due (not at all when late)."""
        now = time.monotonic()
        if self._due is None:
            self._due = now
        elif self._due - now >= _MIN_SLEEP:
            time.sleep(self._due - now)
        self._due += self._period


class _Connection:
    """One emulated receiver thread: a PUSH socket; keeps the latest message back so it can be tracked."""

    def __init__(self, ctx: zmq.Context, address: str, hwm: int, send_timeout: float | None, label: str):
        self.label = label
        self.address = address
        self._send_timeout = send_timeout
        self.socket = ctx.socket(zmq.PUSH)
        self.socket.sndhwm = hwm
        self.socket.immediate = (
            1  # queue only on a live connection: no silent buffering before the aggregator
        )
        self.socket.sndtimeo = -1 if send_timeout is None else int(send_timeout * 1000)
        self.socket.connect(address)
        self._pending: list | None = None

    def send(self, parts: list) -> None:
        """Queue a message; the previous one goes out now (so the last one can be sent tracked)."""
        if self._pending is not None:
            self._send(self._pending, track=False)
        self._pending = parts

    def offer(self, parts: list) -> bool:
        """Real time: as send, but the held message goes out only if the queue has room now.

        Returns False when it had none: that message is dropped (a full receiver buffer loses data).
        """
        ok = True
        if self._pending is not None:
            try:
                # NOBLOCK fails only on the first part (HWM full); once accepted, the rest always is.
                self.socket.send_multipart(self._pending, _NOBLOCK, copy=False)
            except zmq.Again:
                ok = False
        self._pending = parts
        return ok

    def wait_connected(self) -> None:
        """Wait (up to the send timeout) until a connection can take data: IMMEDIATE queues nothing before.

        A camera's receivers are connected before a scan starts; without this the first sectors of a
        real-time scan would all overflow while TCP connects.
        """
        timeout = -1 if self._send_timeout is None else int(self._send_timeout * 1000)
        if not self.socket.poll(timeout, zmq.POLLOUT):
            raise SenderError(
                f"{self.label}: no connection to the aggregator at {self.address} after "
                f"{self._send_timeout:g} s (is it running?)"
            )

    def send_now(self, parts: list) -> None:
        """Send after the held message, untracked (garbage messages), keeping the order."""
        if self._pending is not None:
            self._send(self._pending, track=False)
            self._pending = None
        self._send(parts, track=False)

    def flush(self, linger: float) -> None:
        """Send the held message tracked and wait until ZeroMQ has handed it (and all before) to the OS."""
        if self._pending is None:
            return
        tracker = self._send(self._pending, track=True)
        self._pending = None
        if tracker is None:
            return
        try:
            tracker.wait(linger)
        except zmq.NotDone:
            raise SenderError(
                f"{self.label}: sectors still queued for {self.address} after {linger:g} s at exit; "
                "they would be lost (the aggregator stopped reading?)"
            ) from None

    def close(self, linger: float) -> None:
        """Close the socket, waiting up to linger seconds for anything still queued (0 after a failure)."""
        self.socket.close(linger=int(linger * 1000))

    def _send(self, parts: list, track: bool) -> zmq.MessageTracker | None:
        try:
            return self.socket.send_multipart(parts, copy=False, track=track)
        except zmq.Again:
            raise SenderError(
                f"{self.label}: the aggregator at {self.address} took no data for {self._send_timeout:g} s "
                "(is it running, and are all its nodes connected and ready?)"
            ) from None


def _address_for(addresses: Sequence[str], module: int) -> str:
    """Module m uses address m of four, or the single address for all modules."""
    if len(addresses) == N_SECTORS:
        return addresses[module]
    if len(addresses) == 1:
        return addresses[0]
    raise ValueError(f"give 1 or {N_SECTORS} aggregator addresses, got {len(addresses)}")


def _garbage(kind: str, info: _ScanInfo, frame_number: int, module: int, payload: bytes) -> list[bytes]:
    """One malformed message of the given kind (each fails exactly one wire check)."""
    fields = [info.scan_number, frame_number, info.frames, info.width, info.height, 0, 0, 0, module]
    header = msgpack.packb(fields)
    if kind == "one_part":
        return [header]
    if kind == "three_parts":
        return [header, payload, b"extra"]
    if kind == "bad_msgpack":
        return [b"\xc1 not msgpack", payload]  # 0xc1 is never valid msgpack
    if kind == "short_header":
        return [msgpack.packb(fields[:3]), payload]
    if kind == "payload_size":
        return [header, payload[:1000]]
    if kind == "field_range":
        return [msgpack.packb(fields[:8] + [N_SECTORS]), payload]
    if kind == "position":
        return [msgpack.packb(fields[:5] + [info.width] + fields[6:]), payload]
    raise ValueError(f"unknown garbage kind {kind!r}")


def _garbage_slots(count: int, frames: int) -> dict[int, int]:
    """After which real sector (ordinal) each garbage message goes, spread over the scan: {ordinal: n}."""
    slots: dict[int, int] = {}
    for k in range(count):
        at = ((k + 1) * frames) // (count + 1)
        slots[at] = slots.get(at, 0) + 1
    return slots


def run_sender(
    source: Source,
    addresses: Sequence[str],
    module: int,
    rate: float | None = None,
    threads: int = 1,
    *,
    scan_number: int | None = None,
    faults: SenderFaults | None = None,
    send_timeout: float | None = DEFAULT_SEND_TIMEOUT,
    linger: float = DEFAULT_LINGER,
    hwm: int = DEFAULT_HWM,
    context: zmq.Context | None = None,
    stop_event: threading.Event | None = None,
    realtime: bool = False,
) -> SendResult:
    """Send every sector of one module of a scan to the aggregator, as one receiving server does.

    source: a RawScan (raw files) or a SimulatedCamera. addresses: the aggregator's receiver
    addresses, 4 (module m uses address m) or 1 (all modules). rate: frames per second for this module
    (None: as fast as possible). threads: emulated receiver threads (connections, thread ids).
    scan_number: override the source's scan number (a simulator's is 0). faults: drops and garbage.
    send_timeout: seconds a send may block before SenderError (None: forever). linger: seconds to wait
    at the end for queued sectors to leave. stop_event: stop early when set. realtime: the camera does
    not wait: pace at `rate` (required) and drop, and count as overflowed, every sector the socket cannot
    take at once (its HWM is full); only the end-of-scan flush waits. Returns what was sent.
    """
    if not 0 <= module < N_SECTORS:
        raise ValueError(f"module must be in 0..{N_SECTORS - 1}, got {module}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if realtime and rate is None:
        raise ValueError("realtime needs a rate (frames/s): a camera in real time runs at its own pace")
    faults = faults or SenderFaults()
    info, sectors = _module_sectors(source, module)
    if scan_number is not None:
        info = _ScanInfo(scan_number, info.width, info.height, info.frames)
    address = _address_for(addresses, module)
    per_thread = tuple((info.frames - t + threads - 1) // threads for t in range(threads))
    own_ctx = context is None
    ctx = zmq.Context() if own_ctx else context
    label = f"sender module {module}"
    conns = [_Connection(ctx, address, hwm, send_timeout, f"{label} thread {t}") for t in range(threads)]
    start = time.monotonic()
    close_linger = 0.0  # after a failure nothing more is waited for
    try:
        if realtime:
            for conn in conns:
                conn.wait_connected()
        sent, dropped, garbage, overflowed = _send_all(
            info, sectors, module, conns, per_thread, rate, faults, stop_event, realtime
        )
        flushed_by = time.monotonic() + linger
        for conn in conns:
            conn.flush(max(0.0, flushed_by - time.monotonic()))
        close_linger = max(0.0, flushed_by - time.monotonic())  # only trailing garbage can be left
    finally:
        for conn in conns:
            conn.close(close_linger)
        if own_ctx:
            ctx.term()
    seconds = time.monotonic() - start
    log.info(
        "%s: scan %d sent %d sectors (%d dropped, %d garbage) to %s in %.2f s",
        label,
        info.scan_number,
        sent,
        dropped,
        garbage,
        address,
        seconds,
    )
    if overflowed:
        log.warning(
            "%s: scan %d: %d sectors lost: the aggregator did not take them in time (real time at %g frames/s)",
            label,
            info.scan_number,
            overflowed,
            rate,
        )
    return SendResult(module, info.scan_number, sent, dropped, garbage, per_thread, seconds, overflowed)


def _send_all(
    info: _ScanInfo,
    sectors: Iterable[tuple[int, int, int, object]],
    module: int,
    conns: list[_Connection],
    per_thread: tuple[int, ...],
    rate: float | None,
    faults: SenderFaults,
    stop_event: threading.Event | None,
    realtime: bool = False,
) -> tuple[int, int, int, int]:
    """The send loop; returns (sent, dropped, garbage, overflowed)."""
    pacer = None if rate is None else _Clock(rate) if realtime else _Pacer(rate)
    slots = _garbage_slots(faults.garbage, info.frames)
    junk = bytes(SECTOR_BYTES)
    n_threads = len(conns)
    sent = dropped = garbage = overflowed = 0
    for ordinal, (frame_number, x, y, sector) in enumerate(sectors):
        if stop_event is not None and stop_event.is_set():
            break
        for _ in range(slots.get(ordinal, 0)):
            kind = GARBAGE_KINDS[garbage % len(GARBAGE_KINDS)]
            conns[0].send_now(_garbage(kind, info, frame_number, module, junk))
            garbage += 1
        if pacer is not None:
            pacer.take()
        if (frame_number, module) in faults.drop:
            dropped += 1
            continue
        thread = ordinal % n_threads
        header = SectorHeader(
            info.scan_number, frame_number, per_thread[thread], info.width, info.height, x, y, thread, module
        )
        if realtime:
            # The message that overflows is the one held back before this: same count, same order.
            overflowed += not conns[thread].offer([header.encode(), sector])
        else:
            conns[thread].send([header.encode(), sector])
        sent += 1
    for _ in range(faults.garbage - garbage):  # a scan shorter than its garbage slots
        conns[0].send_now(_garbage(GARBAGE_KINDS[garbage % len(GARBAGE_KINDS)], info, 0, module, junk))
        garbage += 1
    return sent - overflowed, dropped, garbage, overflowed


# ------------------------------------------------------------------------------------------------ processes
@dataclass(frozen=True)
class _ChildArgs:
    spec: object
    addresses: tuple[str, ...]
    module: int
    rate: float | None
    threads: int
    scan_number: int | None
    faults: SenderFaults
    send_timeout: float | None
    linger: float
    hwm: int
    log_level: int = field(default=logging.WARNING)
    realtime: bool = False


def _child(args: _ChildArgs, conn: Connection) -> None:
    """Process entry: run one module's sender and report its result or its traceback."""
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        source = _open_source(args.spec)
        result = run_sender(
            source,
            args.addresses,
            args.module,
            args.rate,
            args.threads,
            scan_number=args.scan_number,
            faults=args.faults,
            send_timeout=args.send_timeout,
            linger=args.linger,
            hwm=args.hwm,
            realtime=args.realtime,
        )
        conn.send(("ok", result))
    except BaseException as exc:  # report everything, the parent raises it
        detail = str(exc) if isinstance(exc, SenderError) else traceback.format_exc()
        conn.send(("error", detail))
    finally:
        conn.close()


def send_simulated_scan(
    camera: SimulatedCamera,
    addresses: Sequence[str],
    rate: float | None = None,
    *,
    scan_number: int | None = None,
    realtime: bool = False,
    send_timeout: float | None = DEFAULT_SEND_TIMEOUT,
    hwm: int = DEFAULT_HWM,
) -> list[SendResult]:
    """The four receivers as threads of this process sharing one simulated camera (module order).

    Starting them takes milliseconds, where four processes (send_scan) take seconds to import; the
    sends release the GIL, so this keeps up with the counting pipeline on a few cores.
    """

    def one(module: int) -> SendResult:
        return run_sender(
            camera,
            addresses,
            module,
            rate,
            scan_number=scan_number,
            send_timeout=send_timeout,
            hwm=hwm,
            realtime=realtime,
        )

    with ThreadPoolExecutor(N_SECTORS, thread_name_prefix="receiver") as pool:
        return list(pool.map(one, range(N_SECTORS)))


def send_scan(
    source: Source | SimulatorConfig | Sequence[PathLike] | PathLike,
    addresses: Sequence[str],
    rate: float | None = None,
    threads: int = 1,
    *,
    modules: Sequence[int] = tuple(range(N_SECTORS)),
    scan_number: int | None = None,
    faults: SenderFaults | None = None,
    send_timeout: float | None = DEFAULT_SEND_TIMEOUT,
    linger: float = DEFAULT_LINGER,
    hwm: int = DEFAULT_HWM,
    timeout: float | None = None,
    realtime: bool = False,
) -> dict[int, SendResult]:
    """Send a whole scan with one process per module (spawned), wait for all; returns results per module.

    source: a SimulatorConfig (or SimulatedCamera: its config is used), a RawScan, or raw file paths.
    addresses: 1 or 4 aggregator receiver addresses. rate: frames per second per module (None: as fast
    as possible). threads: emulated receiver threads per module. modules: which modules to send.
    scan_number, faults, send_timeout, linger, hwm, realtime: as in run_sender. timeout: seconds for
    the whole send (None: no limit). A failing child stops the others and raises SenderError with its error text.
    """
    spec = _source_spec(source)
    mpctx = mp.get_context("spawn")
    base = {
        "spec": spec,
        "addresses": tuple(addresses),
        "rate": rate,
        "threads": threads,
        "scan_number": scan_number,
        "faults": faults or SenderFaults(),
        "send_timeout": send_timeout,
        "linger": linger,
        "hwm": hwm,
        "log_level": logging.getLogger().getEffectiveLevel(),
        "realtime": realtime,
    }
    if realtime and rate is None:
        raise ValueError("realtime needs a rate (frames/s): a camera in real time runs at its own pace")
    for m in modules:
        _address_for(addresses, m)  # fail here, not in four children
    children: dict[int, tuple[mp.process.BaseProcess, Connection]] = {}
    try:
        for m in modules:
            reader, writer = mpctx.Pipe(duplex=False)
            proc = mpctx.Process(
                target=_child, args=(_ChildArgs(module=m, **base), writer), name=f"sender-m{m}", daemon=True
            )
            proc.start()
            writer.close()
            children[m] = (proc, reader)
        results = _collect(children, timeout)
    except BaseException:
        _stop_children(children, grace=0.0)  # the others would only block until their send timeout
        raise
    _stop_children(children, grace=5.0)
    return results


def _collect(
    children: dict[int, tuple[mp.process.BaseProcess, Connection]], timeout: float | None
) -> dict[int, SendResult]:
    """Wait for every child's report; the first failure (or the timeout) raises SenderError."""
    deadline = None if timeout is None else time.monotonic() + timeout
    results: dict[int, SendResult] = {}
    waiting = {reader: m for m, (_, reader) in children.items()}
    while waiting:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready = wait(list(waiting), timeout=left)
        if not ready:
            raise SenderError(
                f"senders for modules {sorted(waiting.values())} did not finish in {timeout:g} s"
            )
        for reader in ready:
            module = waiting.pop(reader)
            try:
                status, payload = reader.recv()
            except EOFError:
                code = children[module][0].exitcode
                raise SenderError(
                    f"sender for module {module} died without a report (exit code {code})"
                ) from None
            if status != "ok":
                raise SenderError(f"sender for module {module} failed: {payload}")
            results[module] = payload
    return results


def _stop_children(children: dict[int, tuple[mp.process.BaseProcess, Connection]], grace: float) -> None:
    """Join the children, giving each `grace` seconds; terminate (then kill) those still running."""
    for proc, reader in children.values():
        proc.join(timeout=grace)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=5.0)
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5.0)
        reader.close()
