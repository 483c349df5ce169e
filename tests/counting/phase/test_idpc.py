"""Integrated DPC: a known phase from its gradient field (turned by a rotation), and the simulated sample
from the live images' centre-of-mass sums."""

from __future__ import annotations

import numpy as np

from counting.phase.idpc import idpc, idpc_from_sums
from counting.phase.model import rotation
from tests.counting.phase.conftest import simulate


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _phase(n: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:n, 0:n]
    blobs = [(rng.uniform(0.5, 1.5), *rng.uniform(10, n - 10, 2), rng.uniform(3, 8)) for _ in range(6)]
    return sum(a * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * s**2)) for a, cx, cy, s in blobs)


def test_idpc_recovers_a_phase_from_its_gradient():
    phi = _phase()
    gy, gx = np.gradient(phi)
    assert _corr(idpc(gx, gy), phi) > 0.98


def test_idpc_undoes_the_detector_rotation():
    phi = _phase()
    gy, gx = np.gradient(phi)
    turn = rotation(-120.0)  # the CoM as the detector sees it: scan gradient = R(120) com
    com_x, com_y = turn[0, 0] * gx + turn[0, 1] * gy, turn[1, 0] * gx + turn[1, 1] * gy
    assert _corr(idpc(com_x, com_y, rotation=120.0), phi) > 0.98
    assert _corr(idpc(com_x, com_y), phi) < 0  # unturned, the phase comes out inverted


def test_idpc_of_the_simulated_scan_shows_the_sample():
    scan = simulate(rotation=20.0)  # in focus: the disk's deflection is the only CoM signal
    a, g = scan.live.arrays, scan.live.geometry
    phase = idpc_from_sums(a.counts, a.sum_col, a.sum_row, g.cx, g.cy, (64, 64), 20.0, scan.mask)
    thickness = scan.camera.sample_image()  # the disk moves along the thickness gradient
    assert _corr(phase[:, :-1], thickness) > 0.9
    unturned = idpc_from_sums(a.counts, a.sum_col, a.sum_row, g.cx, g.cy, (64, 64), None, scan.mask)
    assert _corr(unturned[:, :-1], thickness) < _corr(phase[:, :-1], thickness)


def test_unseen_positions_count_as_no_gradient():
    phi = _phase()
    gy, gx = np.gradient(phi)
    used = np.zeros(phi.shape, bool)
    used[:32] = True
    out = idpc(gx, gy, used=used)
    assert out.shape == phi.shape and np.isfinite(out).all()
    assert _corr(out[:24], phi[:24]) > 0.9
