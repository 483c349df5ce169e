"""Raw 4D Camera sector files: round trips, stempy's layout, missing sectors and garbled input."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from counting.geometry import ALL_SECTORS, FRAME_SHAPE, SECTOR_ROWS, FrameBatch, ScanShape
from counting.raw import (
    BLOCK_BYTES,
    RawFormatError,
    block_dtype,
    open_raw_scan,
    raw_file_name,
    write_raw_scan,
)


def random_frames(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << 16, size=(n, *FRAME_SHAPE), dtype=np.uint16)


def batches_of(
    frames: np.ndarray,
    numbers: np.ndarray,
    positions: np.ndarray,
    masks: np.ndarray | None = None,
    size: int = 5,
) -> list[FrameBatch]:
    """Split frames into FrameBatches of `size` (an awkward size, so writing crosses batch boundaries)."""
    masks = np.full(len(frames), ALL_SECTORS, dtype=np.uint8) if masks is None else masks
    return [
        FrameBatch(frames[s : s + size], numbers[s : s + size], positions[s : s + size], masks[s : s + size])
        for s in range(0, len(frames), size)
    ]


def read_all(paths: list[Path], version: int | None = None, batch_size: int = 64) -> FrameBatch:
    """Read a whole scan back as one FrameBatch."""
    got = list(open_raw_scan(paths, version=version).iter_batches(batch_size))
    return FrameBatch(
        frames=np.concatenate([b.frames for b in got]),
        frame_numbers=np.concatenate([b.frame_numbers for b in got]),
        positions=np.concatenate([b.positions for b in got]),
        sector_masks=np.concatenate([b.sector_masks for b in got]),
    )


def two_pass_scan(first_frame: int, scan: ScanShape, passes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Frame numbers and positions of a scan visited `passes` times (several frames per position)."""
    numbers = np.arange(first_frame, first_frame + passes * scan.positions, dtype=np.int64)
    return numbers, (numbers - first_frame) % scan.positions


def without_zeroed_sectors(frames: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """What a reader must return for v5: sectors whose bit is clear are zero."""
    expected = frames.copy()
    for module in range(4):
        missing = (masks.astype(np.int64) >> module) & 1 == 0
        expected[missing, module * SECTOR_ROWS : (module + 1) * SECTOR_ROWS] = 0
    return expected


@pytest.fixture(scope="module")
def scan_4x3(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], np.ndarray]:
    """A complete v5 4x3 scan, one frame per position, frame numbers from 1."""
    frames = random_frames(7, 12)
    numbers = np.arange(1, 13, dtype=np.int64)
    paths = write_raw_scan(
        tmp_path_factory.mktemp("scan"), 42, ScanShape(4, 3), batches_of(frames, numbers, numbers - 1)
    )
    return paths, frames


# ---- round trips ------------------------------------------------------------------------------------


def test_raw_file_name_is_the_production_pattern() -> None:
    assert raw_file_name(17, 2) == "data_scan0000000017_module2_dst0_file0.data"
    assert raw_file_name(17, 3, 4) == "data_scan0000000017_module3_dst0_file4.data"


@pytest.mark.parametrize("version", [4, 5])
@pytest.mark.parametrize("first_frame", [0, 1])
@pytest.mark.parametrize("files_per_module", [1, 3])
def test_round_trip_two_frames_per_position(
    tmp_path: Path, version: int, first_frame: int, files_per_module: int
) -> None:
    scan = ScanShape(3, 2)
    numbers, positions = two_pass_scan(first_frame, scan)
    frames = random_frames(version * 10 + first_frame, len(numbers))
    paths = write_raw_scan(
        tmp_path,
        9,
        scan,
        batches_of(frames, numbers, positions),
        version=version,
        files_per_module=files_per_module,
    )
    assert sorted(p.name for p in paths) == sorted(
        raw_file_name(9, m, k) for m in range(4) for k in range(files_per_module)
    )
    assert all(p.stat().st_size % BLOCK_BYTES == 0 for p in paths)

    raw = open_raw_scan(paths, version=version)
    assert (raw.scan_number, raw.scan_shape, raw.num_frames, raw.frames_per_position) == (9, scan, 12, 2)
    assert raw.incomplete_frames.size == 0 and raw.missing_positions.size == 0
    assert raw.sector_count == raw.expected_sector_count == 48
    assert raw.summary()["files"] == 4 * files_per_module

    got = read_all(paths, version=version)
    np.testing.assert_array_equal(got.frame_numbers, numbers)
    np.testing.assert_array_equal(got.positions, positions)
    np.testing.assert_array_equal(got.sector_masks, ALL_SECTORS)
    assert np.array_equal(got.frames, frames)


