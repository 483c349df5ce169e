"""The README's phase-contrast picture: a simulated scan at a defocus where the virtual bright field is
blurred, its virtual BF beside the tilt-corrected BF the stream's parallax fit gives (counting.phase, the
live view's code), and the simulated object; each image's correlation with the object in its title.

Usage: python benchmarks/bench_phase_picture.py [--side 128] [--defocus 0.2] [--seed 3]
                                                 [--out docs/images/phase-tcbf-vs-vbf.png]

Seeded: the same arguments give the same picture. Prints the correlations and the fitted defocus.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from counting.geometry import ScanShape  # noqa: E402
from counting.live_images import LiveGeometry  # noqa: E402
from counting.phase.accumulate import ParallaxAccumulator  # noqa: E402
from counting.phase.bins import ParallaxBins  # noqa: E402
from counting.phase.fit import fit_aberrations  # noqa: E402
from counting.phase.shift_sum import tilt_corrected_bf, virtual_bf  # noqa: E402
from counting.simulator import SimulatedCamera, SimulatorConfig  # noqa: E402

GEOMETRY = LiveGeometry(288.0, 288.0, 180.0, 200.0, 400.0)  # the simulator's BF disk
OUT = Path(__file__).resolve().parents[1] / "docs" / "images" / "phase-tcbf-vs-vbf.png"


def corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two images."""
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def images(side: int, defocus: float, seed: int) -> dict:
    """The object, vBF and tcBF on the sample columns (flyback left out), the fit and the correlations."""
    config = SimulatorConfig(ScanShape(side, side), dose=200.0, seed=seed, defocus=defocus)
    cam = SimulatedCamera(config)
    acc = ParallaxAccumulator(side, side, ParallaxBins.from_geometry(GEOMETRY))
    for batch in cam.iter_counted(1024):
        acc.add(*batch)
    snap = acc.snapshot()
    mask = np.ones((side, side), bool)
    mask[:, -1] = False  # the flyback column is not the sample
    fit = fit_aberrations(snap, mask)
    out = {
        "object": 1.0 - cam.scatter_fraction()[:, :-1],
        "vbf": virtual_bf(snap, mask)[:, :-1],
        "tcbf": tilt_corrected_bf(snap, fit.model_shifts(), mask)[:, :-1],
        "fit": fit,
    }
    out["corr_vbf"], out["corr_tcbf"] = corr(out["vbf"], out["object"]), corr(out["tcbf"], out["object"])
    return out


def draw(got: dict, side: int, defocus: float, path: Path) -> None:
    """Three panels: object, virtual BF, tilt-corrected BF, each with its correlation to the object."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.9), dpi=100)
    fit = got["fit"]
    panels = (
        ("simulated object (BF transmission)", got["object"]),
        (f"virtual BF: r = {got['corr_vbf']:.3f}", got["vbf"]),
        (f"tilt-corrected BF: r = {got['corr_tcbf']:.3f}", got["tcbf"]),
    )
    for ax, (title, img) in zip(axes, panels, strict=True):
        lo, hi = np.percentile(img, [1, 99])
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_axis_off()
    fig.suptitle(
        f"{side} x {side} simulated scan, 200 e/frame, defocus {defocus} scan px per detector px "
        f"(fitted {fit.defocus:.4f} ± {fit.defocus_err:.1g}); r: correlation with the object",
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Software": None})  # no version stamp: the same picture each run
    plt.close(fig)


def main() -> None:
    """Make the picture and print its numbers."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=128)
    parser.add_argument("--defocus", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    got = images(args.side, args.defocus, args.seed)
    draw(got, args.side, args.defocus, args.out)
    fit = got["fit"]
    print(
        f"{args.side}x{args.side}, defocus {args.defocus}: fitted {fit.defocus:.5f} ± {fit.defocus_err:.2g}; "
        f"correlation with the object: virtual BF {got['corr_vbf']:.3f}, tilt-corrected BF "
        f"{got['corr_tcbf']:.3f}; {args.out}"
    )


if __name__ == "__main__":
    main()
