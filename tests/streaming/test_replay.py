"""Replay of a written scan through the live images (streaming.live.replay): the images the replay's page
serves equal, value for value, those the live page served while two real nodes counted the same scan; a
file with missing and incomplete frames (and two frames at a position) is replayed as it is and reported;
the geometry is estimated from the scan's first frames as a node does; --rate paces."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from counting.geometry import ScanShape
from counting.kernel import Thresholds
from counting.live_images import estimate_geometry
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import CountedScan, write_counted_scan
from stemstream_testing.live_oracle import live_sums_from_file
from stemstream_testing.support import free_port
from streaming.camera.rendering import SharedRendering
from streaming.camera.sender import run_sender
from streaming.live import replay as rp
from streaming.settings import LiveSettings
from streaming.view.server import LiveServer
from tests.streaming.harness import start_session

pytestmark = pytest.mark.timeout(120)
GEOMETRY = {"bf_center": (288.0, 288.0), "bf_radius": 180.0}
IMAGES = ("bf", "adf", "com_x", "com_y", "pattern", "frames")


def wait_for(check, timeout: float, what: str):
    """Poll check() until it returns something true (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.02)
    raise TimeoutError(what)


def served(view: LiveServer, key: str) -> dict[str, np.ndarray]:
    """The scan's images as the page serves them (GET /api/scans/KEY/NAME.json)."""
    out = {}
    for name in IMAGES:
        url = f"http://127.0.0.1:{view.port}/api/scans/{key}/{name}.json"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        out[name] = np.array(body["values"]).reshape(body["shape"])
    return out


def done_scan(view: LiveServer, key: str | None = None) -> str:
    """The key of the (given) scan once the view holds its final snapshots."""
    found = wait_for(
        lambda: [s for s in view.state.scans() if s["status"] == "done" and key in (None, s["key"])],
        30,
        "a scan done in the view",
    )
    return found[0]["key"]


def replayed(path: Path, live: LiveSettings, rate: float = 0.0) -> tuple[LiveServer, str, rp.ReplayProgress]:
    """Replay a file into a view of its own (started; the caller stops it), as `stemstream replay` does."""
    view = LiveServer(live.model_copy(update={"bind": "tcp://127.0.0.1:*", "page_port": 0})).start()
    try:
        source = rp.ScanSource(path)
        key = rp.replay_key(source)
        with rp.publisher(live, view.ingest.address) as pub:
            result = rp.replay(source, [pub], key, rate, first=live.estimate_frames)
        source.close()
        done_scan(view, key)
    except BaseException:
        view.stop()
        raise
    return view, key, result


@pytest.fixture(scope="module")
def live_run(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray], dict]:
    """A 16x12 scan counted by two real nodes (threads) with their live view: its file, the images the
    view served at its end, and its summary."""
    tmp = tmp_path_factory.mktemp("live")
    bind = f"tcp://127.0.0.1:{free_port()}"
    live = {**GEOMETRY, "bind": bind, "connect": bind, "interval": 0.05}
    view = LiveServer(LiveSettings(**live, page_port=0)).start()
    try:
        session = start_session(tmp, n_nodes=2, fixed=Thresholds(30.5, 600.0), node_overrides={"live": live})
        try:
            shared = SharedRendering(SimulatedCamera(SimulatorConfig(ScanShape(16, 12), seed=5)))
            with ThreadPoolExecutor(4) as ex:  # the four modules, from one camera rendered once
                sent = ex.map(
                    lambda m: run_sender(shared, session.aggregator.receiver_endpoints, m, scan_number=1),
                    range(4),
                )
                assert all(r.sent for r in sent)
            path = session.wait_for_file(1)
            key = done_scan(view)
            return path, served(view, key), view.state.scan(key).summary()
        finally:
            session.close()
    finally:
        view.stop()


def test_replay_serves_the_live_images(live_run):
    path, live_images, live_summary = live_run
    assert live_summary["nodes"] == 2 and live_summary["frames"] == 192
    view, key, result = replayed(path, LiveSettings(**GEOMETRY))
    try:
        assert (result.frames, result.total_frames, result.stopped) == (192, 192, False)
        again = served(view, key)
        for name in IMAGES:
            np.testing.assert_array_equal(again[name], live_images[name], err_msg=name)
        assert live_images["bf"].any() and live_images["com_x"].any()
        summary = view.state.scan(key).summary()
        assert summary["completeness"] == live_summary["completeness"] == 1.0
        assert (summary["frames"], summary["events"]) == (192, live_summary["events"])
    finally:
        view.stop()


