"""Audit findings on the writer's files: nothing counted is ever deleted (H3), a writer stopped mid-scan
writes what arrived with its stop record (M1), stop records and names are durable (L3), the microscope
step never leaves file and record out of step (M6), and a scan shape from the wire cannot make the writer
allocate or write in proportion to it before data arrives (H2, the writer's side).

Real HDF5 files on the real file system and real ZeroMQ sockets on loopback. A file system without hard
links is stood in for by the writer's own seam for naming files (h5_storage.FinalName): the link (and, for
one test, the no-replace rename too) fails with the OS error such a file system gives."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from counting.geometry import ALL_SECTORS, FRAME_SHAPE, ScanShape
from counting.kernel import EventList, Thresholds
from counting.scan_file import ScanFile, ScanTooLargeError
from counting.sparse import read_counted_scan
from counting.storage.durable import file_sha256
from counting.storage.hdf5 import FinalName, TempHDF5, UnnamedFileError
from stemstream_testing.options import estimation
from streaming.protocol import control as p
from streaming.protocol.record import ScanRecord, ScanStatus
from streaming.writer.files import ScanWriterError, check_output_dir
from streaming.writer.thresholds import SampleOffer
from streaming.writer.writer import ScanWriter, WriterConfig

pytestmark = pytest.mark.timeout(120)
FIXED = Thresholds(30.5, 600.0)


class NoHardLinks(FinalName):
    """A file system without hard links (vfat, CIFS without unix extensions, sshfs, s3fs): link gives EPERM."""

    def link(self, src: Path, dst: Path) -> None:
        raise OSError(errno.EPERM, "Operation not permitted", str(dst))


class NoNamesForScans(NoHardLinks):
    """No hard links, and the directory cannot take another entry for a scan (ENOSPC on the entry); the
    start-up probe's names still work."""

    def rename(self, src: Path, dst: Path) -> None:
        if dst.suffix == ".h5":
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        super().rename(src, dst)


class NoNamesAtAll(NoHardLinks):
    """No hard links and no no-replace rename (an old kernel, or a file system that refuses the flag)."""

    def rename(self, src: Path, dst: Path) -> None:
        raise OSError(errno.EINVAL, "Invalid argument", str(dst))


def writer_for(out: Path, final_name: FinalName | None = None, **kw: object) -> ScanWriter:
    config = WriterConfig(out, 0, "scan_{scan:05d}.h5", "UTC", FIXED, estimation(), 30.0)
    return ScanWriter("tcp://127.0.0.1:0", config, None, final_name=final_name, **kw).start()


def events_message(positions: list[int]) -> list:
    events = [np.arange(3 + q, dtype=np.uint32) * 1000 for q in positions]
    return [
        *p.encode(p.EventsHeader("n0", 1, len(positions))),
        np.array(positions, np.int64),
        np.array(positions, np.int64),
        np.full(len(positions), ALL_SECTORS, np.uint8),
        np.cumsum([0] + [len(e) for e in events]).astype(np.int64),
        np.concatenate(events),
    ]


