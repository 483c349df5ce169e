"""The simulated camera's compiled core: what hits one frame, and the charge it leaves there.

Frame i's randomness comes from a counter-based generator seeded by (camera key, i), so a frame's content
depends only on the config and its index, never on batch size or order. _gen_events draws Poisson(dose)
electrons (uniform in the bright-field disk, or scattered into the halo beyond it; in a flyback frame the
disk centre of each electron is spread along a smear) with gamma-distributed
charges and sub-pixel positions, then Poisson(xray_rate) x-ray hits of 1 or 2x2 pixels. With a parallax
(a defocused probe, counting.simulator.config), a bright-field electron at disk offset k stays unscattered
with the sample's transmission at r + M k instead (_parallax_point). _deposit adds each
electron as a pixel-integrated Gaussian over its 3x3 pixels (a footprint table) and each x-ray pixel's ADU,
saturating at uint16, optionally logging (index, old value) so restore can take the frame off again.

The model tuple (built by counting.simulator.model) and the scratch arrays (new_scratch) have the layouts
unpacked at the top of _gen_events. Every compiled function lives in this one file: numba's cache does not
notice changes to a callee defined in another file.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from counting.geometry import FRAME_COLS, FRAME_ROWS

UINT16_MAX = 65535
SUBPIXEL_BINS = 64  # footprint table resolution per axis

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_INV_2_53 = 1.0 / 9007199254740992.0


def new_scratch(max_electrons: int, max_xray_pixels: int) -> tuple[np.ndarray, ...]:
    """Per-camera working arrays for the kernels, sized for the most events one frame can have."""
    ne, nx = max(max_electrons, 1), max(max_xray_pixels, 1)
    return (
        np.zeros(2, np.uint64),  # RNG state, and a sink for _deposit's cache-line checksum
        np.zeros(ne, np.uint32),  # electron pixels
        np.zeros(ne, np.int32),  # sub-pixel row bins
        np.zeros(ne, np.int32),  # sub-pixel column bins
        np.zeros(ne, np.float64),  # charges
        np.zeros(nx, np.uint32),  # x-ray pixels
        np.zeros(nx, np.float64),  # x-ray ADU
    )


def log_capacity(max_electrons: int, max_xray_pixels: int) -> int:
    """Undo-log entries one frame can need: 9 pixels per electron, one per x-ray pixel."""
    return 9 * max_electrons + max_xray_pixels


@nb.njit(cache=True)
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


@nb.njit(cache=True)
def _uniform(st):
    st[0] += _GOLDEN
    return (_mix(st[0]) >> np.uint64(11)) * _INV_2_53


@nb.njit(cache=True)
def _draw_count(cdf, u):
    lo = 0
    hi = cdf.shape[0] - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cdf[mid] > u:
            hi = mid
        else:
            lo = mid + 1
    return lo


@nb.njit(cache=True)
def _quantile(table, u):
    x = u * table.shape[0] - 0.5
    if x <= 0.0:
        return table[0]
    j = int(x)
    if j >= table.shape[0] - 1:
        return table[table.shape[0] - 1]
    f = x - j
    return table[j] * (1.0 - f) + table[j + 1] * f


@nb.njit(cache=True)
def _bilinear(img, y, x):
    """img at (y, x), bilinear, clamped to its edges."""
    h, w = img.shape
    y = min(max(y, 0.0), h - 1.0)
    x = min(max(x, 0.0), w - 1.0)
    i, j = int(y), int(x)
    i1, j1 = min(i + 1, h - 1), min(j + 1, w - 1)
    fy, fx = y - i, x - j
    top = img[i, j] * (1.0 - fx) + img[i, j1] * fx
    return top * (1.0 - fy) + (img[i1, j] * (1.0 - fx) + img[i1, j1] * fx) * fy


@nb.njit(cache=True)
def _halo_point(st, cy, cx, radius, halo, halo_tab):
    """A scattered electron's position beyond the disk edge, inside the frame's 3x3-footprint border."""
    while True:
        while True:
            a = 2.0 * _uniform(st) - 1.0
            b = 2.0 * _uniform(st) - 1.0
            q = a * a + b * b
            if 0.0 < q <= 1.0:
                break
        rr = (radius + halo * _quantile(halo_tab, _uniform(st))) / math.sqrt(q)
        y = cy + rr * a
        x = cx + rr * b
        if (
            1 <= int(math.floor(y + 0.5)) <= FRAME_ROWS - 2
            and 1 <= int(math.floor(x + 0.5)) <= FRAME_COLS - 2
        ):
            return y, x


@nb.njit(cache=True)
def _parallax_point(st, p, cy, cx, radius, halo, halo_tab, m, obj, scan_w, pad):
    """An electron of a defocused probe at position p: a uniform point k of the disk stays in the bright
    field with the sample's transmission at r + M k (M in the (row, col) basis; obj padded by pad), else
    it is scattered."""
    while True:
        a = 2.0 * _uniform(st) - 1.0
        b = 2.0 * _uniform(st) - 1.0
        if a * a + b * b < 1.0:
            break
    ky, kx = radius * a, radius * b
    sy = p // scan_w + pad + m[0, 0] * ky + m[0, 1] * kx
    sx = p % scan_w + pad + m[1, 0] * ky + m[1, 1] * kx
    if _uniform(st) >= _bilinear(obj, sy, sx):
        return cy + ky, cx + kx
    return _halo_point(st, cy, cx, radius, halo, halo_tab)


@nb.njit(cache=True)
def _focus_point(st, cy, cx0, sm, sc, radius, halo, halo_tab):
    """An electron of an in-focus probe: uniform in the disk, or scattered into the halo with the
    position's scattered fraction sc; in a flyback frame (smear sm > 0) the disk is smeared."""
    while True:
        # A smeared (flyback) disk: each electron's disk centre lies somewhere along the smear. Only
        # smeared frames draw this number, so the other frames' random streams are unchanged.
        cx = cx0 + (sm * (_uniform(st) - 0.5) if sm > 0.0 else 0.0)
        if _uniform(st) < sc:
            y, x = _halo_point(st, cy, cx, radius, halo, halo_tab)
        else:
            while True:
                a = 2.0 * _uniform(st) - 1.0
                b = 2.0 * _uniform(st) - 1.0
                if a * a + b * b < 1.0:
                    break
            y = cy + radius * a
            x = cx + radius * b
        row = int(math.floor(y + 0.5))
        col = int(math.floor(x + 0.5))
        # The config keeps an unsmeared disk inside the frame; a smeared one may leave it: draw again.
        if sm == 0.0 or (1 <= row <= FRAME_ROWS - 2 and 1 <= col <= FRAME_COLS - 2):
            return y, x


