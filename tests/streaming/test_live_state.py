"""The live view's state and wire format: snapshots of two nodes add up, a stale or late snapshot never
replaces a newer or final one, malformed messages are refused with one clear error, and PNGs decode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from streaming.protocol import live as live_wire
from streaming.view.png import image_png
from streaming.view.state import ViewState


def snapshot(node: str, seq: int, value: int, final: bool = False, lo: int = 0, hi: int = 6) -> list:
    header = {
        "node": node, "node_index": 0, "n_nodes": 2, "scan_number": 3, "scan_key": "k3", "width": 3,
        "height": 2, "expected_frames": 6, "seq": seq, "final": final, "frames": 3, "sectors": 11,
        "events": 9, "geometry": {"cx": 288.0, "cy": 288.0, "bf_radius": 100.0, "adf_inner": 120.0,
        "adf_outer": 250.0}, "dropped_batches": 0, "dropped_snapshots": 0, "counted_at": 1.0,
        "oldest_at": 1.0, "lo": lo, "hi": hi,
    }  # fmt: skip
    n = hi - lo
    arrays = {k: np.full(n, value, np.int64) for k in ("counts", "bf", "adf", "sum_col", "sum_row")}
    arrays["frames"] = np.full(n, 1, np.int32)
    arrays["pattern"] = np.full(576 * 576, value, np.uint32)
    return live_wire.encode(live_wire.SNAP, header, arrays)


def apply(state: ViewState, parts: list) -> None:
    kind, header, arrays = live_wire.decode([bytes(memoryview(p)) for p in parts])
    assert kind == live_wire.SNAP
    state.apply(header, arrays)


def test_nodes_add_up_and_stale_snapshots_never_win():
    state = ViewState()
    apply(state, snapshot("a", 1, 2))
    apply(state, snapshot("b", 1, 5))
    apply(state, snapshot("a", 0, 100))  # older than what a already sent
    scan = state.scan("k3")
    np.testing.assert_array_equal(scan.merged().bf, np.full(6, 7))
    assert state.scans()[0]["status"] == "live" and state.scans()[0]["frames"] == 6
    apply(state, snapshot("a", 2, 3, final=True))
    apply(state, snapshot("b", 2, 4, final=True))
    apply(state, snapshot("b", 3, 50))  # after b's final: ignored
    summary = state.scans()[0]
    assert summary["status"] == "done" and summary["sectors_lost"] == 4 * 6 - 22
    np.testing.assert_array_equal(state.image("k3", "bf")[1], np.full((2, 3), 7.0))
    assert state.set_file("k3", "/x/FOURD_1.h5") and not state.set_file("k3", "/x/FOURD_1.h5")


def test_old_scans_keep_their_row_and_let_their_images_go():
    state = ViewState(keep_images=1)
    apply(state, snapshot("a", 0, 2))
    newer = snapshot("a", 0, 3)
    newer[1] = newer[1].replace(b"k3", b"k4")
    apply(state, newer)
    assert [s["images"] for s in state.scans()] == [False, True]
    with pytest.raises(KeyError):
        state.image("k3", "bf")
    assert state.image("k4", "bf")[1].sum() == 18
    apply(state, snapshot("b", 0, 5))  # a late node of the old scan: its numbers count, no images
    assert state.scans()[0]["frames"] == 6


def test_partial_ranges_and_pngs():
    state = ViewState()
    apply(state, snapshot("a", 0, 2, lo=0, hi=2))
    _, img = state.image("k3", "bf", masked=True)
    assert np.isnan(img[1]).all() and (img[0, :2] == 2).all()
    for name in ("bf", "com_x", "pattern", "frames"):
        png = image_png(state.image("k3", name, masked=True)[1], name)
        assert Image.open(io.BytesIO(png)).size in ((3, 2), (288, 288))


def test_malformed_messages_are_refused():
    with pytest.raises(live_wire.LiveWireError, match="kind and a header"):
        live_wire.decode([b"live.snap"])
    parts = snapshot("a", 0, 1)
    with pytest.raises(live_wire.LiveWireError, match="do not match"):
        live_wire.decode(parts[:-1])
    with pytest.raises(live_wire.LiveWireError, match="malformed"):
        live_wire.decode([b"live.snap", b"\xc1garbage"])
    bad = live_wire.encode(live_wire.SNAP, {"x": 1}, {"pattern": np.zeros(3, np.uint32)})
    bad[2] = np.zeros(2, np.uint32)
    with pytest.raises(live_wire.LiveWireError, match="header says 3"):
        live_wire.decode(bad)
