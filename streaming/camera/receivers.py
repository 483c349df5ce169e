"""Send a whole scan as the camera's four receiving servers do: one module sender each, run together.

send_scan runs one spawned process per module (as in production: one receiver process per sector) and
waits for all; a failing child stops the others. send_simulated_scan runs the four as threads sharing one
simulated camera: starting them takes milliseconds where four processes take seconds to import.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from counting.geometry import N_SECTORS
from counting.simulator import SimulatedCamera, SimulatorConfig
from streaming.camera.faults import SenderFaults
from streaming.camera.push import DEFAULT_HWM, DEFAULT_LINGER, DEFAULT_SEND_TIMEOUT, SenderError, address_for
from streaming.camera.rendering import SharedRendering
from streaming.camera.sender import SendResult, run_sender
from streaming.camera.sources import PathLike, Source, open_source, source_spec

_Children = dict[int, tuple[mp.process.BaseProcess, Connection]]


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
        source = open_source(args.spec)
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

    shared = SharedRendering(camera)  # each frame rendered once, for all four

    def one(module: int) -> SendResult:
        return run_sender(
            shared,
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
    spec = source_spec(source)
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
        address_for(addresses, m)  # fail here, not in four children
    children: _Children = {}
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


def _collect(children: _Children, timeout: float | None) -> dict[int, SendResult]:
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


def _stop_children(children: _Children, grace: float) -> None:
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
