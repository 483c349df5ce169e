"""Verify a written scan file: stempy's sparse HDF5 layout (version 3), scan shape, completeness, checksum.

Plain code (no Prefect): ``verify_scan`` never raises for a bad file; every defect becomes a line in
``VerifyResult.problems`` and ``ok=False``. The checksum is compared with the stop record the writer leaves
beside the file (``<name>.json``, ``streaming.protocol.record.ScanRecord``) when there is one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from counting.geometry import ALL_SECTORS, FRAME_COLS, FRAME_ROWS
from counting.sparse import FORMAT_VERSION
from counting.storage.durable import file_sha256
from streaming.protocol.record import ScanRecord, record_path
from streaming.protocol.staged import resolve_pending_record

log = logging.getLogger(__name__)

_FRAME_PIXELS = FRAME_ROWS * FRAME_COLS
_FRAMES_PER_READ = 65536  # event lists read at a time when checking indices


@dataclass
class VerifyResult:
    """What verifying one scan file found; ``problems`` is empty exactly when ``ok``."""

    path: Path
    ok: bool
    status: str  # "passed" | "failed"
    problems: list[str] = field(default_factory=list)
    scan_width: int | None = None
    scan_height: int | None = None
    frames: int | None = None  # frame slots holding at least one sector
    complete_frames: int | None = None
    completeness: float | None = None  # fraction of expected sectors present
    events: int | None = None
    events_per_frame: float | None = None
    sha256: str | None = None
    checksum_matches_record: bool | None = None  # None: no stop record, or it holds no checksum

    def as_dict(self) -> dict:
        """JSON-friendly form (path as a string)."""
        d = asdict(self)
        d["path"] = str(self.path)
        return d


class _Layout:
    """Facts gathered from the file while checking its layout."""

    def __init__(self) -> None:
        self.width: int | None = None
        self.height: int | None = None
        self.slots: int | None = None  # frames dataset length (positions * k)
        self.events: int | None = None
        self.masks: np.ndarray | None = None


def verify_scan(
    path: str | os.PathLike,
    expected_width: int | None = None,
    expected_height: int | None = None,
    min_completeness: float = 1.0,
) -> VerifyResult:
    """Check one counted-scan file against stempy's layout, the expected shape, completeness and checksum."""
    path = Path(path)
    problems: list[str] = []
    result = VerifyResult(path=path, ok=False, status="failed", problems=problems)
    if not path.is_file():
        problems.append(f"file missing: {path} does not exist or is not a regular file")
        return result
    resolve_pending_record(path)  # a metadata step that stopped midway: the matching record stays
    try:
        result.sha256 = file_sha256(path)
    except OSError as exc:
        problems.append(f"file unreadable: {exc}")
        return result
    result.checksum_matches_record = _check_record(path, result.sha256, problems)

    layout = _Layout()
    _check_hdf5(path, layout, problems)
    _fill_counts(result, layout)
    _check_expectations(result, layout, expected_width, expected_height, min_completeness, problems)

    result.ok = not problems
    result.status = "passed" if result.ok else "failed"
    if result.ok:
        log.info("verified %s: %.2f %% complete", path.name, 100 * (result.completeness or 0.0))
    else:
        log.warning("verification of %s failed: %s", path.name, "; ".join(problems))
    return result


def verify_scans(
    paths: Iterable[str | os.PathLike],
    expected_width: int | None = None,
    expected_height: int | None = None,
    min_completeness: float = 1.0,
) -> list[VerifyResult]:
    """Verify several files with the same expectations, in order."""
    return [verify_scan(p, expected_width, expected_height, min_completeness) for p in paths]


# ------------------------------------------------------------------------------------------- stop record
def _check_record(path: Path, sha256: str, problems: list[str]) -> bool | None:
    """Compare with the stop record's checksum; None when there is no record or it holds no checksum."""
    rec_path = record_path(path)
    if not rec_path.is_file():
        return None
    try:
        expected = ScanRecord.load(rec_path).sha256
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        problems.append(f"stop record {rec_path.name} is unreadable: {exc!r}")
        return None
    if not expected:
        return None
    if expected != sha256:
        problems.append(
            f"checksum mismatch: file sha256 {sha256[:16]}... differs from the stop record's {str(expected)[:16]}..."
        )
        return False
    return True


# ------------------------------------------------------------------------------------------- layout
def _check_hdf5(path: Path, layout: _Layout, problems: list[str]) -> None:
    """Open the file and check the layout; any failure to read becomes a problem, never an exception."""
    try:
        with h5py.File(path, "r") as f:
            _check_layout(f, layout, problems)
    except OSError as exc:
        problems.append(f"not a readable HDF5 file (truncated or corrupt?): {exc}")
    except Exception as exc:  # h5py raises many types for damaged files; none may escape verification
        problems.append(f"cannot read the file's layout ({type(exc).__name__}): {exc}")


def _check_layout(f: h5py.File, layout: _Layout, problems: list[str]) -> None:
    version = f.attrs.get("version")
    if version is None:
        problems.append("root attribute 'version' is missing (expected 3)")
    elif _as_int(version) != FORMAT_VERSION:
        problems.append(f"root attribute version={version!r}, expected {FORMAT_VERSION}")
    group = f.get("electron_events")
    if not isinstance(group, h5py.Group):
        problems.append("missing group /electron_events")
        return
    _check_scan_positions(group, layout, problems)
    _check_frames(group, layout, problems)
    _check_masks(group, layout, problems)