def test_v4_files_read_as_v5_are_scrambled(tmp_path: Path) -> None:
    # The format version is not in the file; reading with the wrong one must at least not match.
    frames = random_frames(3, 2)
    numbers = np.arange(2, dtype=np.int64)
    paths = write_raw_scan(tmp_path, 1, ScanShape(2, 1), batches_of(frames, numbers, numbers), version=4)
    assert open_raw_scan(paths).version == 5
    assert not np.array_equal(read_all(paths).frames, frames)
    assert np.array_equal(read_all(paths, version=4).frames, frames)


@pytest.mark.parametrize("batch_size", [1, 7, 12, 100])
def test_batch_sizes_give_the_same_frames(scan_4x3: tuple[list[Path], np.ndarray], batch_size: int) -> None:
    paths, frames = scan_4x3
    batches = list(open_raw_scan(paths).iter_batches(batch_size))
    assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert sum(len(b) for b in batches) == 12
    assert np.array_equal(np.concatenate([b.frames for b in batches]), frames)
    np.testing.assert_array_equal(np.concatenate([b.positions for b in batches]), np.arange(12))


def test_reused_buffer_gives_the_same_frames(scan_4x3: tuple[list[Path], np.ndarray]) -> None:
    paths, frames = scan_4x3
    copies = [b.frames.copy() for b in open_raw_scan(paths).iter_batches(5, reuse_buffer=True)]
    assert np.array_equal(np.concatenate(copies), frames)


def test_files_may_be_given_in_any_order(scan_4x3: tuple[list[Path], np.ndarray]) -> None:
    paths, frames = scan_4x3
    assert np.array_equal(read_all(paths[::-1]).frames, frames)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 3),
    height=st.integers(1, 3),
    passes=st.integers(1, 2),
    first_frame=st.integers(0, 5),
    files_per_module=st.integers(1, 3),
    seed=st.integers(0, 2**32 - 1),
    batch_size=st.integers(1, 8),
)
def test_round_trip_with_random_missing_sectors(
    width: int, height: int, passes: int, first_frame: int, files_per_module: int, seed: int, batch_size: int
) -> None:
    scan = ScanShape(width, height)
    numbers, positions = two_pass_scan(first_frame, scan, passes)
    rng = np.random.default_rng(seed)
    masks = np.where(rng.random(len(numbers)) < 0.3, rng.integers(1, ALL_SECTORS, len(numbers)), ALL_SECTORS)
    masks = masks.astype(np.uint8)
    frames = random_frames(seed, len(numbers))
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_raw_scan(
            tmp, 5, scan, batches_of(frames, numbers, positions, masks, 3), files_per_module=files_per_module
        )
        raw = open_raw_scan(paths)
        got = read_all(paths, batch_size=batch_size)
    np.testing.assert_array_equal(got.frame_numbers, numbers)
    np.testing.assert_array_equal(got.sector_masks, masks)
    np.testing.assert_array_equal(raw.incomplete_frames, numbers[masks != ALL_SECTORS])
    assert raw.sector_count == sum(bin(int(m)).count("1") for m in masks)
    assert np.array_equal(got.frames, without_zeroed_sectors(frames, masks))


# ---- stempy agrees on the layout ---------------------------------------------------------------------


def test_v5_layout_matches_stempy_multi_pass(scan_4x3: tuple[list[Path], np.ndarray]) -> None:
    stempy_io = pytest.importorskip("stempy.io")
    paths, frames = scan_4x3
    reader = stempy_io.reader(
        [str(p) for p in paths], version=stempy_io.FileVersion.VERSION5, backend="multi-pass"
    )
    assert tuple(reader.scan_shape) == (3, 4)  # stempy's shape is (height, width)
    for y in range(3):
        for x in range(4):
            (block,) = reader.read_frames((y, x))
            assert np.array_equal(block.data, frames[y * 4 + x]), (y, x)


def test_missing_sector_and_two_files_match_stempy_multi_pass(tmp_path: Path) -> None:
    stempy_io = pytest.importorskip("stempy.io")
    scan = ScanShape(3, 2)
    numbers, positions = two_pass_scan(0, scan)
    masks = np.full(len(numbers), ALL_SECTORS, dtype=np.uint8)
    masks[4] = 0b1011
    frames = random_frames(11, len(numbers))
    paths = write_raw_scan(
        tmp_path, 3, scan, batches_of(frames, numbers, positions, masks), files_per_module=2
    )
    ours = read_all(paths)
    reader = stempy_io.reader([str(p) for p in paths], version=5, backend="multi-pass")
    for position in range(scan.positions):
        theirs = [b.data for b in reader.read_frames(position)]  # ascending frame number, as ours
        mine = ours.frames[ours.positions == position]
        assert len(theirs) == len(mine) == 2
        assert all(np.array_equal(a, b) for a, b in zip(theirs, mine, strict=True)), position


