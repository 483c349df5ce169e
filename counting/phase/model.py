"""The parallax aberration model: how a bright-field detector position's image is shifted.

Vectors are (x, y) = (scan/detector column, row), angles in degrees from +x towards +y. A detector
position k (detector px from the BF disk centre) sees the object shifted by s = M k (scan px), with
M = R(theta) S: S = C1 I + A1 [[cos 2phi, sin 2phi], [sin 2phi, -cos 2phi]] (defocus C1, two-fold
astigmatism A1 at angle phi, both in scan px per detector px) and R(theta) the rotation from detector to
scan axes. A bin image I_k then equals the object image O at r + M k: I_k(r) = O(r + M k).

The decomposition of a measured M is unique up to theta -> theta + 180 deg with S -> -S; we report the
branch with |theta| <= 90 deg (or the one nearest a given rotation hint), so the defocus keeps its sign.
"""

from __future__ import annotations

import math

import numpy as np


def rotation(theta_deg: float) -> np.ndarray:
    """2x2 rotation by theta (degrees), (x, y) basis."""
    t = math.radians(theta_deg)
    c, s = math.cos(t), math.sin(t)
    return np.array([[c, -s], [s, c]])


def aberration_matrix(c1: float, a1: float = 0.0, phi_deg: float = 0.0, theta_deg: float = 0.0) -> np.ndarray:
    """M = R(theta) S of defocus c1, astigmatism a1 at phi, rotation theta ((x, y) basis, scan px per det px)."""
    p = math.radians(2.0 * phi_deg)
    astig = a1 * np.array([[math.cos(p), math.sin(p)], [math.sin(p), -math.cos(p)]])
    return rotation(theta_deg) @ (c1 * np.eye(2) + astig)


def decompose(m: np.ndarray, rotation_hint_deg: float | None = None) -> tuple[float, float, float, float]:
    """(c1, a1, phi_deg, theta_deg) of a 2x2 M = R(theta) S (S symmetric); a1 >= 0, phi in (-90, 90]."""
    (a, b), (c, d) = np.asarray(m, np.float64)
    theta = math.degrees(math.atan2(c - b, a + d))  # the branch with trace(S) >= 0
    choices = (theta, _wrap180(theta + 180.0))
    if rotation_hint_deg is None:
        theta = min(choices, key=abs)
    else:
        theta = min(choices, key=lambda t: abs(_wrap180(t - rotation_hint_deg)))
    s = rotation(-theta) @ np.array([[a, b], [c, d]])
    c1 = 0.5 * (s[0, 0] + s[1, 1])
    half = 0.5 * (s[0, 0] - s[1, 1])
    sym = 0.5 * (s[0, 1] + s[1, 0])
    a1 = math.hypot(half, sym)
    if a1 <= 1e-12 * max(abs(c1), 1e-300):  # rounding, not astigmatism: no angle to speak of
        a1 = 0.0
    phi = 0.5 * math.degrees(math.atan2(sym, half)) if a1 > 0 else 0.0
    return c1, a1, _wrap90(phi), theta


def _wrap180(angle: float) -> float:
    """Angle in (-180, 180]."""
    out = math.fmod(angle + 180.0, 360.0)
    out = out + 360.0 if out <= 0 else out
    return out - 180.0


def _wrap90(angle: float) -> float:
    """Angle in (-90, 90] (a two-fold axis)."""
    out = math.fmod(angle + 90.0, 180.0)
    out = out + 180.0 if out <= 0 else out
    return out - 90.0
