"""The receiving-server emulator: headers, payloads, threads, rate, faults, errors, raw files, processes."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zmq

from counting.geometry import N_SECTORS, SECTOR_ROWS, ScanShape
from counting.raw import open_raw_scan, write_raw_scan
from counting.simulator import SimulatedCamera, SimulatorConfig
from streaming.camera.faults import GARBAGE_KINDS, SenderFaults
from streaming.camera.push import SenderError
from streaming.camera.receivers import send_scan
from streaming.camera.sender import run_sender
from streaming.protocol.sector import SectorHeader, WireError, decode_message

pytestmark = pytest.mark.timeout(60)

CONFIG = SimulatorConfig(scan=ScanShape(5, 4), pool_size=8, seed=3, frame_number_start=100)


@pytest.fixture
def ctx() -> Iterator[zmq.Context]:
    context = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


@pytest.fixture
def pull(ctx: zmq.Context) -> Iterator[tuple[zmq.Socket, str]]:
    sock = ctx.socket(zmq.PULL)
    sock.linger = 0
    sock.bind("tcp://127.0.0.1:0")
    try:
        yield sock, sock.LAST_ENDPOINT.decode()
    finally:
        sock.close(linger=0)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    executor = ThreadPoolExecutor(max_workers=4)
    try:
        yield executor
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def receive(sock: zmq.Socket, count: int, timeout: float = 10.0) -> list[list[bytes]]:
    """Exactly `count` messages (bounded in time), then check that nothing else is coming."""
    out: list[list[bytes]] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        if sock.poll(50):
            out.append(sock.recv_multipart())
    assert len(out) == count, f"got {len(out)} of {count} messages"
    assert not sock.poll(100), "more messages than expected"
    return out


def sectors_of(config: SimulatorConfig, module: int) -> dict[int, bytes]:
    """frame_number -> that module's sector bytes, straight from the simulator."""
    camera = SimulatedCamera(config)
    rows = slice(module * SECTOR_ROWS, (module + 1) * SECTOR_ROWS)
    return {fn: camera.frame(fn)[rows].tobytes() for fn in camera.frame_numbers}


