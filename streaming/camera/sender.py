"""One of the 4D Camera's receiving servers, emulated: send every sector of one module to the aggregator.

Each sector goes out as the 2-part wire message ``[SectorHeader.encode(), sector bytes]`` on a PUSH socket
(streaming.camera.push) that connects to the aggregator's receiver address for that module. Sectors come
from raw files or the simulator (streaming.camera.sources); scan_sender runs the four modules together.

Real time (``realtime=True``): the camera cannot wait. A receiver paces at ``rate`` and never blocks on the
aggregator: a sector its socket cannot take at once (HWM full) is dropped and counted (``overflowed``), as a
real receiver's full buffer loses frames. It starts once its connection is up (receivers connect before
a scan); only the end-of-scan flush may wait (the camera has stopped by then).

``threads > 1`` emulates a receiver with several sending threads: each has its own PUSH connection and
thread_id, and its header's frames_this_thread counts only its frames. They are driven from one loop
(the GIL makes OS threads useless here), which keeps sends in frame order per connection.

Faults (streaming.camera.faults) drop chosen sectors and interleave garbage messages (sent blocking even in real time).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import zmq

from counting.geometry import N_SECTORS, SECTOR_BYTES
from streaming.camera.faults import GARBAGE_KINDS, SenderFaults, garbage_message, garbage_slots
from streaming.camera.pacing import FrameClock, Pacer
from streaming.camera.push import (
    DEFAULT_HWM,
    DEFAULT_LINGER,
    DEFAULT_SEND_TIMEOUT,
    PushConnection,
    address_for,
)
from streaming.camera.sources import ScanInfo, Sector, Source, module_sectors
from streaming.protocol.sector import SectorHeader

log = logging.getLogger(__name__)


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
    info, sectors = module_sectors(source, module)
    if scan_number is not None:
        info = replace(info, scan_number=scan_number)
    address = address_for(addresses, module)
    per_thread = tuple((info.frames - t + threads - 1) // threads for t in range(threads))
    own_ctx = context is None
    ctx = zmq.Context() if own_ctx else context
    label = f"sender module {module}"
    conns = [
        PushConnection(ctx, address, hwm, send_timeout, f"{label} thread {t}", copy=info.reused_buffers)
        for t in range(threads)
    ]
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
    info: ScanInfo,
    sectors: Iterable[Sector],
    module: int,
    conns: list[PushConnection],
    per_thread: tuple[int, ...],
    rate: float | None,
    faults: SenderFaults,
    stop_event: threading.Event | None,
    realtime: bool = False,
) -> tuple[int, int, int, int]:
    """The send loop; returns (sent, dropped, garbage, overflowed)."""
    pacer = None if rate is None else FrameClock(rate) if realtime else Pacer(rate)
    slots = garbage_slots(faults.garbage, info.frames)
    junk = bytes(SECTOR_BYTES)
    n_threads = len(conns)
    sent = dropped = garbage = overflowed = 0
    for ordinal, (frame_number, x, y, sector) in enumerate(sectors):
        if stop_event is not None and stop_event.is_set():
            break
        for _ in range(slots.get(ordinal, 0)):
            kind = GARBAGE_KINDS[garbage % len(GARBAGE_KINDS)]
            conns[0].send_now(garbage_message(kind, info, frame_number, module, junk))
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
        kind = GARBAGE_KINDS[garbage % len(GARBAGE_KINDS)]
        conns[0].send_now(garbage_message(kind, info, 0, module, junk))
        garbage += 1
    return sent - overflowed, dropped, garbage, overflowed
