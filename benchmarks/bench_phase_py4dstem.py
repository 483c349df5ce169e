"""py4DSTEM's parallax (0.14.18, py4DSTEM.process.phase.Parallax) next to counting.phase on the same
written counted scan: bench_phase.py --py4dstem calls compare().

Calibration given to both: scan step 0.1 nm (1 A), 0.1 mrad per unbinned detector pixel, 300 kV; py4DSTEM
gets the dense datacube binned 8 x 8 on the detector (72 x 72: its parallax holds every bright-field pixel's
image in memory). Both report |C1| and |A1| in nm (sign and angle conventions differ: compared as
magnitudes).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from counting.geometry import ALL_SECTORS
from counting.phase.accumulate import ParallaxAccumulator
from counting.phase.bins import ParallaxBins
from counting.phase.fit import fit_aberrations
from counting.sparse import CountedScan, read_counted_scan, write_counted_scan

STEP_NM, MRAD_PER_PX, BIN = 0.1, 0.1, 8
THRESHOLD = 0.8  # py4DSTEM's default: bright-field pixels above this fraction of the mean pattern's max


def _written_scan(cam, directory: Path) -> Path:
    """The simulator's counted events written as a stemstream (stempy-layout) file."""
    events = np.empty((cam.scan.positions, 1), object)
    for positions, _, offsets, indices in cam.iter_counted(1024):
        for j, p in enumerate(positions):
            events[p, 0] = indices[offsets[j] : offsets[j + 1]]
    masks = np.full((cam.scan.positions, 1), ALL_SECTORS, np.uint8)
    return write_counted_scan(directory / "scan.h5", CountedScan(cam.scan, events, masks))


def _ours(scan: CountedScan, geometry) -> tuple[dict, float]:
    t0 = time.perf_counter()
    acc = ParallaxAccumulator(scan.scan.height, scan.scan.width, ParallaxBins.from_geometry(geometry))
    ev = scan.events[:, 0]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in ev])]).astype(np.int64)
    acc.add(np.arange(len(ev)), np.full(len(ev), ALL_SECTORS, np.uint8), offsets, np.concatenate(ev))
    mask = np.ones((scan.scan.height, scan.scan.width), bool)
    mask[:, -1] = False
    fit = fit_aberrations(acc.snapshot(), mask).calibrate(STEP_NM, MRAD_PER_PX)
    return {
        "C1_nm": fit.defocus,
        "A1_nm": fit.astigmatism,
        "rotation_deg": fit.rotation,
    }, time.perf_counter() - t0


def _py4dstem(scan: CountedScan) -> tuple[dict, float]:
    import py4DSTEM  # noqa: PLC0415 (heavy, only for this comparison)
    from py4DSTEM.process.phase import Parallax  # noqa: PLC0415

    t0 = time.perf_counter()
    dense = scan.to_dense(BIN, np.float32)[:, :-1]  # without the flyback column
    dc = py4DSTEM.DataCube(data=dense)
    dc.calibration.set_R_pixel_size(STEP_NM * 10)
    dc.calibration.set_R_pixel_units("A")
    dc.calibration.set_Q_pixel_size(MRAD_PER_PX * BIN)
    dc.calibration.set_Q_pixel_units("mrad")
    par = Parallax(energy=300e3, datacube=dc, verbose=False)
    par.preprocess(plot_average_bf=False, edge_blend=8, threshold_intensity=THRESHOLD)
    par.reconstruct(plot_aligned_bf=False, plot_convergence=False, progress_bar=False)
    par.aberration_fit()
    c1 = float(par.aberrations_C1) / 10
    a1 = float(np.hypot(par.aberrations_C12a, par.aberrations_C12b)) / 10
    out = {"C1_nm": c1, "A1_nm": a1, "rotation_deg": float(np.degrees(par.rotation_Q_to_R_rads))}
    return out, time.perf_counter() - t0


def compare(side: int = 64) -> dict:
    """Both fits of one simulated side x side scan at 200 e/frame (bench_phase's parallax), from its file."""
    from benchmarks.bench_phase import GEOMETRY, TRUTH, camera  # noqa: PLC0415

    factor = STEP_NM * 1000 / MRAD_PER_PX
    with tempfile.TemporaryDirectory() as tmp:
        scan = read_counted_scan(_written_scan(camera(side), Path(tmp)))
        ours, ours_s = _ours(scan, GEOMETRY)
        theirs, theirs_s = _py4dstem(scan)
    out = {
        "side": side,
        "truth": {"C1_nm": TRUTH["defocus"] * factor, "A1_nm": TRUTH["astigmatism"] * factor},
        "ours": {**ours, "seconds": ours_s},
        "py4dstem": {**theirs, "seconds": theirs_s},
        "C1_ratio_abs": abs(ours["C1_nm"]) / abs(theirs["C1_nm"]),
    }
    print(
        f"py4DSTEM on the same file: |C1| {abs(theirs['C1_nm']):.1f} nm ({theirs_s:.1f} s), ours "
        f"{abs(ours['C1_nm']):.1f} nm ({ours_s:.2f} s), truth {out['truth']['C1_nm']:.1f} nm; |A1| "
        f"{theirs['A1_nm']:.1f} vs {ours['A1_nm']:.1f} nm (truth {out['truth']['A1_nm']:.1f})"
    )
    return out


if __name__ == "__main__":
    compare()