def _check_scan_positions(group: h5py.Group, layout: _Layout, problems: list[str]) -> None:
    sp = group.get("scan_positions")
    if not isinstance(sp, h5py.Dataset):
        problems.append("missing dataset /electron_events/scan_positions")
        return
    nx, ny = _as_int(sp.attrs.get("Nx")), _as_int(sp.attrs.get("Ny"))
    if nx is None or ny is None or nx < 1 or ny < 1:
        problems.append(
            f"/electron_events/scan_positions needs positive integer attrs Nx, Ny; got "
            f"Nx={sp.attrs.get('Nx')!r}, Ny={sp.attrs.get('Ny')!r}"
        )
        return
    layout.width, layout.height = nx, ny
    if sp.ndim != 1 or sp.shape[0] != nx * ny:
        problems.append(f"scan_positions has shape {sp.shape}, expected ({nx * ny},) for a {nx}x{ny} scan")
        return
    if not np.issubdtype(sp.dtype, np.integer):
        problems.append(f"scan_positions has dtype {sp.dtype}, expected integers")
        return
    values = sp[()]
    if len(values) and (values.min() < 0 or values.max() >= nx * ny):
        problems.append(f"scan_positions hold values outside 0..{nx * ny - 1}")


def _check_frames(group: h5py.Group, layout: _Layout, problems: list[str]) -> None:
    frames = group.get("frames")
    if not isinstance(frames, h5py.Dataset):
        problems.append("missing dataset /electron_events/frames")
        return
    base = h5py.check_vlen_dtype(frames.dtype)
    if base is None or np.dtype(base) != np.uint32:
        problems.append(f"/electron_events/frames has dtype {frames.dtype}, expected variable-length uint32")
        return
    fx, fy = _as_int(frames.attrs.get("Nx")), _as_int(frames.attrs.get("Ny"))
    if (fx, fy) != (FRAME_ROWS, FRAME_COLS):
        problems.append(
            f"/electron_events/frames attrs Nx={frames.attrs.get('Nx')!r}, Ny={frames.attrs.get('Ny')!r}; "
            f"expected {FRAME_ROWS} and {FRAME_COLS}"
        )
    if frames.ndim != 1:
        problems.append(f"/electron_events/frames has shape {frames.shape}, expected one dimension")
        return
    layout.slots = int(frames.shape[0])
    positions = (layout.width or 0) * (layout.height or 0)
    if positions and layout.slots % positions:
        problems.append(f"{layout.slots} frames do not divide into {positions} scan positions")
    elif positions and layout.slots == 0:
        problems.append("/electron_events/frames is empty")
    events, biggest = 0, -1
    for start in range(0, layout.slots, _FRAMES_PER_READ):  # bounded memory for scans of any size
        for e in frames[start : start + _FRAMES_PER_READ]:
            if len(e):
                events += len(e)
                biggest = max(biggest, int(e.max()))
    layout.events = events
    if biggest >= _FRAME_PIXELS:
        problems.append(f"event index {biggest} is outside the {FRAME_ROWS}x{FRAME_COLS} frame")


def _check_masks(group: h5py.Group, layout: _Layout, problems: list[str]) -> None:
    masks = group.get("sector_masks")
    if masks is None:
        # stempy's own files carry no mask; read_counted_scan takes every slot as complete, and so do we.
        if layout.slots is not None:
            layout.masks = np.full(layout.slots, ALL_SECTORS, np.uint8)
        return
    if not isinstance(masks, h5py.Dataset) or not np.issubdtype(masks.dtype, np.integer):
        problems.append("/electron_events/sector_masks is not an integer dataset")
        return
    positions = (layout.width or 0) * (layout.height or 0)
    if not positions or layout.slots is None or layout.slots % positions:
        return  # the shape it should have is unknown; the frames problem is already reported
    expected = (positions, layout.slots // positions)
    if masks.shape != expected:
        problems.append(f"sector_masks has shape {masks.shape}, expected {expected} (positions, frames)")
        return
    values = masks[()]
    if values.size and (values.min() < 0 or values.max() > ALL_SECTORS):
        problems.append(f"sector_masks hold values outside 0..{ALL_SECTORS}")
        return
    layout.masks = values.astype(np.uint8).ravel()


# ------------------------------------------------------------------------------------------- summary
def _fill_counts(result: VerifyResult, layout: _Layout) -> None:
    result.scan_width, result.scan_height = layout.width, layout.height
    result.events = layout.events
    if layout.masks is None:
        return
    masks = layout.masks
    result.frames = int(np.count_nonzero(masks))
    result.complete_frames = int(np.count_nonzero(masks == ALL_SECTORS))
    bits = int(np.unpackbits(masks[:, None], axis=1).sum()) if masks.size else 0
    result.completeness = bits / (masks.size * 4) if masks.size else 0.0
    if layout.events is not None and result.frames:
        result.events_per_frame = layout.events / result.frames


def _check_expectations(
    result: VerifyResult,
    layout: _Layout,
    expected_width: int | None,
    expected_height: int | None,
    min_completeness: float,
    problems: list[str],
) -> None:
    if result.scan_width is not None:
        want_w = result.scan_width if expected_width is None else expected_width
        want_h = result.scan_height if expected_height is None else expected_height
        if (result.scan_width, result.scan_height) != (want_w, want_h):
            problems.append(
                f"scan shape {result.scan_width}x{result.scan_height} does not match the expected {want_w}x{want_h}"
            )
    if result.completeness is not None and result.completeness < min_completeness:
        problems.append(
            f"completeness {100 * result.completeness:.2f} % is below the required {100 * min_completeness:.2f} % "
            f"({result.complete_frames} of {layout.slots} frames complete)"
        )


def _as_int(value: object) -> int | None:
    """An HDF5 attribute as a plain int, or None when it is not an integral scalar."""
    try:
        arr = np.asarray(value)
        if arr.ndim != 0 or arr.dtype.kind not in "iuf":
            return None
        v = float(arr)
        return int(v) if v.is_integer() else None
    except (TypeError, ValueError):
        return None
