"""The microscope's own file for a scan: found by scan number and time, read (DM4 with ncempy, or a JSON
sidecar), and added to the scan's HDF5 (counting.microscope_meta), with the link or the reason it is
missing kept in the scan's stop record under ``microscope``.

Finding: ``microscope.pattern`` with ``{scan}`` the scan number names the file in ``microscope.dir`` (a
glob pattern matches several: the one closest in time wins). Its modification time must be within
``microscope.window`` seconds of the scan's data, so a file left from an earlier session with the same
scan number (the detector resets them) is never taken; a DM4 whose "4Dcamera Parameters.scan_number" tag
names another scan is refused too.

Reading a DM4 (ncempy.io.dm): the image is the HAADF; its calibration (Calibrations.Dimension scale and
unit, y and x) is the scan step; the convergence semi-angle comes from the first of
``microscope.convergence_tags`` present (settings fallback: ``microscope.convergence_semiangle_mrad``);
the beam energy from ``microscope.voltage_tag`` (volts). A JSON sidecar gives the same as keys:
``scan_number``, ``step_size_angstrom`` (one value or [y, x]), ``convergence_semiangle_mrad``,
``voltage_v`` or ``energy_ev``, ``tags`` (any nested values) and ``haadf_npy`` (a .npy beside it).

Plain code (no Prefect); the session's task is tasks.steps.metadata.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from counting.microscope_meta import (
    MicroscopeMetadata,
    MicroscopeMetadataError,
    attach_microscope,
    file_digest,
)
from streaming.protocol.record import ScanRecord, record_path
from streaming.protocol.staged import commit_pending_record, pending_record_path, resolve_pending_record
from tasks.settings import MicroscopeSettings

log = logging.getLogger(__name__)

_TO_ANGSTROM = {"pm": 0.01, "Å": 1.0, "A": 1.0, "angstrom": 1.0, "nm": 10.0, "µm": 1e4, "um": 1e4, "mm": 1e7}


@dataclass
class MicroscopeLink:
    """What became of a scan's microscope metadata: ``attached`` (with its calibrations), ``missing`` or
    ``failed`` (with the reason), or ``off`` (no microscope.dir)."""

    status: str
    file: str | None = None
    reason: str | None = None
    calibration: dict = field(default_factory=dict)  # MicroscopeMetadata.summary() when attached

    def to_json(self) -> dict:
        """JSON-ready form."""
        return asdict(self)


# ------------------------------------------------------------------------------------------- finding
def candidates(settings: MicroscopeSettings, scan_number: int) -> list[Path]:
    """Files in microscope.dir that the pattern names for this scan number."""
    if settings.dir is None:
        return []
    try:
        name = settings.pattern.format(scan=scan_number)
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"microscope.pattern {settings.pattern!r} is not usable: {exc}") from None
    if glob.has_magic(name):
        return sorted(p for p in Path(settings.dir).glob(name) if p.is_file())
    path = Path(settings.dir) / name
    return [path] if path.is_file() else []


def find_microscope_file(
    settings: MicroscopeSettings, scan_number: int, scan_time: float
) -> tuple[Path | None, str]:
    """The scan's microscope file (modified within the window of ``scan_time``, closest first), or None
    and why not."""
    found = candidates(settings, scan_number)
    where = f"{settings.pattern.format(scan=scan_number)} in {settings.dir}"
    if not found:
        return None, f"no microscope file {where}"
    near = sorted((abs(p.stat().st_mtime - scan_time), p) for p in found)
    gap, best = near[0]
    if gap > settings.window:
        return None, (
            f"microscope file {best.name} was saved {gap:.0f} s from the scan's data, outside "
            f"microscope.window = {settings.window:g} s (an earlier scan with the same number?)"
        )
    return best, ""


def wait_for_microscope_file(
    settings: MicroscopeSettings, scan_number: int, scan_time: float, wait: float | None = None
) -> tuple[Path | None, str]:
    """find_microscope_file, looking again for up to ``wait`` seconds (default microscope.wait) while the
    file is not there yet."""
    deadline = time.monotonic() + (settings.wait if wait is None else wait)
    while True:
        path, reason = find_microscope_file(settings, scan_number, scan_time)
        if path is not None or time.monotonic() >= deadline:
            return path, reason
        time.sleep(min(0.2, max(deadline - time.monotonic(), 0.0)))


# ------------------------------------------------------------------------------------------- reading
def read_microscope_file(path: str | Path, settings: MicroscopeSettings) -> MicroscopeMetadata:
    """Read a DM4/DM3 or JSON microscope file; MicroscopeMetadataError (one line) if it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise MicroscopeMetadataError(f"microscope file {path} does not exist")
    kind = settings.format
    if kind == "auto":
        kind = "json" if path.suffix.lower() == ".json" else "dm4"
    try:
        return _read_json(path, settings) if kind == "json" else _read_dm(path, settings)
    except MicroscopeMetadataError:
        raise
    except Exception as exc:  # ncempy raises anything from IOError to AssertionError on a bad file
        what = "JSON sidecar" if kind == "json" else "DM4 file"
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MicroscopeMetadataError(f"cannot read {what} {path}: {detail}") from None