def test_sends_every_sector_of_its_module_byte_exact(pull, pool) -> None:
    sock, endpoint = pull
    camera = SimulatedCamera(CONFIG)
    future = pool.submit(run_sender, camera, [endpoint], 2, scan_number=42)
    messages = receive(sock, CONFIG.total_frames)
    result = future.result(timeout=10)
    expected = sectors_of(CONFIG, 2)
    headers = []
    for parts in messages:
        header, payload = decode_message(parts)
        assert bytes(payload) == expected[header.frame_number]
        headers.append(header)
    assert [h.frame_number for h in headers] == list(camera.frame_numbers)
    assert {(h.scan_number, h.module, h.thread_id, h.frames_this_thread) for h in headers} == {(42, 2, 0, 20)}
    assert {(h.scan_width, h.scan_height) for h in headers} == {(5, 4)}
    assert [(h.x, h.y) for h in headers] == [(p % 5, p // 5) for p in range(20)]
    assert (result.sent, result.dropped, result.garbage, result.frames_this_thread) == (20, 0, 0, (20,))


def test_four_addresses_route_modules(ctx, pool) -> None:
    socks = []
    for _ in range(N_SECTORS):
        s = ctx.socket(zmq.PULL)
        s.linger = 0
        s.bind("tcp://127.0.0.1:0")
        socks.append(s)
    endpoints = [s.LAST_ENDPOINT.decode() for s in socks]
    camera = SimulatedCamera(CONFIG)
    future = pool.submit(run_sender, camera, endpoints, 1)
    assert not socks[0].poll(200)
    messages = receive(socks[1], CONFIG.total_frames)
    future.result(timeout=10)
    assert {decode_message(m)[0].module for m in messages} == {1}
    with pytest.raises(ValueError, match="1 or 4"):
        run_sender(camera, endpoints[:2], 0)


def test_threads_split_frames_and_announce_their_counts(pull, pool) -> None:
    sock, endpoint = pull
    future = pool.submit(run_sender, SimulatedCamera(CONFIG), [endpoint], 0, None, 3)
    headers = [decode_message(m)[0] for m in receive(sock, CONFIG.total_frames)]
    result = future.result(timeout=10)
    by_thread: dict[int, list[SectorHeader]] = {}
    for h in headers:
        by_thread.setdefault(h.thread_id, []).append(h)
    assert sorted(by_thread) == [0, 1, 2]
    for hs in by_thread.values():
        assert {h.frames_this_thread for h in hs} == {len(hs)}
        assert [h.frame_number for h in hs] == sorted(h.frame_number for h in hs)  # in order per connection
    assert result.frames_this_thread == (7, 7, 6) and sum(result.frames_this_thread) == 20


@pytest.mark.serial  # asserts a wall-clock rate
def test_rate_limit(pull, pool) -> None:
    sock, endpoint = pull
    start = time.monotonic()
    future = pool.submit(run_sender, SimulatedCamera(CONFIG), [endpoint], 0, 50.0)
    receive(sock, CONFIG.total_frames)
    elapsed = time.monotonic() - start
    future.result(timeout=10)
    # 20 frames at 50 frames/s: 19 intervals of 20 ms after the first frame.
    assert 0.3 <= elapsed <= 2.0


def test_drops_and_every_kind_of_garbage(pull, pool) -> None:
    sock, endpoint = pull
    drop = {(101, 3), (110, 3), (119, 3), (105, 0)}  # (105, 0) is another module's: not ours
    garbage = 2 * len(GARBAGE_KINDS)
    faults = SenderFaults(drop=frozenset(drop), garbage=garbage)
    future = pool.submit(run_sender, SimulatedCamera(CONFIG), [endpoint], 3, faults=faults)
    messages = receive(sock, CONFIG.total_frames - 3 + garbage)
    result = future.result(timeout=10)
    good, bad = [], []
    for parts in messages:
        try:
            good.append(decode_message(parts)[0])
        except WireError as exc:
            bad.append(str(exc))
    assert len(bad) == garbage and (result.sent, result.dropped, result.garbage) == (17, 3, garbage)
    assert {h.frame_number for h in good} == set(range(100, 120)) - {101, 110, 119}
    assert {h.frames_this_thread for h in good} == {20}  # announced before the loss
    # Garbage is interleaved, not bunched at either end.
    first_bad = next(
        i for i, parts in enumerate(messages) if len(parts) != 2 or len(parts[1]) != len(messages[0][1])
    )
    assert 0 < first_bad < len(messages) - 1
    reasons = " ".join(bad)
    for needle in ("2 parts", "not msgpack", "array of 9", "payload", "module", "outside"):
        assert needle in reasons


def test_send_timeout_when_nobody_takes_the_data(ctx) -> None:
    sock = ctx.socket(zmq.PULL)
    sock.bind("tcp://127.0.0.1:0")
    endpoint = sock.LAST_ENDPOINT.decode()
    sock.close(linger=0)  # the port is free now: nothing listens
    start = time.monotonic()
    with pytest.raises(SenderError, match="took no data for 0.3 s"):
        run_sender(SimulatedCamera(CONFIG), [endpoint], 0, send_timeout=0.3)
    assert time.monotonic() - start < 5


def test_stalled_receiver_is_an_error_not_a_silent_loss(ctx) -> None:
    """A peer that connects but never reads: the sender fills its HWM, then times out loudly."""
    sock = ctx.socket(zmq.PULL)
    sock.rcvhwm = 1
    sock.bind("tcp://127.0.0.1:0")
    big = SimulatorConfig(scan=ScanShape(16, 16), pool_size=8)
    with pytest.raises(SenderError, match="module 0"):
        run_sender(SimulatedCamera(big), [sock.LAST_ENDPOINT.decode()], 0, send_timeout=0.5, hwm=2)
    sock.close(linger=0)


@pytest.mark.serial  # the sender must outrun a reader at 1000 frames/s
def test_realtime_drops_and_counts_what_the_aggregator_cannot_take(ctx, pool, caplog) -> None:
    """A camera cannot wait: with nobody reading, the sender keeps its pace, drops what its full queue
    cannot take, counts it and says so once; what it did send arrives intact after the scan."""
    sock = ctx.socket(zmq.PULL)
    sock.linger = 0
    sock.rcvhwm = 1
    sock.bind("tcp://127.0.0.1:0")
    big = SimulatorConfig(scan=ScanShape(16, 16), pool_size=8, seed=4)
    with caplog.at_level("WARNING", logger="streaming.camera.sender"):
        future = pool.submit(
            run_sender, SimulatedCamera(big), [sock.LAST_ENDPOINT.decode()], 1, 1000.0, realtime=True, hwm=2
        )
        time.sleep(1.0)  # 256 frames at 1000/s: the scan is over (or nearly) before anything is read
        messages = []
        while not future.done() or sock.poll(200):  # the end-of-scan flush waits for this reader
            if sock.poll(50):
                messages.append(sock.recv_multipart())
        result = future.result(timeout=10)
    sock.close(linger=0)
    assert result.overflowed > 0 and result.sent == len(messages)
    assert result.sent + result.overflowed == big.total_frames and result.dropped == 0
    expected = sectors_of(big, 1)
    numbers = []
    for parts in messages:
        header, payload = decode_message(parts)
        assert bytes(payload) == expected[header.frame_number]
        numbers.append(header.frame_number)
    assert numbers == sorted(numbers) and numbers[-1] == max(expected)  # in order; the last always goes
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and f"{result.overflowed} sectors lost" in warnings[0]


@pytest.mark.serial  # asserts a wall-clock rate
def test_realtime_keeps_the_camera_clock_and_loses_nothing_when_read(pull, pool) -> None:
    sock, endpoint = pull
    start = time.monotonic()
    future = pool.submit(run_sender, SimulatedCamera(CONFIG), [endpoint], 0, 50.0, realtime=True)
    messages = receive(sock, CONFIG.total_frames)
    elapsed = time.monotonic() - start
    result = future.result(timeout=10)
    assert (result.sent, result.overflowed) == (20, 0) and len(messages) == 20
    assert 0.3 <= elapsed <= 2.0  # 20 frames at 50 frames/s: 19 periods of 20 ms after the first


def test_realtime_needs_a_connection_before_the_scan(ctx) -> None:
    sock = ctx.socket(zmq.PULL)
    sock.bind("tcp://127.0.0.1:0")
    endpoint = sock.LAST_ENDPOINT.decode()
    sock.close(linger=0)  # nothing listens: losing the whole scan silently is not an option
    with pytest.raises(SenderError, match="no connection"):
        run_sender(SimulatedCamera(CONFIG), [endpoint], 0, 100.0, send_timeout=0.3, realtime=True)


@pytest.mark.parametrize("version", [5, 4])
def test_raw_files_source(tmp_path, pull, pool, version: int) -> None:
    sock, endpoint = pull
    camera = SimulatedCamera(CONFIG)
    batches = list(camera.iter_batches(batch_size=7))
    paths = write_raw_scan(tmp_path, 77, CONFIG.scan, batches, version=version, files_per_module=2)
    raw = open_raw_scan(paths, version=version)
    future = pool.submit(run_sender, raw, [endpoint], 1)
    messages = receive(sock, CONFIG.total_frames)
    future.result(timeout=10)
    expected = sectors_of(CONFIG, 1)
    numbers = []
    for parts in messages:
        header, payload = decode_message(parts)
        assert header.scan_number == 77 and header.module == 1 and header.frames_this_thread == 20
        assert header.position == camera.position_of(header.frame_number)
        assert bytes(payload) == expected[header.frame_number]  # v4 column files come out as v5 rows
        numbers.append(header.frame_number)
    assert numbers == sorted(numbers)  # frame order across the module's two files


@pytest.mark.slow
def test_send_scan_processes(pull) -> None:
    sock, endpoint = pull
    config = SimulatorConfig(scan=ScanShape(4, 4), pool_size=8, seed=1)
    with ThreadPoolExecutor(max_workers=1) as executor:
        future = executor.submit(send_scan, config, [endpoint], scan_number=9, timeout=50)
        messages = receive(sock, 4 * config.total_frames, timeout=50)
        results = future.result(timeout=50)
    assert sorted(results) == [0, 1, 2, 3]
    assert all(r.sent == 16 and r.scan_number == 9 for r in results.values())
    camera = SimulatedCamera(config)
    for parts in messages:
        header, payload = decode_message(parts)
        rows = slice(header.module * SECTOR_ROWS, (header.module + 1) * SECTOR_ROWS)
        assert np.array_equal(
            np.frombuffer(payload, "<u2").reshape(SECTOR_ROWS, -1), camera.frame(header.frame_number)[rows]
        )


@pytest.mark.slow
def test_send_scan_surfaces_child_errors(ctx) -> None:
    sock = ctx.socket(zmq.PULL)
    sock.bind("tcp://127.0.0.1:0")
    endpoint = sock.LAST_ENDPOINT.decode()
    sock.close(linger=0)
    with pytest.raises(SenderError, match=r"module 2 failed: .*took no data"):
        send_scan(CONFIG, [endpoint], modules=[2], send_timeout=0.3, timeout=50)


def test_bad_arguments() -> None:
    camera = SimulatedCamera(CONFIG)
    with pytest.raises(ValueError, match="module"):
        run_sender(camera, ["tcp://127.0.0.1:1"], 4)
    with pytest.raises(ValueError, match="threads"):
        run_sender(camera, ["tcp://127.0.0.1:1"], 0, threads=0)
    with pytest.raises(ValueError, match="rate"):
        run_sender(camera, ["tcp://127.0.0.1:1"], 0, rate=0.0)
    with pytest.raises(ValueError, match="realtime needs a rate"):
        run_sender(camera, ["tcp://127.0.0.1:1"], 0, realtime=True)
    with pytest.raises(ValueError, match="realtime needs a rate"):
        send_scan(CONFIG, ["tcp://127.0.0.1:1"], realtime=True)
    with pytest.raises(ValueError, match="garbage"):
        SenderFaults(garbage=-1)
