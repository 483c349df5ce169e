"""The re-analysis flow: run the analysis of a stored scan again with other parameters and record it in
the catalogue beside the earlier analyses (deployment ``stemstream-analyse/analyse`` in prefect.yaml; the
same as ``stemstream analyse ID``)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.states import Completed

from catalogue import open_catalogue
from flows.settings import load_settings
from tasks.analysis.reanalyse import parse_params, reanalyse


@flow(name="stemstream-analyse")
def analyse(scan: str, params: dict[str, Any] | None = None, keep_flyback: bool | None = None):
    """Analyse a stored scan again and record the result beside its earlier analyses.

    Args:
        scan: The scan: its uid (or its first characters), file name, or id (see `stemstream scans`).
        params: Analysis parameters to change, e.g. {"dpc_q_highpass": 0.05, "parallax": false}; the names
            are those of `stemstream analyse --param`.
        keep_flyback: Analyse the flyback column too (default: the analysis.keep_flyback setting).
    """
    logger = get_run_logger()
    overrides = {"analysis": {"keep_flyback": keep_flyback}} if keep_flyback is not None else {}
    settings = load_settings(**overrides)
    changes = parse_params(params or {})
    with open_catalogue(settings.catalogue, settings.output_dir, create=False) as cat:
        done = reanalyse(cat, scan, settings.analysis, changes, settings.output_dir)
    name = done.scan.file_name or done.scan.uid
    for warning in done.warnings:
        logger.warning("%s: %s", name, warning)
    images = "\n".join(
        f"### {label}\n![{label}](data:image/png;base64,{base64.b64encode(Path(p).read_bytes()).decode()})"
        for label, p in done.images.items()
    )
    changed = ", ".join(f"{k}={v}" for k, v in (done.params.get("changed") or {}).items()) or "none"
    create_markdown_artifact(
        key=f"reanalysis-{done.scan.uid[:8]}",
        markdown=f"# {name}: analysis {done.analysis_id}\n\nparameters changed: {changed}\n\n{images}",
        description=f"re-analysis {done.analysis_id} of {name}",
    )
    logger.info(
        "analysis %d of %s recorded (parameters changed: %s); images in %s",
        done.analysis_id,
        name,
        changed,
        done.out_dir,
    )
    return Completed(
        message=f"analysis {done.analysis_id} of {name} recorded",
        data={"scan": done.scan.uid, "analysis_id": done.analysis_id, "images": done.images},
    )
