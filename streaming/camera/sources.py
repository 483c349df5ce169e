"""Where a sender's sectors come from: raw files of a recorded scan, or the simulated camera.

A source yields, for one module, the scan's identity (ScanInfo) and (frame_number, x, y, sector buffer) of
every sector of that module in frame order, as one of the camera's receiving servers would see them. To run
a sender in another process, a source is described by a picklable spec (source_spec) and rebuilt there
(open_source).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from counting.geometry import SECTOR_ROWS
from counting.raw import RawScan, block_dtype, module_from_path, open_raw_scan
from counting.simulator import SimulatedCamera, SimulatorConfig
from streaming.camera.rendering import SharedRendering

PathLike = str | os.PathLike[str]
Source = RawScan | SimulatedCamera | SharedRendering
Sector = tuple[int, int, int, object]  # (frame_number, x, y, sector buffer)


@dataclass(frozen=True)
class ScanInfo:
    scan_number: int
    width: int
    height: int
    frames: int  # sectors this module will try to send (before drops)
    # The source reuses a sector's memory once iteration moves on, so a sender must copy it when sending
    # (libzmq copies at once, with the GIL released) instead of sending it zero-copy.
    reused_buffers: bool = False


def module_sectors(source: Source, module: int) -> tuple[ScanInfo, Iterator[Sector]]:
    """The scan identity and (frame_number, x, y, sector buffer) of every sector of one module, in order."""
    if isinstance(source, SimulatedCamera):
        return _simulated_sectors(source, module)
    if isinstance(source, SharedRendering):
        return _shared_sectors(source, module)
    if isinstance(source, RawScan):
        if source.version == 5:
            return _raw_v5_sectors(source, module)
        return _raw_reassembled_sectors(source, module)
    raise TypeError(f"source must be a RawScan or SimulatedCamera, got {type(source).__name__}")


def _simulated_sectors(camera: SimulatedCamera, module: int):
    return _rendered(camera, ((n, pos, sector) for n, pos, _, sector in camera.iter_sectors(module=module)))


def _shared_sectors(shared: SharedRendering, module: int):
    return _rendered(shared.camera, shared.sectors(module))


def _rendered(camera: SimulatedCamera, sectors: Iterator[tuple[int, int, np.ndarray]]):
    """The simulator's (frame_number, position, sector) as a source's sectors."""
    scan = camera.scan
    # The simulator recycles its ring memory once Python holds no reference to a batch, but libzmq may
    # still be queueing a zero-copy message then (seen: frames overwritten after the ring wrapped).
    info = ScanInfo(0, scan.width, scan.height, camera.total_frames, reused_buffers=True)

    def gen() -> Iterator[Sector]:
        for frame_number, position, sector in sectors:
            yield frame_number, position % scan.width, position // scan.width, sector

    return info, gen()


def _raw_v5_sectors(raw: RawScan, module: int):
    """Straight from the module's files, memory-mapped: the sender only reads its own module, as a
    receiver only has its own sector, and sends page-cache memory without a copy."""
    files = [
        np.memmap(p, dtype=block_dtype(5), mode="r")
        for p in raw.paths
        if module_from_path(p) == module and Path(p).stat().st_size > 0
    ]
    data = [f["data"] for f in files]
    numbers = np.concatenate([f["frame_number"] for f in files]).astype(np.int64) if files else np.zeros(0)
    xs = np.concatenate([f["x"] for f in files]).astype(np.int64) if files else np.zeros(0)
    ys = np.concatenate([f["y"] for f in files]).astype(np.int64) if files else np.zeros(0)
    file_of = np.repeat(np.arange(len(files)), [len(f) for f in files])
    index_of = np.concatenate([np.arange(len(f)) for f in files]) if files else np.zeros(0, np.int64)
    order = np.argsort(numbers, kind="stable")  # a module's files interleave frames round-robin
    info = ScanInfo(raw.scan_number, raw.scan_shape.width, raw.scan_shape.height, int(order.size))

    def gen() -> Iterator[Sector]:
        for k in order.tolist():
            yield int(numbers[k]), int(xs[k]), int(ys[k]), data[file_of[k]][index_of[k]]

    return info, gen()


def _raw_reassembled_sectors(raw: RawScan, module: int):
    """v4 files hold column strips but the wire carries row strips: assemble frames, send row strip m."""
    width = raw.scan_shape.width
    info = ScanInfo(raw.scan_number, width, raw.scan_shape.height, raw.num_frames)

    def gen() -> Iterator[Sector]:
        rows = slice(module * SECTOR_ROWS, (module + 1) * SECTOR_ROWS)
        for batch in raw.iter_batches(batch_size=16):
            for k in range(len(batch)):
                pos = int(batch.positions[k])
                yield int(batch.frame_numbers[k]), pos % width, pos // width, batch.frames[k, rows]

    return info, gen()


def open_source(spec: object) -> Source:
    """Rebuild a source in a child process from its picklable description."""
    if isinstance(spec, SimulatorConfig):
        return SimulatedCamera(spec)
    paths, version = spec  # type: ignore[misc]
    return open_raw_scan(paths, version)


def source_spec(source: Source | SimulatorConfig | Sequence[PathLike] | PathLike) -> object:
    """A picklable description of a source: a simulator config, or raw paths and version."""
    if isinstance(source, SimulatorConfig):
        return source
    if isinstance(source, SharedRendering):
        source = source.camera
    if isinstance(source, SimulatedCamera):
        return source.config  # frames depend only on the config, so the child renders the same scan
    if isinstance(source, RawScan):
        return (tuple(str(p) for p in source.paths), source.version)
    if isinstance(source, str | os.PathLike):
        return ((str(source),), None)
    return (tuple(str(p) for p in source), None)