def test_v4_layout_matches_stempy_sector_reader(tmp_path: Path) -> None:
    stempy_io = pytest.importorskip("stempy.io")
    frames = random_frames(5, 2)
    numbers = np.arange(2, dtype=np.int64)
    paths = write_raw_scan(tmp_path, 1, ScanShape(2, 1), batches_of(frames, numbers, numbers), version=4)
    reader = stempy_io.reader([str(p) for p in paths], version=stempy_io.FileVersion.VERSION4)
    seen = 0
    for block in reader:
        for data, image_number in zip(block.data, block.header.image_numbers, strict=True):
            assert np.array_equal(data, frames[image_number])
            seen += 1
    assert seen == 2
    assert np.array_equal(read_all(paths, version=4).frames, frames)


# ---- missing data --------------------------------------------------------------------------------------


def test_missing_sector_is_zero_flagged_and_listed(tmp_path: Path) -> None:
    frames = random_frames(13, 12)
    numbers = np.arange(1, 13, dtype=np.int64)
    masks = np.full(12, ALL_SECTORS, dtype=np.uint8)
    masks[5] = 0b1011  # module 2's block of frame 6 never written
    paths = write_raw_scan(tmp_path, 2, ScanShape(4, 3), batches_of(frames, numbers, numbers - 1, masks))
    raw = open_raw_scan(paths)
    np.testing.assert_array_equal(raw.incomplete_frames, [6])
    assert (raw.sector_count, raw.expected_sector_count) == (47, 48)
    assert (raw.summary()["complete"], raw.summary()["incomplete"]) == (11, 1)

    got = read_all(paths, batch_size=4)
    assert got.sector_masks[5] == 0b1011
    assert not got.frames[5, 288:432].any()
    assert np.array_equal(got.frames[5, :288], frames[5, :288])
    assert np.array_equal(got.frames[5, 432:], frames[5, 432:])
    assert np.array_equal(np.delete(got.frames, 5, axis=0), np.delete(frames, 5, axis=0))


def test_missing_sector_is_zeroed_in_a_reused_buffer(tmp_path: Path) -> None:
    frames = random_frames(17, 4)
    numbers = np.arange(4, dtype=np.int64)
    masks = np.array([ALL_SECTORS, ALL_SECTORS, 0b0111, ALL_SECTORS], dtype=np.uint8)
    paths = write_raw_scan(tmp_path, 2, ScanShape(2, 2), batches_of(frames, numbers, numbers, masks))
    copies = [b.frames.copy() for b in open_raw_scan(paths).iter_batches(2, reuse_buffer=True)]
    assert np.array_equal(np.concatenate(copies), without_zeroed_sectors(frames, masks))


def test_missing_positions_and_empty_module_files(tmp_path: Path) -> None:
    frames = random_frames(19, 3)
    numbers = np.array([0, 1, 3], dtype=np.int64)
    positions = np.array([0, 1, 3], dtype=np.int64)  # position 2 never arrives
    masks = np.full(3, 0b0111, dtype=np.uint8)  # module 3 never sends anything: its file stays empty
    paths = write_raw_scan(tmp_path, 2, ScanShape(2, 2), batches_of(frames, numbers, positions, masks))
    raw = open_raw_scan(paths)
    np.testing.assert_array_equal(raw.missing_positions, [2])
    np.testing.assert_array_equal(raw.incomplete_frames, numbers)
    assert raw.summary()["positions_missing"] == 1
    assert (raw.sector_count, raw.expected_sector_count) == (9, 16)


# ---- garbled input ------------------------------------------------------------------------------------


def header_block(
    *, scan_number: int = 1, frame: int = 0, width: int = 2, height: int = 2, x: int = 0, y: int = 0
) -> bytes:
    """One v5 block with the given header and a zero sector."""
    block = np.zeros(1, dtype=block_dtype(5))
    fields = {"scan_number": scan_number, "frame_number": frame, "scan_width": width, "scan_height": height}
    for name, value in {**fields, "x": x, "y": y}.items():
        block[name] = value
    return block.tobytes()


def test_truncated_file_names_file_and_offset(tmp_path: Path) -> None:
    frames = random_frames(23, 3)
    numbers = np.arange(3, dtype=np.int64)
    paths = write_raw_scan(tmp_path, 8, ScanShape(3, 1), batches_of(frames, numbers, numbers))
    victim = paths[2]
    with open(victim, "r+b") as handle:
        handle.truncate(400_000)
    with pytest.raises(RawFormatError) as info:
        open_raw_scan(paths)
    message = str(info.value)
    assert victim.name in message and "byte 331808" in message and "400000 bytes" in message
    assert "\n" not in message


