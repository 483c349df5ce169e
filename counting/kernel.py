"""The electron-counting kernel: frames in, per-frame event indices out.

An event is a pixel whose value ``v = (raw - dark) / gain`` is strictly above the background threshold,
strictly below the x-ray threshold, and strictly greater than each of its in-frame 8 neighbours, where a
neighbour outside the (background, x-ray) window counts as 0 (stempy's rule: an x-ray neighbour does not
block). Output per frame: ascending uint32 flat indices ``row * 576 + col``.

Speed comes from never doing float work for ordinary pixels: a per-pixel integer ``lo1`` (the smallest raw
value that can pass the background threshold at that pixel) is precomputed once per dark/gain/threshold, so
the hot loop is a uint16 compare that LLVM vectorises, done hierarchically over 64- and 8-pixel chunks.
Only the rare candidates get the exact float test and the neighbour check.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numba as nb
import numpy as np

from counting.geometry import FRAME_COLS, FRAME_ROWS, FRAME_SHAPE

# Strict local maxima cannot touch, so a 576x576 frame holds at most one per 2x2 block.
MAX_EVENTS_PER_FRAME = (FRAME_ROWS // 2) * (FRAME_COLS // 2)
_CHUNK = 64  # outer screening chunk; divides 576
_SUB = 8  # inner screening chunk


@dataclass(frozen=True)
class Thresholds:
    """Counting thresholds in ADU above the dark (after gain): keep background < v < xray."""

    background: float
    xray: float

    def __post_init__(self) -> None:
        if not (np.isfinite(self.background) and np.isfinite(self.xray)):
            raise ValueError(f"thresholds must be finite, got {self.background}, {self.xray}")
        if self.xray <= self.background:
            raise ValueError(
                f"x-ray threshold ({self.xray}) must be above the background threshold ({self.background})"
            )


@dataclass
class EventList:
    """Events of a batch of frames in CSR form: frame i owns indices[offsets[i]:offsets[i+1]]."""

    indices: np.ndarray  # uint32
    offsets: np.ndarray  # int64, len n+1

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.indices[self.offsets[i] : self.offsets[i + 1]]

    @property
    def counts(self) -> np.ndarray:
        """Number of events per frame."""
        return np.diff(self.offsets)

    def to_list(self) -> list[np.ndarray]:
        """One array of indices per frame (views into ``indices``)."""
        return [self[i] for i in range(len(self))]

    @staticmethod
    def concat(parts: list[EventList]) -> EventList:
        """Join event lists of consecutive batches into one."""
        if not parts:
            return EventList(np.empty(0, np.uint32), np.zeros(1, np.int64))
        indices = np.concatenate([p.indices for p in parts])
        sizes = np.concatenate([p.counts for p in parts])
        offsets = np.zeros(len(sizes) + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        return EventList(indices, offsets)


def _value(raw: np.ndarray, dark: np.ndarray, inv_gain: np.ndarray) -> np.ndarray:
    """The exact per-pixel value the kernel compares, for any raw values broadcast against dark."""
    return (raw.astype(np.float64) - dark.astype(np.float64)) * inv_gain.astype(np.float64)


def _lowest_passing_raw(dark: np.ndarray, inv_gain: np.ndarray, background: float) -> np.ndarray:
    """Per pixel, the smallest raw uint16 whose value exceeds the background threshold (clamped to uint16)."""
    guess = np.floor(dark.astype(np.float64) + background / inv_gain.astype(np.float64)) - 2
    r = np.clip(guess, 0, 65536)
    # value(r) is increasing in r, so walk up from a guess below the answer; a few steps suffice because
    # the guess is only off by float rounding.
    for _ in range(16):
        low = (r <= 65535) & (_value(np.minimum(r, 65535), dark, inv_gain) <= background)
        if not low.any():
            break
        r = np.where(low, r + 1, r)
    else:  # pragma: no cover - would need a pathological gain
        raise RuntimeError("could not derive per-pixel thresholds")
    # r == 65536 means no raw value passes; 65535 with the exact test in the kernel rejects it anyway.
    return np.minimum(r, 65535).astype(np.uint16)


class Counter:
    """A counting kernel prepared for one dark reference, gain and set of thresholds.

    Stateless after construction and safe to share between threads; ``count`` is the one array-in,
    events-out seam used by offline counting, node streamers and benchmarks alike.
    """

    def __init__(self, dark: np.ndarray | None, thresholds: Thresholds, gain: np.ndarray | None = None):
        dark_f = np.zeros(FRAME_SHAPE, np.float32) if dark is None else np.asarray(dark, dtype=np.float32)
        if dark_f.shape != FRAME_SHAPE:
            raise ValueError(f"dark reference must be {FRAME_SHAPE}, got {dark_f.shape}")
        if not np.isfinite(dark_f).all():
            raise ValueError("dark reference contains NaN or infinite values")
        if gain is None:
            inv_gain = np.ones(FRAME_SHAPE, np.float32)
        else:
            gain_f = np.asarray(gain, dtype=np.float64)
            if gain_f.shape != FRAME_SHAPE:
                raise ValueError(f"gain must be {FRAME_SHAPE}, got {gain_f.shape}")
            if not (np.isfinite(gain_f).all() and (gain_f > 0).all()):
                raise ValueError("gain must be finite and positive everywhere")
            # stempy's convention: value = (raw - dark) / gain
            inv_gain = (1.0 / gain_f).astype(np.float32)
        self.thresholds = thresholds
        self.dark = np.ascontiguousarray(dark_f.ravel())
        self.inv_gain = np.ascontiguousarray(inv_gain.ravel())
        self.lo1 = _lowest_passing_raw(self.dark, self.inv_gain, thresholds.background)

    def count(self, frames: np.ndarray, workers: int = 1) -> EventList:
        """Count a batch of (n, 576, 576) uint16 frames, splitting it over ``workers`` threads."""
        flat = _as_flat_frames(frames)
        n = flat.shape[0]
        workers = max(1, min(int(workers), n))
        if workers == 1:
            return self._count_serial(flat)
        bounds = np.linspace(0, n, workers + 1).astype(int)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            parts = list(
                pool.map(lambda ab: self._count_serial(flat[ab[0] : ab[1]]), zip(bounds[:-1], bounds[1:]))
            )
        return EventList.concat(parts)

    def count_frame(self, frame: np.ndarray) -> np.ndarray:
        """Count one 576x576 frame; returns its sorted uint32 event indices."""
        return self.count(frame.reshape(1, *FRAME_SHAPE)).indices

    def _count_serial(self, flat: np.ndarray) -> EventList:
        n = flat.shape[0]
        offsets = np.zeros(n + 1, np.int64)
        # Typical frames hold a few hundred events; grow only when a batch is unusually dense, so memory
        # per worker stays near batch * typical events plus one frame's worst case.
        capacity = max(4 * MAX_EVENTS_PER_FRAME, 1024 * n)
        out = np.empty(capacity, np.uint32)
        done, used = 0, 0
        t = self.thresholds
        while done < n:
            if capacity - used < MAX_EVENTS_PER_FRAME:
                capacity = 2 * capacity
                grown = np.empty(capacity, np.uint32)
                grown[:used] = out[:used]
                out = grown
            done, used = _count_batch(
                flat, done, self.lo1, self.dark, self.inv_gain, t.background, t.xray, out, used, offsets
            )
        return EventList(out[:used].copy(), offsets)


def _as_flat_frames(frames: np.ndarray) -> np.ndarray:
    """Validate a frame batch and view it as (n, 576*576) without copying when possible."""
    arr = np.asarray(frames)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != FRAME_SHAPE:
        raise ValueError(f"frames must be (n, 576, 576), got {arr.shape}")
    if arr.dtype != np.uint16:
        raise ValueError(f"frames must be uint16, got {arr.dtype}")
    return np.ascontiguousarray(arr).reshape(arr.shape[0], FRAME_ROWS * FRAME_COLS)


@nb.njit(inline="always")
def _thresholded(raw, lo1, dark, inv_gain, q, bg, xray):
    if raw[q] < lo1[q]:
        return 0.0
    u = (np.float64(raw[q]) - np.float64(dark[q])) * np.float64(inv_gain[q])
    if u <= bg or u >= xray:
        return 0.0
    return u


@nb.njit(nogil=True, cache=True, boundscheck=False)
def _count_frame(raw, lo1, dark, inv_gain, bg, xray, out, n):
    h, w = FRAME_ROWS, FRAME_COLS
    for y in range(h):
        row = y * w
        inner_row = 0 < y < h - 1
        for c0 in range(row, row + w, _CHUNK):
            hit = np.uint16(0)
            for i in range(c0, c0 + _CHUNK):
                hit |= np.uint16(raw[i] >= lo1[i])
            if hit == 0:
                continue
            for s0 in range(c0, c0 + _CHUNK, _SUB):
                hit = np.uint16(0)
                for i in range(s0, s0 + _SUB):
                    hit |= np.uint16(raw[i] >= lo1[i])
                if hit == 0:
                    continue
                for p in range(s0, s0 + _SUB):
                    if raw[p] < lo1[p]:
                        continue
                    v = (np.float64(raw[p]) - np.float64(dark[p])) * np.float64(inv_gain[p])
                    if v <= bg or v >= xray:
                        continue
                    x = p - row
                    if inner_row and 0 < x < w - 1:
                        # Unrolled interior case: no bounds checks, early exit on the first taller neighbour.
                        if not v > _thresholded(raw, lo1, dark, inv_gain, p + 1, bg, xray):
                            continue
                        if not v > _thresholded(raw, lo1, dark, inv_gain, p + w, bg, xray):
                            continue
                        if not v > _thresholded(raw, lo1, dark, inv_gain, p - 1, bg, xray):
                            continue
                        if not v > _thresholded(raw, lo1, dark, inv_gain, p - w, bg, xray):
                            continue
                        if not v > _thresholded(raw, lo1, dark, inv_gain, p + w + 1, bg, xray):
                            continue
                        if not v > _thresholded(raw, lo1, dark, inv_gain, p + w - 1, bg, xray):
                            continue
                        if not v > _thresholded(raw, lo1, dark, inv_gain, p - w + 1, bg, xray):
                            continue
                        if not v > _thresholded(raw, lo1, dark, inv_gain, p - w - 1, bg, xray):
                            continue
                        out[n] = p
                        n += 1
                    else:
                        ok = True
                        for dy in range(-1, 2):
                            yy = y + dy
                            if yy < 0 or yy >= h:
                                continue
                            for dx in range(-1, 2):
                                xx = x + dx
                                if (dy == 0 and dx == 0) or xx < 0 or xx >= w:
                                    continue
                                if not v > _thresholded(raw, lo1, dark, inv_gain, yy * w + xx, bg, xray):
                                    ok = False
                                    break
                            if not ok:
                                break
                        if ok:
                            out[n] = p
                            n += 1
    return n


@nb.njit(nogil=True, cache=True)
def _count_batch(frames, start, lo1, dark, inv_gain, bg, xray, out, used, offsets):
    """Count frames from ``start`` until done or until ``out`` might overflow; returns (next, used)."""
    cap = out.shape[0]
    i = start
    while i < frames.shape[0]:
        if cap - used < MAX_EVENTS_PER_FRAME:
            break
        used = _count_frame(frames[i], lo1, dark, inv_gain, bg, xray, out, used)
        offsets[i + 1] = used
        i += 1
    return i, used


def default_workers() -> int:
    """Cores this process may use (respects CPU affinity, as under Slurm)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return os.cpu_count() or 1
