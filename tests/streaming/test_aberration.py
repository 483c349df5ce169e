"""The aberration message (tap.aberration) on loopback: a simulated 64x64 scan with a known defocus goes
through a node's LivePublisher to a real view with live.aberration on; the example client
(examples/aberration_client.py, its own decode) receives the fits during the scan and the final one, within
5 % of the simulated defocus; once the scan's file has the microscope's metadata the view fits it again in
nm and publishes a second, calibrated final message. Also: off loopback without keys no socket, the view
goes on; over CURVE only listed subscribers get messages; a subscription flood is refused, never
installed; the scale from the microscope's attributes equals the session analysis' calibration."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from counting.geometry import ScanShape
from counting.phase.fit import PX_UNITS
from counting.phase.scale import microscope_scale
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import CountedScan, write_counted_scan
from stemstream_testing.support import free_port
from streaming.live.publisher import LivePublisher
from streaming.protocol import control as p
from streaming.settings import LiveSettings
from streaming.transport.security import CurveServerConfig, write_keypair
from streaming.view.aberration import HEADER_FIELDS, AberrationOut
from streaming.view.server import LiveServer
from tasks.analysis.calibration import calibration_from_metadata

pytestmark = pytest.mark.timeout(120)
SIDE = 64
DEFOCUS = 0.05
LIVE = {"bf_center": (288.0, 288.0), "bf_radius": 180.0, "interval": 0.1, "phase_interval": 0.2}
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "aberration_client.py"
MICROSCOPE = {"step_x_angstrom": 2.0, "step_y_angstrom": 2.0, "convergence_semiangle_mrad": 18.0}


def _example():
    spec = importlib.util.spec_from_file_location("aberration_client", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


client = _example()


def _receive(sock: zmq.Socket, until, timeout: float) -> list[dict]:
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(got):
        if sock.poll(50):
            got.append(client.decode(sock.recv_multipart()))
    return got


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(messages received, the view) for one scan, then its file with the microscope's metadata."""
    config = SimulatorConfig(ScanShape(SIDE, SIDE), dose=200.0, seed=3, defocus=DEFOCUS)
    batches = list(SimulatedCamera(config).iter_counted(256))
    scan_dir = tmp_path_factory.mktemp("scans")
    port = free_port()
    live = LiveSettings(
        **LIVE, bind=f"tcp://127.0.0.1:{free_port()}", page_port=0, aberration=True, aberration_port=port
    )
    view = LiveServer(live, scan_dir=scan_dir).start()
    ctx = zmq.Context()
    sock = client.subscribe(ctx, f"tcp://127.0.0.1:{port}")
    node = LivePublisher(ctx, "n0", live, "tcp://127.0.0.1:1", None)
    key = "aberration-scan"
    try:
        time.sleep(0.2)  # the subscription reaches the view's socket
        node.begin(p.ScanBegin(7, SIDE, SIDE, SIDE * SIDE, 0, 1, scan_key=key))
        for batch in batches:
            node.batch(key, *batch)
            time.sleep(0.06)
        node.end(key)
        got = _receive(sock, lambda g: any(m["final"] for m in g), 30)
        _write(scan_dir / "scan_00007.h5", batches, key)  # as the session does: the file, its metadata
        got += _receive(sock, lambda g: any(m["final"] and m["calibrated"] for m in g), 30)
        yield got, view
    finally:
        node.close()
        sock.close(linger=0)
        ctx.term()
        view.stop()


def _write(path: Path, batches, key: str) -> None:
    events = np.empty((SIDE * SIDE, 1), object)
    masks = np.zeros((SIDE * SIDE, 1), np.uint8)
    for positions, batch_masks, offsets, indices in batches:
        for i, pos in enumerate(positions):
            events[pos, 0] = indices[offsets[i] : offsets[i + 1]]
            masks[pos, 0] = batch_masks[i]
    meta = {"stemstream": {"scan_number": 7, "scan_key": key}, "microscope": MICROSCOPE}
    write_counted_scan(path, CountedScan(ScanShape(SIDE, SIDE), events, masks, meta))


def test_the_example_client_receives_the_fits_and_the_final(published):
    got, _ = published
    finals = [m for m in got if m["final"]]
    assert got and not got[0]["final"], "no fit during the scan"
    assert set(HEADER_FIELDS) <= set(got[0]) and [m["seq"] for m in got] == sorted({m["seq"] for m in got})
    final = finals[0]
    assert final["scan_number"] == 7 and final["scan_key"] == "aberration-scan" and final["status"] == "ok"
    assert abs(final["defocus"] / DEFOCUS - 1) < 0.05, final
    assert 0 < final["defocus_err"] < 0.05 * DEFOCUS and final["positions"] == SIDE * (SIDE - 1)
    assert final["units"] == PX_UNITS and not final["calibrated"]
    assert "defocus" in client.describe(final) and "uncalibrated" in client.lens_action(final)
    assert client.lens_action(got[0]) is None  # provisional: nothing to do