def _read_dm(path: Path, settings: MicroscopeSettings) -> MicroscopeMetadata:
    from ncempy.io import dm

    with dm.fileDM(path, on_memory=True) as f:
        if f.numObjects < 1:
            raise MicroscopeMetadataError(f"cannot read DM4 file {path}: it holds no image")
        image = f.getDataset(0)
        index = 1 if f.numObjects == 1 else 2  # as ncempy: a thumbnail comes first
        prefix = f".ImageList.{index}.ImageTags."
        tags = _nest({k[len(prefix) :]: v for k, v in f.allTags.items() if k.startswith(prefix)})
    data = np.asarray(image["data"])
    if data.ndim != 2:
        raise MicroscopeMetadataError(f"cannot read DM4 file {path}: its image is {data.ndim}-D, not 2-D")
    step = _step(image.get("pixelSize", []), image.get("pixelUnit", []))
    convergence, source = _convergence(tags, settings)
    voltage = _number(_lookup(tags, settings.voltage_tag))
    return MicroscopeMetadata(
        source=str(path.resolve()),
        source_format="dm4",
        source_sha256=file_digest(path),
        source_mtime=path.stat().st_mtime,
        scan_number=_int(_lookup(tags, "4Dcamera Parameters.scan_number")),
        step_angstrom=step,
        convergence_semiangle_mrad=convergence,
        convergence_source=source,
        energy_ev=voltage,  # electron volts = accelerating voltage in volts
        tags=tags,
        haadf=data.astype(np.float32),
    )


def _read_json(path: Path, settings: MicroscopeSettings) -> MicroscopeMetadata:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise MicroscopeMetadataError(f"cannot read JSON sidecar {path}: expected an object")
    step = data.get("step_size_angstrom")
    if step is not None:
        step = (float(step), float(step)) if np.isscalar(step) else tuple(float(s) for s in step)
        if len(step) != 2 or not all(math.isfinite(s) and s > 0 for s in step):
            raise MicroscopeMetadataError(f"cannot read JSON sidecar {path}: step_size_angstrom must be > 0")
    convergence = _number(data.get("convergence_semiangle_mrad"))
    source = "convergence_semiangle_mrad" if convergence else ""
    if convergence is None and settings.convergence_semiangle_mrad:
        convergence, source = settings.convergence_semiangle_mrad, "microscope.convergence_semiangle_mrad"
    haadf = None
    if data.get("haadf_npy"):
        haadf = np.load(_haadf_path(path, data["haadf_npy"]), allow_pickle=False).astype(np.float32)
    energy = _number(data.get("energy_ev", data.get("voltage_v")))
    return MicroscopeMetadata(
        source=str(path.resolve()),
        source_format="json",
        source_sha256=file_digest(path),
        source_mtime=path.stat().st_mtime,
        scan_number=_int(data.get("scan_number")),
        step_angstrom=step,
        convergence_semiangle_mrad=convergence,
        convergence_source=source,
        energy_ev=energy,
        tags=data.get("tags") if isinstance(data.get("tags"), dict) else {},
        haadf=haadf,
    )


def _haadf_path(sidecar: Path, name: object) -> Path:
    """The sidecar's ``haadf_npy``: a plain file name beside it (no directory part, nor ``..``), so a sidecar
    cannot pull another file into the shared scan file."""
    text = str(name)
    bad = not isinstance(name, str) or "/" in text or "\\" in text or text in (".", "..") or "\0" in text
    directory = sidecar.parent.resolve()
    target = directory if bad else (directory / text).resolve()  # a link out of the directory is refused
    if bad or target.parent != directory:
        raise MicroscopeMetadataError(
            f"cannot read JSON sidecar {sidecar}: haadf_npy must be a plain file name in its directory, "
            f"not {text[:200]!r}"
        )
    return target


def _step(sizes: list, units: list) -> tuple[float, float] | None:
    """(y, x) step in Å from the image calibration, None when uncalibrated (pixels, zero, unknown unit)."""
    if len(sizes) < 2 or len(units) < 2:
        return None
    out = []
    for size, unit in zip(sizes[-2:], units[-2:]):
        factor = _TO_ANGSTROM.get(str(unit).strip())
        if factor is None or not math.isfinite(float(size)) or float(size) <= 0:
            return None
        out.append(float(size) * factor)
    return out[0], out[1]