@nb.njit(cache=True)
def _draw_xrays(st, x_cdf, xray_adu, xray_2x2, x_pix, x_val):
    """Poisson x-ray hits of 1 or 2x2 pixels into (x_pix, x_val); returns the pixels drawn."""
    nxh = _draw_count(x_cdf, _uniform(st))
    m = 0
    for _ in range(nxh):
        row = min(int(_uniform(st) * FRAME_ROWS), FRAME_ROWS - 1)
        col = min(int(_uniform(st) * FRAME_COLS), FRAME_COLS - 1)
        big = _uniform(st) < xray_2x2 and row < FRAME_ROWS - 1 and col < FRAME_COLS - 1
        for dr in range(2 if big else 1):
            for dc in range(2 if big else 1):
                x_pix[m] = (row + dr) * FRAME_COLS + col + dc
                x_val[m] = xray_adu * (0.5 + _uniform(st))
                m += 1
    return m


@nb.njit(cache=True)
def _gen_events(i, model, scratch):
    """Draw frame i's electrons and x-ray pixels into the scratch arrays; returns (electrons, x-ray pixels)."""
    (
        key,
        fpp,
        centers,
        scatter,
        smear,
        radius,
        halo,
        e_cdf,
        x_cdf,
        charge_tab,
        halo_tab,
        xray_adu,
        xray_2x2,
        par_on,
        par_m,
        par_obj,
        scan_w,
        par_pad,
    ) = model
    st, e_pix, e_qy, e_qx, e_charge, x_pix, x_val = scratch
    st[0] = _mix(key ^ _mix(np.uint64(i) + _GOLDEN))
    p = i // fpp
    cy = centers[p, 0]
    sm = smear[p]
    sc = scatter[p]
    nq = SUBPIXEL_BINS
    ne = _draw_count(e_cdf, _uniform(st))
    parallax = par_on and sm == 0.0  # a flyback frame is not on the sample
    for k in range(ne):
        if parallax:
            y, x = _parallax_point(
                st, p, cy, centers[p, 1], radius, halo, halo_tab, par_m, par_obj, scan_w, par_pad
            )
        else:
            y, x = _focus_point(st, cy, centers[p, 1], sm, sc, radius, halo, halo_tab)
        row = int(math.floor(y + 0.5))
        col = int(math.floor(x + 0.5))
        qy = int((y - row + 0.5) * nq)
        qx = int((x - col + 0.5) * nq)
        e_qy[k] = min(max(qy, 0), nq - 1)
        e_qx[k] = min(max(qx, 0), nq - 1)
        e_pix[k] = row * FRAME_COLS + col
        e_charge[k] = _quantile(charge_tab, _uniform(st))
    m = _draw_xrays(st, x_cdf, xray_adu, xray_2x2, x_pix, x_val)
    return ne, m


