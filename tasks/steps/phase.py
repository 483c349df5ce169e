"""Prefect task of a session for the stream's phase fit: a thin wrapper around tasks.stream_phase."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from counting.phase.summary import summary_lines
from tasks.stream_phase import PhaseOutcome, add_stream_phase


@task(name="stream-phase", cache_policy=NO_CACHE, timeout_seconds=900)
def fit_stream_phase(path: str, bins: int, keep_flyback: bool) -> PhaseOutcome:
    """Fit a verified scan's parallax (defocus, astigmatism, rotation) and add it to its HDF5 (/phase) and
    stop record; a fit that failed or could not be added is a warning with the reason, never an error."""
    logger = get_run_logger()
    outcome = add_stream_phase(path, bins, keep_flyback)
    name = path.rsplit("/", 1)[-1]
    if outcome.summary.get("status") == "ok":
        text = "; ".join(f"{k} {v}" for k, v in summary_lines(outcome.summary)[:3])
        logger.info("%s: phase fit in %.2f s: %s", name, outcome.seconds, text)
    elif outcome.summary:
        logger.warning("%s: phase fit failed: %s", name, outcome.summary.get("reason"))
    if outcome.reason:
        logger.warning("%s: phase fit %s", name, outcome.reason)
    return outcome
