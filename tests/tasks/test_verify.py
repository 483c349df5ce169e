"""tasks.verify: real counted files from the simulator pass; each kind of damage is named in ``problems``."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from counting.geometry import ALL_SECTORS, ScanShape
from counting.kernel import Thresholds
from counting.pipeline import count_batches
from counting.simulator import SimulatedCamera, SimulatorConfig
from counting.sparse import CountedScan, write_counted_scan
from stemstream_testing.options import options
from streaming.protocol.record import ScanRecord, ScanStatus, record_path
from tasks.verify import VerifyResult, file_sha256, verify_scan, verify_scans

WIDTH, HEIGHT = 64, 48
# Fixed thresholds (the simulator's read noise is 2.4 ADU, an electron ~200 ADU): no estimation, fast.
OPTIONS = options(fixed=Thresholds(12.0, 2000.0), workers=2)


def _count(width: int, height: int, dose: float, seed: int) -> CountedScan:
    camera = SimulatedCamera(SimulatorConfig(ScanShape(width, height), dose=dose, seed=seed, pool_size=64))
    return count_batches(camera.iter_batches(64), camera.scan, camera.dark(), OPTIONS)


def _write_record(path: Path, scan: CountedScan) -> None:
    """The writer's stop record for a scan file, with the file's checksum."""
    record = ScanRecord(
        scan_number=1,
        status=ScanStatus.COMPLETE,
        path=str(path),
        scan_width=scan.scan.width,
        scan_height=scan.scan.height,
        expected_frames=scan.sector_masks.size,
        frames_written=scan.num_frames,
        complete_frames=scan.complete_frames,
        completeness=scan.completeness,
        events=scan.num_events,
        nodes=1,
        nodes_done=1,
        reasons=["complete"],
        sectors_lost_in_transit=0,
        thresholds=[12.0, 2000.0],
        sha256=file_sha256(path),
    )
    record.save(record_path(path))


@pytest.fixture(scope="module")
def counted() -> CountedScan:
    return _count(WIDTH, HEIGHT, dose=100.0, seed=7)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory: pytest.TempPathFactory, counted: CountedScan) -> Path:
    d = tmp_path_factory.mktemp("good")
    path = write_counted_scan(d / "FOURD_000001.h5", counted)
    _write_record(path, counted)
    return d


@pytest.fixture
def good(tmp_path: Path, good_dir: Path) -> Path:
    """A private copy of the good file and its stop record, free to damage."""
    for item in good_dir.iterdir():
        shutil.copy(item, tmp_path / item.name)
    return tmp_path / "FOURD_000001.h5"


def _fails_with(result: VerifyResult, *fragments: str) -> None:
    assert not result.ok and result.status == "failed"
    text = " | ".join(result.problems)
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in problems: {text}"


def test_good_file_passes_with_matching_record(good: Path, counted: CountedScan) -> None:
    t0 = time.perf_counter()
    r = verify_scan(good, WIDTH, HEIGHT)
    elapsed = time.perf_counter() - t0
    assert r.ok and r.status == "passed" and r.problems == []
    assert (r.scan_width, r.scan_height) == (WIDTH, HEIGHT)
    assert r.frames == r.complete_frames == WIDTH * HEIGHT
    assert r.completeness == 1.0
    assert r.events == counted.num_events and r.events_per_frame == pytest.approx(
        counted.num_events / r.frames
    )
    assert 80 < r.events_per_frame < 120  # dose 100
    assert r.sha256 == file_sha256(good) and len(r.sha256) == 64
    assert r.checksum_matches_record is True
    assert elapsed < 1.0  # a 64x48 scan; in practice ~0.02 s
    assert r.as_dict()["path"] == str(good)


def test_without_record_the_checksum_is_not_judged(good: Path) -> None:
    record_path(good).unlink()
    r = verify_scan(good)
    assert r.ok and r.checksum_matches_record is None and r.sha256 is not None


def test_missing_file(tmp_path: Path) -> None:
    r = verify_scan(tmp_path / "nothing.h5")
    _fails_with(r, "file missing")
    assert r.sha256 is None


def test_truncated_file(good: Path) -> None:
    size = good.stat().st_size
    with open(good, "r+b") as fh:
        fh.truncate(size // 2)
    r = verify_scan(good)
    _fails_with(r, "not a readable HDF5 file", "truncated", "checksum mismatch")
    assert r.checksum_matches_record is False


def test_garbage_bytes(tmp_path: Path) -> None:
    path = tmp_path / "garbage.h5"
    path.write_bytes(np.random.default_rng(0).bytes(50_000))
    _fails_with(verify_scan(path), "not a readable HDF5 file")


@pytest.mark.parametrize(
    "dataset",
    ["electron_events/frames", "electron_events/scan_positions"],
)
def test_missing_dataset(good: Path, dataset: str) -> None:
    with h5py.File(good, "a") as f:
        del f[dataset]
    _fails_with(verify_scan(good), f"missing dataset /{dataset}")


def test_missing_group(good: Path) -> None:
    with h5py.File(good, "a") as f:
        del f["electron_events"]
    _fails_with(verify_scan(good), "missing group /electron_events")


@pytest.mark.parametrize("version", [2, 4])
def test_wrong_version(good: Path, version: int) -> None:
    with h5py.File(good, "a") as f:
        f.attrs["version"] = version
    _fails_with(verify_scan(good), f"version={version}", "expected 3")


def test_missing_version(good: Path) -> None:
    with h5py.File(good, "a") as f:
        del f.attrs["version"]
    _fails_with(verify_scan(good), "'version' is missing")


def test_missing_scan_attrs(good: Path) -> None:
    with h5py.File(good, "a") as f:
        del f["electron_events/scan_positions"].attrs["Ny"]
    _fails_with(verify_scan(good), "positive integer attrs Nx, Ny")


def test_wrong_frame_shape_attrs(good: Path) -> None:
    with h5py.File(good, "a") as f:
        f["electron_events/frames"].attrs["Nx"] = 512
    _fails_with(verify_scan(good), "frames attrs Nx=512")


def test_frames_not_divisible_by_positions(good: Path) -> None:
    with h5py.File(good, "a") as f:  # the writer makes fixed-size datasets, so rebuild a longer one
        data = f["electron_events/frames"][()]
        del f["electron_events/frames"]
        longer = np.empty(len(data) + 5, object)
        longer[: len(data)] = data
        for i in range(len(data), len(longer)):
            longer[i] = np.empty(0, np.uint32)
        ds = f.create_dataset("electron_events/frames", (len(longer),), dtype=h5py.vlen_dtype(np.uint32))
        ds[...] = longer
        ds.attrs["Nx"] = ds.attrs["Ny"] = 576
    _fails_with(verify_scan(good), "do not divide into")


def test_event_index_outside_frame(good: Path) -> None:
    with h5py.File(good, "a") as f:
        frames = f["electron_events/frames"]
        frames[3] = np.array([5, 576 * 576 + 10], np.uint32)
    _fails_with(verify_scan(good), f"event index {576 * 576 + 10} is outside")


def test_wrong_mask_shape(good: Path) -> None:
    with h5py.File(good, "a") as f:
        del f["electron_events/sector_masks"]
        f["electron_events/sector_masks"] = np.full((WIDTH * HEIGHT, 2), ALL_SECTORS, np.uint8)
    _fails_with(verify_scan(good), "sector_masks has shape")


def test_stempy_file_without_masks_is_complete(good: Path) -> None:
    record_path(good).unlink()
    with h5py.File(good, "a") as f:
        del f["electron_events/sector_masks"]
    r = verify_scan(good)
    assert r.ok and r.completeness == 1.0 and r.frames == WIDTH * HEIGHT


@pytest.mark.parametrize(("width", "height"), [(32, 32), (HEIGHT, WIDTH)])
def test_wrong_scan_shape_expected(good: Path, width: int, height: int) -> None:
    r = verify_scan(good, width, height)
    _fails_with(r, f"scan shape {WIDTH}x{HEIGHT} does not match the expected {width}x{height}")
    assert r.checksum_matches_record is True  # the file itself is fine


def test_only_width_expected(good: Path) -> None:
    assert verify_scan(good, expected_width=WIDTH).ok
    _fails_with(verify_scan(good, expected_width=WIDTH + 1), "does not match the expected")


def test_incomplete_scan_against_threshold(tmp_path: Path, counted: CountedScan) -> None:
    masks = counted.sector_masks.copy()
    masks[:100, 0] = 0b0111  # 100 frames lost one sector each
    masks[100:110, 0] = 0  # 10 frames never arrived
    partial = CountedScan(counted.scan, counted.events, masks, counted.metadata)
    path = write_counted_scan(tmp_path / "partial.h5", partial)
    expected = 1 - (100 * 0.25 + 10) / (WIDTH * HEIGHT)

    strict = verify_scan(path)
    _fails_with(strict, "completeness", "below the required 100.00 %")
    assert strict.completeness == pytest.approx(expected)
    assert strict.frames == WIDTH * HEIGHT - 10
    assert strict.complete_frames == WIDTH * HEIGHT - 110

    lenient = verify_scan(path, min_completeness=0.9)
    assert lenient.ok and lenient.problems == []


def test_checksum_mismatch_after_modification(good: Path) -> None:
    with h5py.File(good, "a") as f:  # a change that keeps the layout valid: only the checksum can tell
        f["metadata"].attrs["tampered"] = 1
    r = verify_scan(good)
    _fails_with(r, "checksum mismatch")
    assert r.problems == [p for p in r.problems if "checksum" in p]
    assert r.checksum_matches_record is False


def test_unreadable_record(good: Path) -> None:
    record_path(good).write_text("{not json")
    _fails_with(verify_scan(good), "stop record", "unreadable")


def test_verify_scans_keeps_order(good: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    results = verify_scans([good, bad, tmp_path / "absent.h5"], WIDTH, HEIGHT)
    assert [r.path for r in results] == [good, bad, tmp_path / "absent.h5"]
    assert [r.ok for r in results] == [True, False, False]