@nb.njit(cache=True)
def _deposit(frame, ne, e_pix, e_qy, e_qx, e_charge, footprint, nxp, x_pix, x_val, log_idx, log_val, do_log):
    """Add the drawn charge to a flat frame with uint16 saturation; log (index, old value) if asked.

    Returns the number of log entries and a checksum of the lines it touched first (callers store it so the
    compiler keeps those loads): independent loads of every touched cache line let the misses overlap instead
    of serialising behind the arithmetic, a third of the cost when the ring is larger than the cache."""
    touch = 0
    for k in range(ne):
        touch += frame[e_pix[k] - FRAME_COLS] + frame[e_pix[k]] + frame[e_pix[k] + FRAME_COLS]
    m = 0
    for k in range(ne):
        qx = e_qx[k]
        for a in range(3):
            wa = e_charge[k] * footprint[e_qy[k], a]
            start = e_pix[k] + (a - 1) * FRAME_COLS - 1
            for b in range(3):
                idx = start + b
                old = frame[idx]
                v = old + int(wa * footprint[qx, b] + 0.5)
                if do_log:
                    log_idx[m] = idx
                    log_val[m] = old
                    m += 1
                frame[idx] = min(v, UINT16_MAX)
    for k in range(nxp):
        idx = x_pix[k]
        old = frame[idx]
        v = old + int(x_val[k] + 0.5)
        if do_log:
            log_idx[m] = idx
            log_val[m] = old
            m += 1
        frame[idx] = min(v, UINT16_MAX)
    return m, touch


@nb.njit(cache=True)
def restore(frame, log_idx, log_val, n):
    for k in range(n - 1, -1, -1):
        frame[log_idx[k]] = log_val[k]


@nb.njit(cache=True)
def _unique_sorted(values, n, out, start):
    """Write the sorted unique values[:n] to out[start:]; return how many."""
    s = np.sort(values[:n])
    u = 0
    for j in range(n):
        if j == 0 or s[j] != s[j - 1]:
            out[start + u] = s[j]
            u += 1
    return u


@nb.njit(cache=True)
def render_batch(dst, ring, slot0, i0, n, in_place, log_idx, log_val, log_n, model, footprint, scratch,
                  want_truth, truth, offsets):  # fmt: skip
    """Render frames i0..i0+n-1 from ring slots slot0.. either in place (logged) or into dst (a copy)."""
    _, e_pix, e_qy, e_qx, e_charge, x_pix, x_val = scratch
    offsets[0] = 0
    for k in range(n):
        q = slot0 + k
        if in_place:
            frame = ring[q]
            restore(frame, log_idx[q], log_val[q], log_n[q])
        else:
            frame = dst[k]
            frame[:] = ring[q]
            restore(frame, log_idx[q], log_val[q], log_n[q])
        ne, nxp = _gen_events(i0 + k, model, scratch)
        m, touch = _deposit(frame, ne, e_pix, e_qy, e_qx, e_charge, footprint, nxp, x_pix, x_val, log_idx[q],
                            log_val[q], in_place)  # fmt: skip
        scratch[0][1] ^= np.uint64(touch)
        if in_place:
            log_n[q] = m
        u = _unique_sorted(e_pix, ne, truth, offsets[k]) if want_truth else 0
        offsets[k + 1] = offsets[k] + u


@nb.njit(cache=True)
def frame_truth(i, model, scratch, e_out, x_out):
    ne, nxp = _gen_events(i, model, scratch)
    return _unique_sorted(scratch[1], ne, e_out, 0), _unique_sorted(scratch[5], nxp, x_out, 0)


@nb.njit(cache=True)
def truth_batch(i0, n, model, scratch, out, offsets):
    """Frames i0..i0+n-1's true electron pixels (sorted unique), no frames rendered: CSR in (offsets, out)."""
    offsets[0] = 0
    for k in range(n):
        ne, _ = _gen_events(i0 + k, model, scratch)
        offsets[k + 1] = offsets[k] + _unique_sorted(scratch[1], ne, out, offsets[k])