def _convergence(tags: dict, settings: MicroscopeSettings) -> tuple[float | None, str]:
    for tag in settings.convergence_tags:
        value = _number(_lookup(tags, tag))
        if value is not None and value > 0:
            return value, tag
    if settings.convergence_semiangle_mrad:
        return settings.convergence_semiangle_mrad, "microscope.convergence_semiangle_mrad"
    return None, ""


def _nest(flat: dict) -> dict:
    """{'A.B.c': v} -> {'A': {'B': {'c': v}}}, ncempy's bookkeeping entries (.arrayOffset ...) left out."""
    out: dict = {}
    for key, value in flat.items():
        if key.endswith((".arraySize", ".arrayOffset", ".arrayType")):
            continue
        *groups, leaf = key.split(".")
        node = out
        for g in groups:
            nxt = node.setdefault(g, {})
            if not isinstance(nxt, dict):  # a value and a group of one name: the group wins
                nxt = node[g] = {}
            node = nxt
        if not isinstance(node.get(leaf), dict):
            node[leaf] = value.item() if isinstance(value, np.generic) else value
    return out


def _lookup(tags: dict, path: str):
    node = tags
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _number(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _int(value) -> int | None:
    v = _number(value)
    return int(v) if v is not None else None


# ------------------------------------------------------------------------------------------- linking
def link_microscope_metadata(
    h5_path: str | Path, settings: MicroscopeSettings, wait: float | None = None
) -> MicroscopeLink:
    """Find, read and add the scan's microscope metadata to its file, and keep the outcome (with the new
    checksum) in its stop record. Never raises for a missing or unreadable microscope file, or for a record
    it cannot write: a scan without one is still a scan, and the link says why.

    File and record never get out of step: the new record is staged (``pending_record_path``, fsynced)
    before the file is replaced and takes the record's name after; a crash in between leaves the staged
    record, which ``resolve_pending_record`` (here, and in verification) keeps or drops by the file's
    checksum."""
    h5_path = Path(h5_path)
    rec_path = record_path(h5_path)
    resolve_pending_record(h5_path)
    record = ScanRecord.load(rec_path)
    link = _link(h5_path, record, settings, wait)
    if link.status in ("missing", "failed"):
        resolve_pending_record(h5_path)  # a staged record the file never took is dropped here
    if link.status in ("missing", "failed") and not pending_record_path(h5_path).exists():
        record.extra["microscope"] = link.to_json()
        try:
            record.save(rec_path)
        except OSError as exc:  # the file is as the writer left it: the record still matches it
            link.reason = f"{link.reason}; its stop record could not be updated: {exc}"
    return link


def _link(
    h5_path: Path, record: ScanRecord, settings: MicroscopeSettings, wait: float | None
) -> MicroscopeLink:
    if settings.dir is None:
        return MicroscopeLink("off", reason="microscope.dir is not set")
    scan_time = record.last_data_time or record.written_time or h5_path.stat().st_mtime
    try:
        path, reason = wait_for_microscope_file(settings, record.scan_number, scan_time, wait)
    except (OSError, ValueError) as exc:
        return MicroscopeLink("failed", reason=str(exc))
    if path is None:
        return MicroscopeLink("missing", reason=reason)
    try:
        meta = read_microscope_file(path, settings)
        if meta.scan_number is not None and meta.scan_number != record.scan_number:
            return MicroscopeLink(
                "missing", str(path), f"{path.name} is for scan {meta.scan_number}, not {record.scan_number}"
            )
        link = MicroscopeLink("attached", str(path.resolve()), None, meta.summary())
        staged = attach_with_record(h5_path, meta, record, link)
    except (MicroscopeMetadataError, OSError) as exc:
        return MicroscopeLink("failed", str(path), str(exc))
    if not staged:  # the staged record stays: resolve_pending_record settles it later
        return MicroscopeLink("failed", str(path), "metadata added, but its stop record is still staged")
    return link


def attach_with_record(
    h5_path: Path, meta: MicroscopeMetadata, record: ScanRecord, link: MicroscopeLink
) -> bool:
    """Add ``meta`` to the file and ``link`` (with the new checksum) to its stop record, never out of step:
    the new record is staged and fsynced before the file is replaced, and committed after. Raises what
    attach_microscope raises (the file and record are then as they were); False if the file was replaced
    but the record could not be committed (it stays staged, for resolve_pending_record)."""
    pending = pending_record_path(h5_path)

    def stage(digest: str) -> None:  # the new record, durable before the file changes
        replace(record, sha256=digest, extra={**record.extra, "microscope": link.to_json()}).save(pending)

    attach_microscope(h5_path, meta, record.sha256, before_replace=stage)
    try:
        commit_pending_record(h5_path)
    except OSError as exc:
        log.error("%s: microscope metadata added, but its stop record is still staged: %s", h5_path.name, exc)
        return False
    return True
