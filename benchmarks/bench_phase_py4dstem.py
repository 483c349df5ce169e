"""py4DSTEM's parallax (0.14.18, py4DSTEM.process.phase.Parallax) next to counting.phase on the same
written counted scan, for several seeds and defoci at 200 e/frame; bench_phase.py --py4dstem calls compare().

Usage: python benchmarks/bench_phase_py4dstem.py [--side 64] [--textures 0 1] [--json PATH] [--with-default]

Both read one calibration from the file: the benchmark attaches /metadata/microscope (scan step 1 Å,
convergence semi-angle 18 mrad over the simulator's 180 px disk: 0.1 mrad per detector pixel, 300 keV)
as a session does (counting.microscope_meta); ours takes it through counting.phase.scale, py4DSTEM as its
R pixel size (Å), Q pixel size (mrad per binned pixel) and energy. The truth in nm follows from the same
numbers: C1 = M * step / (mrad/px / 1000).

py4DSTEM runs on the dense datacube binned on the detector (its parallax holds every bright-field pixel's
image in memory). Two set-ups: "default" (8 x 8 binned, reconstruct() as shipped: alignment down to single
pixels) and "coarse" (16 x 16 binned, alignment bins 16, 16, 8, 8, 8, 8: at 200 e/frame a single binned
pixel holds ~0.1-0.5 electrons per position, and its cross-correlation is noise). Each py4DSTEM result is
also given as the C1 of its own measured pixel shifts (a least-squares map of shift vs detector pixel,
scaled by the same calibration): it equals the C1 py4DSTEM reports, so any gap to the truth is in the
shifts it measured, not in the calibration. Two samples: the simulator's own (a few smooth particles on
a plain film) and the same with a fine film texture (SimulatorConfig.texture, --textures): py4DSTEM's
alignment needs the texture (docs/guide/phase-contrast.md). Sign and angle conventions differ (py4DSTEM: scan x = rows,
its rotation the other way): C1 and A1 are compared as magnitudes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from counting.geometry import ALL_SECTORS, ScanShape  # noqa: E402
from counting.microscope_meta import MicroscopeMetadata, attach_microscope, read_microscope  # noqa: E402
from counting.phase.accumulate import ParallaxAccumulator  # noqa: E402
from counting.phase.bins import ParallaxBins  # noqa: E402
from counting.phase.fit import fit_aberrations  # noqa: E402
from counting.phase.scale import microscope_scale  # noqa: E402
from counting.simulator import SimulatedCamera, SimulatorConfig  # noqa: E402
from counting.sparse import CountedScan, read_counted_scan, write_counted_scan  # noqa: E402

STEP_A, SEMIANGLE_MRAD, ENERGY_EV = 1.0, 18.0, 300e3
TARGET = 0.05
TEXTURE = 3.0  # the textured sample's film texture (SimulatorConfig.texture)
# (seed, defocus, astigmatism, astigmatism angle, rotation), M in scan px per detector px
CASES = [(3, 0.05, 0.02, 30.0, 20.0), (1, 0.05, 0.02, 30.0, 20.0), (5, -0.04, 0.015, -50.0, 35.0)]
SETUPS = {
    "default": {"bin": 8, "reconstruct": {}},
    "coarse": {"bin": 16, "reconstruct": {"alignment_bin_values": [16, 16, 8, 8, 8, 8]}},
}


def _written_scan(cam: SimulatedCamera, directory: Path) -> Path:
    """The simulator's counted events written as a stemstream (stempy-layout) file with microscope metadata."""
    events = np.empty((cam.scan.positions, 1), object)
    for positions, _, offsets, indices in cam.iter_counted(1024):
        for j, p in enumerate(positions):
            events[p, 0] = indices[offsets[j] : offsets[j + 1]]
    masks = np.full((cam.scan.positions, 1), ALL_SECTORS, np.uint8)
    path = write_counted_scan(directory / "scan.h5", CountedScan(cam.scan, events, masks))
    meta = MicroscopeMetadata(
        source="bench_phase_py4dstem",
        source_format="json",
        source_sha256="0" * 64,
        source_mtime=0.0,
        step_angstrom=(STEP_A, STEP_A),
        convergence_semiangle_mrad=SEMIANGLE_MRAD,
        energy_ev=ENERGY_EV,
    )
    attach_microscope(path, meta, None)
    return path


