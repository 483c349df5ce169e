"""Re-run the analysis of a stored scan with other parameters, and record the result in the catalogue
beside the earlier ones. Plain code (no Prefect): ``stemstream analyse`` calls it directly, the
``stemstream-analyse`` flow (deployment ``analyse``) wraps it.

Parameters come from two places: the analysis settings (``--set analysis.FIELD=VALUE``, like every other
command) and AnalysisConfig's own parameters (``--param NAME=VALUE``, e.g. ``dpc_q_highpass=0.05``)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path

from catalogue import Catalogue, ScanView
from tasks.settings import AnalysisSettings


@dataclass(frozen=True)
class Reanalysis:
    """A re-analysis done and recorded."""

    scan: ScanView
    analysis_id: int
    out_dir: Path
    images: dict[str, str]
    summary: dict
    warnings: list[str]
    params: dict
    seconds: float


def parse_params(assignments: list[str] | dict | None) -> dict:
    """NAME=VALUE pairs (or a dict) as typed AnalysisConfig parameters; a bad name or value: ValueError."""
    from tasks.analysis.analyse import AnalysisConfig

    known = {f.name: f for f in fields(AnalysisConfig)}
    pairs = (
        list(assignments.items())
        if isinstance(assignments, dict)
        else [_split(item) for item in assignments or []]
    )
    out = {}
    for name, value in pairs:
        if name not in known:
            raise ValueError(f"unknown analysis parameter {name!r}; known: {', '.join(sorted(known))}")
        out[name] = _typed(name, value, AnalysisConfig.__dataclass_fields__[name].default)
    return out


def _split(item: str) -> tuple[str, str]:
    name, sep, value = item.partition("=")
    if not sep or not name.strip():
        raise ValueError(f"--param wants NAME=VALUE, got {item!r}")
    return name.strip(), value.strip()


def _typed(name: str, value: object, default: object) -> object:
    if not isinstance(value, str):
        return value
    if value.lower() in ("none", "null", ""):
        return None
    try:
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if isinstance(default, int):
            return int(value)
        return float(value)
    except ValueError:
        kind = type(default).__name__ if default is not None else "number"
        raise ValueError(f"analysis parameter {name} wants a {kind}, got {value!r}") from None


def summary_calibrated(summary: dict) -> bool | None:
    """Whether an analysis ran with the microscope's calibrations (its summary's ``calibration``)."""
    calibration = summary.get("calibration")
    value = calibration.get("calibrated") if isinstance(calibration, dict) else summary.get("calibrated")
    return value if isinstance(value, bool) else None


def output_dir_for(root: Path, scan: ScanView) -> Path:
    """A new directory for this analysis's images: nothing earlier is overwritten."""
    stem = Path(scan.file_name or scan.uid).stem
    base = Path(root) / "reanalysis" / f"{stem}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}"
    path, k = base, 1
    while path.exists():
        path = base.with_name(f"{base.name}-{k}")
        k += 1
    return path


def reanalyse(
    catalogue: Catalogue,
    ref: str,
    analysis: AnalysisSettings,
    params: dict,
    out_root: Path,
) -> Reanalysis:
    """Analyse the scan ``ref`` (uid, file name or id) again and record it; ScanNotFound, or an OSError
    naming the file when the scan file is gone. An analysis that fails is recorded with its error."""
    from tasks.analysis.analyse import analyse_scan, analysis_config

    scan = catalogue.find_scan(ref)
    if not scan.path:
        raise FileNotFoundError(f"scan {scan.uid[:8]} has no file (it was not written: {scan.error})")
    if not Path(scan.path).is_file():
        raise FileNotFoundError(f"the file of scan {scan.uid[:8]} is gone: {scan.path}")
    config = analysis_config(analysis, **params)
    settings_changed = {
        f"analysis.{k}": v for k, v in analysis.model_dump(mode="json", exclude_defaults=True).items()
    }
    recorded = {**asdict(config), "changed": {**settings_changed, **params}}
    out = output_dir_for(out_root, scan)
    t0 = time.perf_counter()
    try:
        result = analyse_scan(Path(scan.path), out, config)
    except Exception as exc:
        catalogue.record_analysis(scan.uid, recorded, {}, error=f"{type(exc).__name__}: {exc}")
        raise
    seconds = time.perf_counter() - t0
    images = {k: str(v) for k, v in result.images.items()}
    results = {**result.summary, "warnings": result.warnings, "timings": result.timings}
    calibrated = summary_calibrated(result.summary)
    analysis_id = catalogue.record_analysis(
        scan.uid,
        recorded,
        results,
        images=images,
        calibrated=calibrated if isinstance(calibrated, bool) else None,
        kind="reanalysis",
    )
    return Reanalysis(scan, analysis_id, out, images, result.summary, result.warnings, recorded, seconds)
