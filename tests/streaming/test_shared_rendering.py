"""One simulated camera rendered once for four module senders: the same sectors as the camera's own,
bounded memory, no sender held back by one that stops, and whole scans through real sockets."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import zmq

from counting.geometry import N_SECTORS, ScanShape
from counting.simulator import SimulatedCamera, SimulatorConfig
from streaming.camera.receivers import send_simulated_scan
from streaming.camera.rendering import SharedRendering
from streaming.protocol.sector import decode_message

pytestmark = pytest.mark.timeout(60)

CONFIG = SimulatorConfig(scan=ScanShape(9, 7), pool_size=8, seed=5, frame_number_start=10)


def test_each_module_gets_the_cameras_own_sectors_in_order() -> None:
    shared = SharedRendering(SimulatedCamera(CONFIG), batch_size=4)
    reference = SimulatedCamera(CONFIG)

    def collect(module: int) -> list[tuple[int, int, bytes]]:
        return [(n, pos, sector.tobytes()) for n, pos, sector in shared.sectors(module)]

    with ThreadPoolExecutor(N_SECTORS) as pool:
        got = list(pool.map(collect, range(N_SECTORS)))
    for module in range(N_SECTORS):
        want = [(n, p, s.tobytes()) for n, p, _, s in reference.iter_sectors(module=module)]
        assert got[module] == want
    assert len(got[0]) == CONFIG.scan.positions


def test_no_sender_runs_more_than_ahead_batches_before_the_slowest() -> None:
    shared = SharedRendering(SimulatedCamera(CONFIG), ahead=2, batch_size=4)
    fast = shared.sectors(0)
    slow = [shared.sectors(m) for m in range(1, N_SECTORS)]
    for it in slow:
        next(it)  # every other sender is in batch 0
    taken = []
    done = threading.Event()

    def run() -> None:
        for item in fast:
            taken.append(item[0])
        done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert not done.wait(1.0)  # held back: it may not render batch 2 while the others are in batch 0
    assert len(taken) == 2 * 4 and len(shared._window) <= 2
    for it in slow:  # the others stop early: the fast one is released and finishes the scan
        it.close()
    assert done.wait(10)
    assert len(taken) == CONFIG.scan.positions


def test_four_threads_send_a_whole_scan_once_rendered() -> None:
    ctx = zmq.Context()
    try:
        pull = ctx.socket(zmq.PULL)
        pull.linger = 0
        endpoint = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
        camera = SimulatedCamera(CONFIG)
        results = send_simulated_scan(camera, [endpoint], send_timeout=10)
        got = {}
        for _ in range(N_SECTORS * CONFIG.scan.positions):
            assert pull.poll(5000)
            header, payload = decode_message(pull.recv_multipart())
            got[(header.frame_number, header.module)] = bytes(payload)
        assert [r.sent for r in results] == [CONFIG.scan.positions] * N_SECTORS
        for n in camera.frame_numbers:
            frame = np.concatenate(
                [np.frombuffer(got[(n, m)], np.uint16).reshape(144, 576) for m in range(N_SECTORS)]
            )
            assert np.array_equal(frame, SimulatedCamera(CONFIG).frame(n))
    finally:
        ctx.destroy(linger=0)
