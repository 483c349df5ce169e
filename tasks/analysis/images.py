"""The analysis' PNGs: one figure per result, titled with its units and the scan's calibration (or the
word "uncalibrated"), drawn with a bare matplotlib Figure (no pyplot: safe from worker threads)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from tasks.analysis.calibration import ScanCalibration


def panels(cal: ScanCalibration) -> dict[str, list[tuple[str, str, str]]]:
    """image name: [(array, title, colormap)], the units as calibrated."""
    com = "mrad" if cal.reciprocal_space else "detector px, uncalibrated"
    tag = "" if cal.calibrated else " (uncalibrated)"
    return {
        "bf": [("bf", f"virtual bright field{tag}", "gray")],
        "adf": [("adf", f"virtual annular dark field{tag}", "gray")],
        "com": [("com_x", f"CoM x (rows), {com}", "RdBu_r"), ("com_y", f"CoM y (columns), {com}", "RdBu_r")],
        "dpc": [("dpc_phase", f"DPC phase, rad{tag}", "magma")],
        "parallax": [
            ("parallax_bf", f"parallax aligned BF{tag}", "gray"),
            ("parallax_phase", f"CTF-corrected{tag}", "magma"),
        ],
        "dp_mean": [("dp_mean", f"mean diffraction pattern (log){tag}", "inferno")],
    }


def save_pngs(
    arrays: dict,
    out_dir: Path,
    stem: str,
    dpi: int,
    cal: ScanCalibration,
    warn: Callable[[str], None],
    defocus_angstrom: float | None = None,
) -> dict[str, Path]:
    """Write ``<stem>_<name>.png`` for every result present; a failed image is a warning, not an error."""
    images: dict[str, Path] = {}
    caption = cal.describe()
    for name, rows in panels(cal).items():
        present = [p for p in rows if p[0] in arrays]
        if not present:
            continue
        path = out_dir / f"{stem}_{name}.png"
        title = caption
        if name == "parallax" and defocus_angstrom is not None:
            title += f"; fitted defocus {defocus_angstrom:.4g} Å"
        try:
            save_figure(path, [(arrays[key], t, cmap) for key, t, cmap in present], dpi, title)
        except Exception as exc:  # a plotting failure costs one image, not the analysis
            warn(f"{name} image failed: {type(exc).__name__}: {exc}")
            continue
        images[name] = path
    return images


def save_figure(path: Path, rows: list[tuple[np.ndarray, str, str]], dpi: int, caption: str = "") -> None:
    """One figure of side-by-side panels, written under a temporary name and renamed (never half a PNG)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(rows), 4.3), layout="constrained")
    if caption:
        fig.suptitle(caption, fontsize=8)
    for k, (data, title, cmap) in enumerate(rows):
        ax = fig.add_subplot(1, len(rows), k + 1)
        shown = np.log1p(np.clip(data, 0, None)) if "log" in title else data
        lo, hi = limits(shown, symmetric=cmap == "RdBu_r")
        im = ax.imshow(shown, cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
        fig.colorbar(im, ax=ax, shrink=0.8)
    tmp = path.with_name(f".{path.name}.partial")
    fig.savefig(tmp, dpi=dpi, format="png")
    os.replace(tmp, path)


def limits(data: np.ndarray, symmetric: bool) -> tuple[float, float]:
    """Display range from the 1st-99th percentiles, so a few hot or dead positions do not wash out contrast."""
    finite = data[np.isfinite(data)]
    if not finite.size:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [1, 99])
    if symmetric:
        m = max(abs(lo), abs(hi)) or 1.0
        return -m, m
    return (float(lo), float(hi)) if hi > lo else (float(lo) - 0.5, float(lo) + 0.5)
