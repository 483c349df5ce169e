"""A scan's phase fit as text lines (label, text) for `stemstream scans show`, from the plain summary the
catalogue keeps (counting.phase.record.PhaseRecord.summary). Standard library only: `scans show` loads no
numerics for it."""

from __future__ import annotations

import math

UNCALIBRATED = "uncalibrated"


def _pm(value, err, digits: int = 4) -> str:
    """value ± err (either unknown: ?)."""
    if not _number(value):
        return "?"
    text = f"{value:.{digits}g}"
    return f"{text} ± {err:.2g}" if _number(err) else text


def _number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def summary_lines(phase: object) -> list[tuple[str, str]]:
    """The defocus ± its error (nm, or scan px per detector px and "uncalibrated"), the astigmatism with
    its angle and the rotation; a failed fit as its reason; [] when ``phase`` is no phase summary."""
    if not isinstance(phase, dict) or "status" not in phase:
        return []
    if phase["status"] != "ok":
        return [("phase fit", f"failed: {phase.get('reason') or 'no reason given'}")]
    units = str(phase.get("units") or "")
    unit = units if phase.get("calibrated") else f"{units}, {UNCALIBRATED}"
    p = phase.get
    lines = [
        ("defocus", f"{_pm(p('defocus'), p('defocus_err'))} {unit}"),
        (
            "astigmatism",
            f"{_pm(p('astigmatism'), p('astigmatism_err'))} at "
            f"{_pm(p('astigmatism_angle'), p('astigmatism_angle_err'), 3)}°",
        ),
        ("rotation", f"{_pm(p('rotation'), p('rotation_err'), 3)}°"),
    ]
    facts = [f"{p('positions')} positions" if p("positions") is not None else ""]
    facts += [f"{p('bins_kept')} bins ({p('bins')} per side)" if p("bins_kept") is not None else ""]
    facts += [f"residual {p('residual_rms'):.2g} scan px" if _number(p("residual_rms")) else ""]
    lines.append(("phase fit", ", ".join(filter(None, facts))))
    return lines
