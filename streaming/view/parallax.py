"""The parallax part of a node's snapshot (streaming.protocol.live): checked before anything is kept for
it, then each node's per-position bin counts held and added up for the view's phase fits
(streaming.view.phase). The bins are remade here from the header's geometry (counting.phase.bins), so a
node cannot claim a bin count the geometry does not give."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from counting.live_images import LiveGeometry
from counting.phase.bins import ParallaxBins
from streaming.protocol.live import PARALLAX_DTYPES, PARALLAX_MAX_CELLS, PARALLAX_MAX_SIDE

_CELL_MAX = 2**32 - 1  # the view keeps each node's counts as uint32 (a cell past it is no real scan)


@dataclass(frozen=True)
class ParallaxPart:
    """A snapshot's checked parallax rows: counts (hi - lo, bins) of positions lo..hi-1."""

    bins: ParallaxBins
    lo: int
    hi: int
    counts: np.ndarray


@lru_cache(maxsize=8)
def _bins(geometry: tuple[float, ...], n: int, inner: float) -> ParallaxBins:
    return ParallaxBins.from_geometry(LiveGeometry(*geometry), n, inner)


def bins_for(geometry: dict, n: int, inner: float) -> ParallaxBins:
    """The bins of a (valid) geometry's dict, n per side over inner x its radius (a few kept at hand)."""
    g = LiveGeometry(**geometry)
    return _bins((g.cx, g.cy, g.bf_radius, g.adf_inner, g.adf_outer), n, inner)


def check_parallax(header: dict, arrays: dict[str, np.ndarray], positions: int) -> ParallaxPart | None:
    """The snapshot's parallax part, None when it has none; ValueError when any of it does not fit: the
    spec's types and ranges, the bins its geometry gives, the array's dtype, length and values."""
    spec = header.get("parallax")
    if spec is None:
        if "parallax" in arrays:
            raise ValueError("a parallax array without its header")
        return None
    if not isinstance(spec, dict):
        raise ValueError("snapshot field parallax is not a map")
    n, inner, count, lo, hi = (spec.get(k) for k in ("n", "inner", "bins", "lo", "hi"))
    if not all(type(v) is int for v in (n, count, lo, hi)) or not 1 <= n <= PARALLAX_MAX_SIDE:
        raise ValueError(f"parallax n, bins, lo, hi must be ints, n in 1..{PARALLAX_MAX_SIDE}")
    if type(inner) is not float or not (math.isfinite(inner) and 0.1 <= inner <= 1.0):
        raise ValueError("parallax inner must be a fraction in [0.1, 1]")
    if not (1 <= count <= n * n and positions * count <= PARALLAX_MAX_CELLS and 0 <= lo <= hi <= positions):
        raise ValueError("parallax bins or rows do not fit the scan")
    geometry = header.get("geometry")
    try:
        bins = bins_for(geometry, n, inner)
    except (TypeError, ValueError):
        raise ValueError("parallax sums need the snapshot's valid geometry") from None
    if bins.count != count:
        raise ValueError(f"parallax bins: {count} sent, the geometry gives {bins.count}")
    a = arrays.get("parallax")
    if a is None or a.dtype.str not in PARALLAX_DTYPES or len(a) != (hi - lo) * count:
        raise ValueError(f"snapshot array parallax is not {(hi - lo) * count} unsigned ints")
    if a.dtype.itemsize > 4 and len(a) and int(a.max()) > _CELL_MAX:
        raise ValueError("a parallax count beyond 2**32")
    return ParallaxPart(bins, lo, hi, a.reshape(hi - lo, count))


class NodeParallax:
    """One node's parallax sums of a scan: (positions, bins) uint32, rows replaced as snapshots come."""

    def __init__(self, bins: ParallaxBins, positions: int) -> None:
        self.bins = bins
        self.counts = np.zeros((positions, bins.count), np.uint32)

    def take(self, part: ParallaxPart) -> None:
        """Replace the part's rows (a node's sums are cumulative)."""
        self.counts[part.lo : part.hi] = part.counts


def same_bins(a: ParallaxBins, b: ParallaxBins) -> bool:
    """Bins made from one geometry, n and inner (so their counts add up)."""
    return (a.geometry, a.n, a.inner) == (b.geometry, b.n, b.inner)


def summed(nodes: list[NodeParallax]) -> np.ndarray:
    """The nodes' counts added (uint32, or uint64 when the sum could pass 2**32)."""
    peak = sum(int(n.counts.max()) if n.counts.size else 0 for n in nodes)
    out = nodes[0].counts.astype(np.uint64 if peak > _CELL_MAX else np.uint32)
    for n in nodes[1:]:
        out += n.counts
    return out