def send_scan(
    writer: ScanWriter, positions: list[int], done: bool, shape: tuple[int, int] = (2, 2), wait: bool = True
) -> None:
    """One node's scan 1 of ``shape``: the frames of ``positions``, and its done if ``done``; waits until
    the writer has the frames (or the record) if ``wait``."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 1000)
    try:
        sock.connect(writer.endpoint)
        sock.send_multipart(p.encode(p.NodeScanBegin("n0", 1, *shape, 1, 0)))
        if positions:
            sock.send_multipart(events_message(positions))
        if done:
            sock.send_multipart(p.encode(p.NodeScanDone("n0", 1, 16, 16, len(positions), 0, 0, "complete")))
        deadline = time.monotonic() + (20 if wait else 0)
        while time.monotonic() < deadline and writer.error is None:
            if writer.records if done else any(s.frames == len(positions) for s in writer._scans.values()):
                break
            time.sleep(0.01)
    finally:
        sock.close()
        ctx.term()


def names(directory: Path) -> list[str]:
    return sorted(f.name for f in directory.iterdir() if f.name != ".stemstream")


# ---------------------------------------------------------------------------------------------------- H3
def test_without_hard_links_a_scan_gets_its_name_by_a_rename_that_never_replaces(tmp_path: Path):
    writer = writer_for(tmp_path, NoHardLinks())
    try:
        send_scan(writer, [0, 1, 2, 3], done=True)
    finally:
        writer.stop(timeout=20)
    assert writer.error is None
    [record] = writer.records
    assert record.status is ScanStatus.COMPLETE and record.path == str(tmp_path / "scan_00001.h5")
    assert names(tmp_path) == ["scan_00001.h5", "scan_00001.json"]
    assert file_sha256(record.path) == record.sha256 and read_counted_scan(record.path).num_frames == 4


def test_no_replace_rename_refuses_a_taken_name(tmp_path: Path):
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").write_text("kept")
    with pytest.raises(FileExistsError):
        FinalName().rename(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "b").read_text() == "kept" and (tmp_path / "a").read_text() == "new"


def test_a_complete_scan_that_cannot_be_named_is_kept_and_its_record_says_where(tmp_path: Path):
    """Before: the fsynced file was unlinked and the record said only 'failed'."""
    writer = writer_for(tmp_path, NoNamesForScans())
    try:
        send_scan(writer, [0, 1, 2, 3], done=True)
    finally:
        writer.stop(timeout=20)
    assert writer.error is not None and "kept as" in writer.error
    [record] = writer.records
    kept = Path(record.extra["kept_file"])
    assert record.status is ScanStatus.FAILED and record.path is None
    assert kept.parent == tmp_path and kept.name.endswith(".kept") and not list(tmp_path.glob("*.partial"))
    assert file_sha256(kept) == record.sha256  # the counted data, complete and checkable
    assert read_counted_scan(kept).num_frames == 4
    saved = json.loads((tmp_path / "scan_00001.json").read_text())
    assert saved["kept_file"] == str(kept) and saved["status"] == "failed"


class EveryNameTaken(FinalName):
    """Every final name the writer tries is taken by the time it links (another writer, a user's copy)."""

    def link(self, src: Path, dst: Path) -> None:
        if dst.suffix == ".h5":
            raise FileExistsError(errno.EEXIST, "File exists", str(dst))
        super().link(src, dst)


def test_a_complete_scan_whose_names_are_all_taken_is_kept(tmp_path: Path):
    writer = writer_for(tmp_path, EveryNameTaken())
    try:
        send_scan(writer, [0, 1, 2, 3], done=True)
    finally:
        writer.stop(timeout=20)
    [record] = writer.records
    assert record.status is ScanStatus.FAILED and "File exists" in record.error
    kept = Path(record.extra["kept_file"])
    assert file_sha256(kept) == record.sha256 and not list(tmp_path.glob("*.partial"))


def test_a_temporary_file_that_cannot_be_named_is_never_removed(tmp_path: Path):
    with TempHDF5(tmp_path, "s.h5", final_name=NoNamesAtAll()) as tmp:
        tmp.h5["x"] = np.arange(3)
        tmp.close()
        with pytest.raises(UnnamedFileError) as caught:
            tmp.link(tmp_path / "s.h5")
    kept = caught.value.kept
    assert kept.exists() and names(tmp_path) == [kept.name]  # the context's discard left it alone
    with h5py.File(kept) as f:
        assert list(f["x"][()]) == [0, 1, 2]


def test_an_output_dir_where_finished_files_cannot_be_named_is_refused_at_start(tmp_path: Path):
    with pytest.raises(ScanWriterError, match="neither a hard link nor a rename that never replaces"):
        writer_for(tmp_path / "out", NoNamesAtAll())
    assert names(tmp_path / "out") == []  # the probe's names are gone
    check_output_dir(tmp_path / "ok", NoHardLinks())  # a rename alone is enough
    assert names(tmp_path / "ok") == []


# ---------------------------------------------------------------------------------------------------- M1
def test_a_writer_stopped_mid_scan_writes_what_arrived_with_its_record(tmp_path: Path):
    """Before: stop() discarded the open scan, no file and no record."""
    writer = writer_for(tmp_path)
    send_scan(writer, [0, 2], done=False)
    t0 = time.monotonic()
    writer.stop(timeout=20)
    assert time.monotonic() - t0 < 20
    assert writer.error is None
    [record] = writer.records
    assert record.status is ScanStatus.INCOMPLETE and "shutdown" in record.reasons
    assert record.frames_written == 2 and record.expected_frames == 4
    assert names(tmp_path) == ["scan_00001.h5", "scan_00001.json"]
    assert ScanRecord.load(tmp_path / "scan_00001.json").reasons == record.reasons
    back = read_counted_scan(record.path)
    assert [len(e) for e in back.events.ravel()] == [3, 0, 5, 0]
    assert file_sha256(record.path) == record.sha256


# ---------------------------------------------------------------------------------------------------- L3
def test_stop_records_and_names_are_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Observes (and passes through) fsync, link and replace: the record's bytes are fsynced before its
    rename, and the directory after the scan's name and after the record's."""
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst, **kw) -> None:
        real_replace(src, dst, **kw)
        calls.append(("replace", str(dst)))

    def link(src, dst, **kw) -> None:
        real_link(src, dst, **kw)
        calls.append(("link", str(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    writer = writer_for(tmp_path)
    try:
        send_scan(writer, [0, 1, 2, 3], done=True)
    finally:
        writer.stop(timeout=20)
    monkeypatch.undo()
    assert writer.error is None
    h5, rec, d = str(tmp_path / "scan_00001.h5"), str(tmp_path / "scan_00001.json"), str(tmp_path)
    at = calls.index(("link", h5))
    assert ("fsync", d) in calls[at : at + 2]
    at = calls.index(("replace", rec))
    assert calls[at - 1] == ("fsync", str(tmp_path / ".scan_00001.json.partial"))
    assert calls[at + 1] == ("fsync", d)


# ---------------------------------------------------------------------------------------------------- H2
def test_a_scan_shape_above_the_limit_is_refused_before_anything_is_allocated(tmp_path: Path):
    with pytest.raises(ScanTooLargeError, match="above the limit of 16777216"):
        ScanFile(tmp_path, "s.h5", ScanShape(65535, 65535))
    with pytest.raises(ScanTooLargeError):
        ScanFile(tmp_path, "s.h5", ScanShape(10, 10), max_positions=99)
    assert names(tmp_path) == []


def test_a_huge_announced_scan_does_not_stop_the_writer(tmp_path: Path):
    """A 65535x65535 begin (4.3e9 positions) is refused as malformed before it takes a scan id or a file;
    the writer serves the next scan, which gets the first id."""
    writer = writer_for(tmp_path, max_positions=64)
    try:
        send_scan(writer, [], done=False, shape=(65535, 65535), wait=False)
        deadline = time.monotonic() + 10
        while writer.malformed == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert writer.malformed == 1 and writer._thread.is_alive()
        send_scan(writer, [0, 1, 2, 3], done=True)
    finally:
        writer.stop(timeout=20)
    assert writer.error is None and [r.status for r in writer.records] == [ScanStatus.COMPLETE]
    assert [r.scan_id for r in writer.records] == [1] and not list(tmp_path.rglob("*.partial"))


def test_nothing_in_proportion_to_the_scan_is_written_at_its_begin(tmp_path: Path):
    """Before: arange(positions) went into the file at scan begin (32 MB for 2048x2048, 128 MB at the cap)."""
    shape = ScanShape(2048, 2048)
    f = ScanFile(tmp_path, "s.h5", shape)
    try:
        [partial] = tmp_path.glob("*.partial")
        assert partial.stat().st_size < 8 << 20
        f.add(
            np.array([5]),
            np.array([0]),
            np.array([ALL_SECTORS], np.uint8),
            EventList(np.arange(2, dtype=np.uint32), np.array([0, 2], np.int64)),
        )
        f.finish({})
        f.link(tmp_path / "s.h5")
    finally:
        f.discard()
    with h5py.File(tmp_path / "s.h5") as h:
        positions = h["electron_events/scan_positions"]
        assert positions.shape == (shape.positions,)
        assert np.array_equal(positions[-5:], np.arange(shape.positions - 5, shape.positions))
        assert np.array_equal(positions[: 1 << 10], np.arange(1 << 10))


def test_threshold_samples_kept_are_bounded_by_what_the_estimate_uses():
    """Before: every offered sample frame (663 kB each) was kept until the thresholds were settled."""
    offer = SampleOffer(1, limit=4)
    numbers = [9, 3, 7, 1, 8, 2, 6, 0, 5, 4]
    frames = [np.full(FRAME_SHAPE, n, np.uint16).tobytes() for n in numbers]
    offer.add(p.SampleHeader("n0", 1, numbers, True), [zmq.Frame(f) for f in frames])
    assert sorted(offer.frames) == [0, 1, 2, 3]
    assert all(int(offer.frames[n][0, 0]) == n for n in offer.frames)
