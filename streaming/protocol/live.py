"""Wire formats of the live view: a node's snapshots to the view, and the counted-data tap.

Every message is multipart: a kind tag, a msgpack header (a map), then raw little-endian arrays whose
names, dtypes and lengths the header's ``arrays`` lists in order.

    node -> view (PUSH, connecting out)   [b"live.snap", header, arrays...]
        header: node, node_index, n_nodes, scan_number, scan_key, width, height, expected_frames, seq,
        final, frames, sectors, events, geometry (cx, cy, bf_radius, adf_inner, adf_outer or nil),
        dropped_batches, dropped_snapshots, counted_at and oldest_at (wall times of the newest batch in it
        and of the oldest one new in it), lo, hi;
        arrays: counts, bf, adf, sum_col, sum_row, frames for positions lo..hi-1 (this node's sums so far:
        cumulative, so a later snapshot makes up for a dropped one), and pattern (576*576 uint32);
        until its geometry is settled, a node offers its estimate as ``proposal``.
        Live phase contrast (once the node's geometry is settled, else nil): header ``parallax`` = {n (bins
        per side, 1..PARALLAX_MAX_SIDE), inner (fraction of the BF radius binned), bins (kept bins, as
        counting.phase.bins makes them for the header's geometry), lo, hi (positions, changed since the
        node's last snapshot taken)}; array ``parallax``: (hi - lo) x bins counts, row-major, <u2/<u4/<u8
        (the node's sums so far, widened as they grow); positions x bins <= PARALLAX_MAX_CELLS.
    view -> node (on the node's connection)   [b"live.geometry", header: scan_key, geometry]  the scan's
        geometry: the first any of its nodes proposed (or settled on), so every node's BF/ADF add up.

    tap (PUB on the node)   [b"tap.begin", header]  a scan begins: scan_number, scan_key, width, height,
                                                    expected_frames, node, node_index, n_nodes
                            [b"tap.events", header, positions int64, frame_numbers int64, masks uint8,
                                offsets int64 (frames + 1), indices uint32]   one counted batch:
                                header scan_number, scan_key, node, seq (per node, from 0), frames
                            [b"tap.end", header]    the node counted everything of the scan: scan_number,
                                                    scan_key, node, batches, frames (published in all)
    aberrations (PUB on the view, live.aberration_port)   [b"tap.aberration", header]  a phase fit of a scan
        (streaming.view.aberration): scan_number, scan_key, final, status, fits, positions, defocus and
        defocus_err, astigmatism, astigmatism_err, astigmatism_angle, rotation (degrees), units, calibrated,
        residual_px, ...; values nil when the fit failed (error says why)
"""

from __future__ import annotations

import msgpack
import numpy as np

from counting.errors import PermanentError

SNAP = b"live.snap"
GEOMETRY = b"live.geometry"
TAP_BEGIN = b"tap.begin"
TAP_EVENTS = b"tap.events"
TAP_END = b"tap.end"
TAP_ABERRATION = b"tap.aberration"
TAP_ARRAYS = (
    ("positions", "<i8"),
    ("frame_numbers", "<i8"),
    ("masks", "u1"),
    ("offsets", "<i8"),
    ("indices", "<u4"),
)


PARALLAX_MAX_SIDE = 16  # bins per side a snapshot may carry (16 x 16 keeps about 200)
PARALLAX_MAX_CELLS = 2**24  # positions x bins of one node's parallax sums (64 MiB in the view as uint32)
PARALLAX_DTYPES = ("<u2", "<u4", "<u8")

# The only array dtypes a live message may carry: little-endian ints and floats (numpy's dtype.str spelling).
DTYPES = frozenset({"|u1", "|i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f4", "<f8"})


class LiveWireError(PermanentError, ValueError):
    """A live-view or tap message is malformed."""


def encode(kind: bytes, header: dict, arrays: dict[str, np.ndarray] | None = None) -> list:
    """[kind, msgpack header (with the arrays' names, dtypes, lengths), array buffers...]."""
    arrays = arrays or {}
    listed = [[name, a.dtype.str, len(a)] for name, a in arrays.items()]
    parts = [kind, msgpack.packb({**header, "arrays": listed})]
    return parts + [np.ascontiguousarray(a) for a in arrays.values()]


def decode(parts: list) -> tuple[bytes, dict, dict[str, np.ndarray]]:
    """(kind, header, arrays by name) of a message; raises LiveWireError (never another exception)."""
    if len(parts) < 2:
        raise LiveWireError("a live message has a kind and a header")
    try:
        raw = [bytes(p.buffer) if hasattr(p, "buffer") else bytes(p) for p in parts]
        header = msgpack.unpackb(raw[1])
        if not isinstance(header, dict):  # checked before any use of it
            raise LiveWireError(f"the header is not a map but {type(header).__name__}")
        listed = header.pop("arrays", [])
        if not isinstance(listed, list) or len(listed) != len(raw) - 2:
            raise LiveWireError("header and array parts do not match")
        arrays = {}
        for entry, buf in zip(listed, raw[2:], strict=True):
            name, dtype, n = _listed(entry)
            a = np.frombuffer(buf, dtype=np.dtype(dtype))
            if len(a) != n:
                raise LiveWireError(f"array {name} has {len(a)} entries, header says {n}")
            arrays[name] = a
    except LiveWireError:
        raise
    except Exception as exc:  # msgpack and numpy raise many types for garbage: all are malformed input
        raise LiveWireError(f"malformed live message ({type(exc).__name__}): {exc}"[:300]) from None
    return raw[0], header, arrays


def _listed(entry: object) -> tuple[str, str, int]:
    """One ``arrays`` entry: [name, dtype, length], with an allow-listed dtype."""
    if not (isinstance(entry, list) and len(entry) == 3):
        raise LiveWireError("an arrays entry is [name, dtype, length]")
    name, dtype, n = entry
    if not isinstance(name, str) or dtype not in DTYPES or type(n) is not int or n < 0:
        raise LiveWireError(f"bad arrays entry {str(entry)[:80]}")
    return name, dtype, n