def _ours(scan: CountedScan, geometry, attrs: dict) -> dict:
    t0 = time.perf_counter()
    acc = ParallaxAccumulator(scan.scan.height, scan.scan.width, ParallaxBins.from_geometry(geometry))
    ev = scan.events[:, 0]
    offsets = np.concatenate([[0], np.cumsum([len(e) for e in ev])]).astype(np.int64)
    acc.add(np.arange(len(ev)), np.full(len(ev), ALL_SECTORS, np.uint8), offsets, np.concatenate(ev))
    mask = np.ones((scan.scan.height, scan.scan.width), bool)
    mask[:, -1] = False
    step_nm, mrad_px = microscope_scale(attrs, scan.scan.width, geometry.bf_radius)
    fit = fit_aberrations(acc.snapshot(), mask).calibrate(step_nm, mrad_px)
    return {"C1_nm": fit.defocus, "A1_nm": fit.astigmatism, "seconds": time.perf_counter() - t0}


def _py4dstem(scan: CountedScan, attrs: dict, bf_radius: float, setup: dict) -> dict:
    import py4DSTEM  # noqa: PLC0415 (heavy, only for this comparison)
    from py4DSTEM.process.phase import Parallax  # noqa: PLC0415

    t0 = time.perf_counter()
    b = setup["bin"]
    dense = scan.to_dense(b, np.float32)[:, :-1]  # without the flyback column
    dc = py4DSTEM.DataCube(data=dense)
    dc.calibration.set_R_pixel_size(float(attrs["step_x_angstrom"]))
    dc.calibration.set_R_pixel_units("A")
    mrad_binned = float(attrs["convergence_semiangle_mrad"]) / bf_radius * b
    dc.calibration.set_Q_pixel_size(mrad_binned)
    dc.calibration.set_Q_pixel_units("mrad")
    par = Parallax(energy=float(attrs["energy_ev"]), datacube=dc, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        par.preprocess(plot_average_bf=False, edge_blend=8, threshold_intensity=0.8)
        par.reconstruct(
            plot_aligned_bf=False, plot_convergence=False, progress_bar=False, **setup["reconstruct"]
        )
        par.aberration_fit()
    # Its own measured shifts (scan px) against its detector pixels (binned px): the map's mean singular
    # value is |C1| in px/px when |C1| > |A1|; scaled by the file's calibration, with nothing of py4DSTEM's.
    k = par._xy_inds - par._xy_inds.mean(axis=0)
    m = np.linalg.lstsq(k, np.asarray(par._xy_shifts), rcond=None)[0]
    sv = np.linalg.svd(m, compute_uv=False)
    px_to_nm = float(attrs["step_x_angstrom"]) / 10 / (mrad_binned / 1000)
    return {
        "C1_nm": abs(float(par.aberrations_C1)) / 10,
        "A1_nm": float(np.hypot(par.aberrations_C12a, par.aberrations_C12b)) / 10,
        "C1_nm_from_its_pixel_shifts": float(sv.mean()) * px_to_nm,
        "seconds": time.perf_counter() - t0,
    }


def compare_case(side: int, case: tuple, setups: list[str], texture: float = 0.0) -> dict:
    """Ours and py4DSTEM's fits of one simulated side x side scan at 200 e/frame, from its written file."""
    from benchmarks.bench_phase import GEOMETRY  # noqa: PLC0415

    seed, c1, a1, phi, theta = case
    truth_px = {"defocus": c1, "astigmatism": a1, "astigmatism_angle": phi, "rotation": theta}
    config = SimulatorConfig(ScanShape(side, side), dose=200.0, seed=seed, texture=texture, **truth_px)
    cam = SimulatedCamera(config)
    with tempfile.TemporaryDirectory() as tmp:
        path = _written_scan(cam, Path(tmp))
        scan = read_counted_scan(path)
        attrs, _ = read_microscope(path)
    step_nm, mrad_px = microscope_scale(attrs, side, GEOMETRY.bf_radius)
    factor = step_nm * 1000 / mrad_px
    out = {
        "side": side,
        "seed": seed,
        "texture": texture,
        "truth_px": truth_px,
        "truth": {"C1_nm": abs(c1) * factor, "A1_nm": a1 * factor},
        "calibration": {"step_nm": step_nm, "mrad_per_px": mrad_px, "energy_ev": attrs["energy_ev"]},
        "ours": _ours(scan, GEOMETRY, attrs),
        "py4dstem": {name: _py4dstem(scan, attrs, GEOMETRY.bf_radius, SETUPS[name]) for name in setups},
    }
    out["ours"]["C1_nm"] = abs(out["ours"]["C1_nm"])
    truth = out["truth"]
    out["ratios"] = {
        "ours_C1_vs_truth": out["ours"]["C1_nm"] / truth["C1_nm"],
        "ours_A1_vs_truth": out["ours"]["A1_nm"] / truth["A1_nm"],
        **{f"ours_C1_vs_py4dstem_{n}": out["ours"]["C1_nm"] / r["C1_nm"] for n, r in out["py4dstem"].items()},
        **{f"py4dstem_{n}_C1_vs_truth": r["C1_nm"] / truth["C1_nm"] for n, r in out["py4dstem"].items()},
    }
    return out


def _print(row: dict) -> None:
    t, o = row["truth"], row["ours"]
    print(
        f"seed {row['seed']} {row['side']}x{row['side']} texture {row['texture']:g}: truth |C1| {t['C1_nm']:.1f} nm |A1| {t['A1_nm']:.1f} nm; "
        f"ours {o['C1_nm']:.1f} / {o['A1_nm']:.1f} nm ({o['seconds']:.2f} s)"
    )
    for name, r in row["py4dstem"].items():
        ratio = row["ratios"][f"ours_C1_vs_py4dstem_{name}"]
        verdict = "within" if abs(ratio - 1) <= TARGET else "outside"
        print(
            f"    py4DSTEM {name:8s} {r['C1_nm']:.1f} / {r['A1_nm']:.1f} nm ({r['seconds']:.1f} s; from its pixel "
            f"shifts {r['C1_nm_from_its_pixel_shifts']:.1f} nm): ours/py4DSTEM C1 {ratio:.3f}, {verdict} "
            f"the {TARGET:.0%} target; py4DSTEM/truth {r['C1_nm'] / t['C1_nm']:.3f}"
        )


def compare(side: int = 64, with_default: bool = False, textures: tuple = (0.0, TEXTURE)) -> dict:
    """Every case's comparison on each sample (the default set-up on the first case of the plain sample
    only, unless with_default)."""
    rows = []
    for texture in textures:
        for i, case in enumerate(CASES):
            first = i == 0 and texture == textures[0]
            setups = ["coarse", "default"] if with_default or first else ["coarse"]
            rows.append(compare_case(side, case, setups, texture))
            _print(rows[-1])
    return {"dose": 200.0, "target": TARGET, "cases": rows}


def main() -> None:
    """Print the comparison and write JSON."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--side", type=int, default=64)
    ap.add_argument("--textures", type=float, nargs="+", default=[0.0, TEXTURE], help="samples: film texture")
    ap.add_argument("--with-default", action="store_true", help="py4DSTEM's default set-up on every case")
    ap.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "phase_py4dstem.json")
    a = ap.parse_args()
    out = compare(a.side, a.with_default, tuple(a.textures))
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
