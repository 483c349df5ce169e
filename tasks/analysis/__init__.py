"""The py4DSTEM analysis of counted scans, and analysing a stored scan again.

Its public names resolve on first use (PEP 562), so importing one light name never loads the
package's heavier modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from counting.lazy import lazy_exports

_WHERE = {
    "AnalysisResult": "tasks.analysis.analyse",
    "analyse_scan": "tasks.analysis.analyse",
    "artifact_png": "tasks.analysis.artifact",
    "ScanCalibration": "tasks.analysis.calibration",
    "AnalysisConfig": "tasks.analysis.config",
    "analysis_config": "tasks.analysis.config",
    "parse_params": "tasks.analysis.reanalyse",
    "reanalyse": "tasks.analysis.reanalyse",
}
__all__ = [
    "analyse_scan",
    "analysis_config",
    "AnalysisConfig",
    "AnalysisResult",
    "artifact_png",
    "parse_params",
    "reanalyse",
    "ScanCalibration",
]

if TYPE_CHECKING:
    from tasks.analysis.analyse import AnalysisResult, analyse_scan
    from tasks.analysis.artifact import artifact_png
    from tasks.analysis.calibration import ScanCalibration
    from tasks.analysis.config import AnalysisConfig, analysis_config
    from tasks.analysis.reanalyse import parse_params, reanalyse


__getattr__ = lazy_exports(__name__, _WHERE)
