"""Prefect task of a session for the microscope's metadata: a thin wrapper around tasks.microscope."""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.microscope import link_microscope_metadata
from tasks.settings import MicroscopeSettings


@task(name="microscope-metadata", cache_policy=NO_CACHE, timeout_seconds=900)
def attach_microscope_metadata(path: str, microscope: MicroscopeSettings) -> dict:
    """Add the microscope's file for this scan (DM4 or JSON) to its HDF5 before verification; a scan
    without one is kept, with the reason in its stop record (``microscope``). Returns the link."""
    logger = get_run_logger()
    link = link_microscope_metadata(Path(path), microscope)
    name = Path(path).name
    if link.status == "attached":
        c = link.calibration
        step = c.get("step_x_angstrom")
        alpha = c.get("convergence_semiangle_mrad")
        logger.info(
            "%s: microscope metadata from %s (step %s, convergence semi-angle %s)",
            name,
            Path(link.file or "").name,
            f"{step:.4g} Å" if step else "unknown",
            f"{alpha:.4g} mrad" if alpha else "unknown",
        )
    elif link.status != "off":
        logger.warning("%s: no microscope metadata: %s", name, link.reason)
    return link.to_json()