def test_garbage_file_is_a_clear_error(tmp_path: Path, scan_4x3: tuple[list[Path], np.ndarray]) -> None:
    paths, _ = scan_4x3
    garbage = tmp_path / "data_scan0000000042_module1_dst0_file9.data"
    garbage.write_bytes(np.random.default_rng(0).bytes(3 * BLOCK_BYTES))
    with pytest.raises(RawFormatError, match=garbage.name):
        open_raw_scan([*paths, garbage])


def test_scan_number_mismatch_names_file_and_offset(tmp_path: Path) -> None:
    good = tmp_path / raw_file_name(1, 0)
    good.write_bytes(header_block(frame=0) + header_block(frame=1, x=1))
    bad = tmp_path / raw_file_name(1, 1)
    bad.write_bytes(header_block(frame=0) + header_block(scan_number=99, frame=1, x=1))
    with pytest.raises(RawFormatError, match=rf"{bad.name}: scan_number differs .* at byte {BLOCK_BYTES}"):
        open_raw_scan([good, bad])


@pytest.mark.parametrize(
    ("fields", "what"),
    [
        ({"width": 0}, "scan shape is zero"),
        ({"height": 3}, "scan shape differs"),
        ({"x": 2}, "outside the scan"),
        ({"y": 5}, "outside the scan"),
    ],
)
def test_bad_header_fields_are_clear_errors(tmp_path: Path, fields: dict[str, int], what: str) -> None:
    good = tmp_path / raw_file_name(1, 0)
    good.write_bytes(header_block())
    bad = tmp_path / raw_file_name(1, 1)
    bad.write_bytes(header_block(**fields))
    with pytest.raises(RawFormatError, match=rf"{bad.name}: .*{what}"):
        open_raw_scan([good, bad])


def test_zero_scan_shape_in_first_block(tmp_path: Path) -> None:
    bad = tmp_path / raw_file_name(1, 0)
    bad.write_bytes(header_block(width=0, height=0))
    with pytest.raises(RawFormatError, match=rf"{bad.name}: header scan shape is zero .* byte 0"):
        open_raw_scan([bad])


def test_duplicate_frame_for_one_module(tmp_path: Path, scan_4x3: tuple[list[Path], np.ndarray]) -> None:
    paths, _ = scan_4x3
    copy = tmp_path / raw_file_name(42, 0, file_index=1)
    copy.write_bytes(paths[0].read_bytes())
    with pytest.raises(RawFormatError, match=f"{copy.name}: frame_number 1 appears twice for module 0"):
        open_raw_scan([*paths, copy])


def test_same_file_given_twice(scan_4x3: tuple[list[Path], np.ndarray]) -> None:
    paths, _ = scan_4x3
    with pytest.raises(RawFormatError, match=f"{paths[1].name}: given twice"):
        open_raw_scan([*paths, paths[1]])


def test_modules_disagreeing_on_a_position(tmp_path: Path) -> None:
    top = tmp_path / raw_file_name(1, 0)
    top.write_bytes(header_block(frame=3, x=1))
    bottom = tmp_path / raw_file_name(1, 3)
    bottom.write_bytes(header_block(frame=3, y=1))
    with pytest.raises(RawFormatError, match="frame_number 3 is at position"):
        open_raw_scan([top, bottom])


@pytest.mark.parametrize(
    "name", ["data_scan0000000001_dst0_file0.data", "data_scan0000000001_module4_file0.data"]
)
def test_file_name_without_valid_module(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(header_block())
    with pytest.raises(RawFormatError, match=name):
        open_raw_scan([path])


def test_no_files_missing_file_and_all_empty(tmp_path: Path) -> None:
    with pytest.raises(RawFormatError, match="no raw files"):
        open_raw_scan([])
    absent = tmp_path / raw_file_name(1, 0)
    with pytest.raises(RawFormatError, match=f"{absent.name}: no such file"):
        open_raw_scan([absent])
    absent.touch()
    with pytest.raises(RawFormatError, match="no blocks"):
        open_raw_scan([absent])


def test_unsupported_versions_and_bad_writer_input(tmp_path: Path) -> None:
    frames = random_frames(1, 1)
    one = np.zeros(1, dtype=np.int64)
    with pytest.raises(ValueError, match="version"):
        write_raw_scan(tmp_path, 1, ScanShape(1, 1), batches_of(frames, one, one), version=3)
    with pytest.raises(ValueError, match="positions"):
        write_raw_scan(tmp_path, 1, ScanShape(1, 1), batches_of(frames, one, one + 1))
    paths = write_raw_scan(tmp_path, 1, ScanShape(1, 1), batches_of(frames, one, one))
    with pytest.raises(ValueError, match="version"):
        open_raw_scan(paths, version=3)
    with pytest.raises(ValueError, match="batch_size"):
        next(open_raw_scan(paths).iter_batches(0))