def gappy_scan(path: Path) -> Path:
    """A 12x10 scan with a position without a frame, two incomplete frames, and two frames at position 3
    (k = 2: every other position's second slot empty)."""
    rng = np.random.default_rng(9)
    w, h = 12, 10
    events = np.empty((w * h, 2), object)
    masks = np.zeros((w * h, 2), np.uint8)
    for p in range(w * h):
        for j in range(2 if p == 3 else 1):
            row = np.clip(rng.normal(280, 50, 80), 0, 575).astype(np.int64)
            col = np.clip(rng.normal(300, 50, 80), 0, 575).astype(np.int64)
            events[p, j] = (row * 576 + col).astype(np.uint32)
            masks[p, j] = 15
        if p != 3:
            events[p, 1] = np.empty(0, np.uint32)
    events[5, 0], masks[5, 0] = np.empty(0, np.uint32), 0
    masks[7, 0], masks[8, 0] = 0b0111, 0b0001
    return write_counted_scan(
        path, CountedScan(ScanShape(w, h), events, masks, {"stemstream": {"scan_number": 4}})
    )


def test_missing_frames_are_replayed_as_they_are_and_reported(tmp_path: Path):
    path = gappy_scan(tmp_path / "gappy.h5")
    source = rp.ScanSource(path)
    report = source.report()
    source.close()
    assert report == {
        "positions": 120,
        "frames": 120,  # 119 positions' first frames and position 3's second
        "positions_without_frame": 1,
        "incomplete_frames": 2,
        "sectors_lost": 4 * 240 - 4 * 120 + 1 + 3,
    }
    view, key, result = replayed(path, LiveSettings(**GEOMETRY))
    try:
        assert result.frames == 120 and result.stray_events == 0
        scan = view.state.scan(key)
        g = scan.geometry()
        want = live_sums_from_file(path, g.cx, g.cy, g.bf_radius, g.adf_inner, g.adf_outer)
        merged = scan.merged()
        for name in ("counts", "bf", "adf", "sum_col", "sum_row", "frames", "pattern"):
            np.testing.assert_array_equal(getattr(merged, name), want[name], err_msg=name)
        assert merged.frames[3] == 2 and merged.frames[5] == 0
        summary = scan.summary()
        assert summary["scan_number"] == 4 and summary["sectors_lost"] == report["sectors_lost"]
    finally:
        view.stop()


def test_geometry_estimated_from_the_first_frames_as_a_node_does(tmp_path: Path):
    path = gappy_scan(tmp_path / "gappy.h5")
    view, key, _ = replayed(path, LiveSettings(estimate_frames=16))
    try:
        source = rp.ScanSource(path)
        first = next(source.batches(first=16))
        source.close()
        pattern = np.bincount(first.indices.astype(np.int64), minlength=576 * 576)
        assert view.state.scan(key).geometry() == estimate_geometry(pattern)
    finally:
        view.stop()


def test_rate_paces_and_stop_ends_early(tmp_path: Path):
    path = gappy_scan(tmp_path / "gappy.h5")
    source = rp.ScanSource(path)
    taken: list[int] = []

    class Sink:
        def begin(self, begin):
            taken.append(-begin.scan_width)

        def batch(self, key, positions, masks, offsets, indices):
            taken.extend(positions.tolist())

        def end(self, key):
            taken.append(-1)

    started = time.monotonic()
    result = rp.replay(source, [Sink()], "k", rate=400.0)
    assert time.monotonic() - started >= 0.9 * 120 / 400  # paced: never faster than asked
    assert taken[0] == -12 and taken[-1] == -1 and taken[1:-1] == sorted(taken[1:-1])  # scan order
    assert result.frames == 120 and len(taken) == 122

    stop = threading.Event()
    stop.set()
    taken.clear()
    result = rp.replay(source, [Sink()], "k", rate=0.0, stop=stop)
    source.close()
    assert result.stopped and result.frames == 0 and taken == [-12, -1]  # the scan still ends in the view