def test_the_microscope_metadata_gives_a_calibrated_final_in_nm(published):
    got, view = published
    px, nm = [m for m in got if m["final"]][0], [m for m in got if m["final"] and m["calibrated"]][-1]
    step_nm, mrad_per_px = MICROSCOPE["step_x_angstrom"] / 10, MICROSCOPE["convergence_semiangle_mrad"] / 180
    assert nm["units"] == "nm" and nm["scan_step_nm"] == pytest.approx(step_nm)
    assert nm["mrad_per_px"] == pytest.approx(mrad_per_px)
    assert nm["defocus"] == pytest.approx(px["defocus"] * step_nm * 1000 / mrad_per_px, rel=1e-6)
    assert "would move the objective focus" in client.lens_action(nm)
    state = view.state.scan("aberration-scan").phase
    assert state["calibrated"] and not state["uncalibrated"] and state["units"] == "nm"


def test_off_loopback_without_keys_there_is_no_socket_and_the_view_goes_on(caplog):
    out = AberrationOut(LiveSettings(aberration=True, aberration_host="0.0.0.0", aberration_port=free_port()))
    try:
        assert out.publisher is None and out.address is None and "needs CURVE" in out.refused
        out.publish(1, "k", {"status": "ok", "final": True})  # nothing, no error
        assert "no aberration messages" in caplog.text
    finally:
        out.close()


def test_a_subscription_flood_is_refused_and_a_subscriber_still_gets_messages():
    port = free_port()
    out = AberrationOut(LiveSettings(aberration=True, aberration_port=port))
    ctx = zmq.Context()
    flood = ctx.socket(zmq.SUB)
    for n in range(500):
        flood.setsockopt(zmq.SUBSCRIBE, f"flood-{n}".encode())
    flood.connect(f"tcp://127.0.0.1:{port}")
    good = client.subscribe(ctx, f"tcp://127.0.0.1:{port}")
    try:
        got, deadline = [], time.monotonic() + 20
        while (not got or out.publisher.refused_subscriptions < 500) and time.monotonic() < deadline:
            out.publish(3, "k", {"status": "ok", "final": False, "defocus": 1.0, "fits": 1})
            got += _receive(good, lambda g: bool(g), 0.05)
        assert got and got[0]["defocus"] == 1.0 and out.publisher.refused_subscriptions >= 500
    finally:
        flood.close(linger=0)
        good.close(linger=0)
        ctx.term()
        out.close()


def test_over_curve_only_listed_subscribers_get_messages(tmp_path):
    """With live.tap_curve (always off loopback) the socket is a CURVE server with the view's keys: the
    example client with a key in live.tap_clients receives; a stranger's key or plaintext gets nothing."""
    keys = {name: write_keypair(tmp_path, name) for name in ("server", "node", "lens", "stranger")}
    view_curve = CurveServerConfig.from_files(keys["server"][1], [keys["node"][0]])
    port = free_port()
    live = LiveSettings(aberration=True, aberration_port=port, tap_curve=True, tap_clients=[keys["lens"][0]])
    out = AberrationOut(live, view_curve)
    ctx = zmq.Context()
    address = f"tcp://127.0.0.1:{port}"
    subs = {
        "lens": client.subscribe(ctx, address, str(keys["server"][0]), str(keys["lens"][1])),
        "stranger": client.subscribe(ctx, address, str(keys["server"][0]), str(keys["stranger"][1])),
        "plain": client.subscribe(ctx, address),
    }
    try:
        assert out.refused is None and out.publisher is not None
        got = {who: [] for who in subs}
        deadline, settle = time.monotonic() + 20, None
        while time.monotonic() < (settle or deadline):
            out.publish(5, "k", {"status": "ok", "final": True, "defocus": 2.0})
            for who, sock in subs.items():
                while sock.poll(0):
                    got[who].append(client.decode(sock.recv_multipart()))
            if settle is None and got["lens"]:
                settle = time.monotonic() + 1.0  # a while longer for the others
            time.sleep(0.02)
        assert got["lens"] and got["lens"][0]["defocus"] == 2.0
        assert got["stranger"] == [] and got["plain"] == []
    finally:
        for sock in subs.values():
            sock.close(linger=0)
        ctx.term()
        out.close()


@pytest.mark.parametrize(
    "attrs",
    [
        MICROSCOPE,
        {**MICROSCOPE, "step_y_angstrom": 3.0},
        {**MICROSCOPE, "haadf_shape": [SIDE, 2 * (SIDE - 1)]},
        {"step_x_angstrom": 2.0},
        {},
    ],
)
def test_the_scale_is_the_session_analysis_calibration(attrs):
    cal = calibration_from_metadata(attrs, SIDE, SIDE - 1, True)
    scale = microscope_scale(attrs, SIDE, 180.0)
    if not cal.calibrated:
        assert scale is None
    else:
        assert scale == pytest.approx((cal.step_angstrom / 10, cal.convergence_semiangle_mrad / 180.0))
