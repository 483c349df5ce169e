"""The live view's state: every scan of the session as the nodes' snapshots describe it (streaming.protocol.live),
each node's cumulative sums kept apart and added up on request. Thread-safe: the ingest thread applies
snapshots, the web server reads."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from counting.geometry import FRAME_COLS, FRAME_ROWS, N_SECTORS
from counting.live_images import MAX_POSITIONS, LiveArrays, LiveGeometry
from streaming.view.parallax import NodeParallax, check_parallax, same_bins

PHASE_IMAGES = ("tcbf", "idpc")  # the phase worker's (streaming.view.phase), once a fit has run
IMAGES = ("bf", "adf", "com_x", "com_y", "pattern", "frames", *PHASE_IMAGES)
_POSITION_ARRAYS = ("counts", "bf", "adf", "sum_col", "sum_row", "frames")
# What each array of a snapshot may be (numpy dtype.str): the node sends int64 sums, int32 frames, a uint32
# pattern; anything else (floats: NaN or inf; narrower ints filling whole ranges cheaply) is refused.
_DTYPES = {**dict.fromkeys(_POSITION_ARRAYS[:5], "<i8"), "frames": "<i4", "pattern": "<u4"}
_INT_FIELDS = ("scan_number", "width", "height", "expected_frames", "n_nodes", "lo", "hi", "seq")
_COUNTERS = ("frames", "sectors", "events", "dropped_batches", "dropped_snapshots")
_TEXT_MAX = 200  # characters of a scan key or node name
MAX_NODES = 1024  # node names per scan, whatever a snapshot's n_nodes says


@dataclass
class _NodeSums:
    arrays: LiveArrays | None  # None once the scan's images are let go
    header: dict
    parallax: NodeParallax | None = None  # its parallax sums, once it sends them


@dataclass
class ScanView:
    """One scan: its nodes' sums, what they said last, and its file once written."""

    key: str
    number: int
    width: int
    height: int
    expected_frames: int
    n_nodes: int
    started: float
    nodes: dict[str, _NodeSums] = field(default_factory=dict)
    version: int = 0
    file: str = ""
    counted_at: float = 0.0  # newest batch in the images (node wall time)
    oldest_at: float = 0.0  # oldest batch new in the latest snapshot (node wall time)
    ended: float = 0.0
    _rate: list = field(default_factory=list)  # (time, frames) samples for the rate
    _merged: tuple = (-1, None)  # (version, LiveArrays) of the last merge
    agreed: dict | None = None  # the BF geometry every node is told to use
    images_kept: bool = True  # False for old scans: their row stays, their images are let go
    phase: dict | None = None  # the latest phase record (streaming.view.phase), for /api/state
    phase_images: dict = field(default_factory=dict)  # tcbf, idpc: float64 (height, width)
    phase_used: np.ndarray | None = None  # bool (height, width): the positions those images were made from
    phase_seen: int = -1  # the scan's version the latest phase work started from
    phase_at: float = 0.0  # monotonic time that work started
    microscope: dict | None = None  # its file's /metadata/microscope attributes, once the session added them
    recalibrate: bool = False  # the microscope's metadata came: the final phase work once more, scaled

    def total(self, name: str) -> int:
        """A header counter added over the nodes."""
        return sum(int(n.header.get(name, 0)) for n in self.nodes.values())

    @property
    def done(self) -> bool:
        """Every node sent its final snapshot."""
        finals = sum(bool(n.header.get("final")) for n in self.nodes.values())
        return finals >= max(self.n_nodes, 1)

    def summary(self) -> dict:
        """What the page lists and shows as numbers."""
        frames, sectors = self.total("frames"), self.total("sectors")
        expected = self.expected_frames or self.width * self.height
        lost = N_SECTORS * (expected if self.done else frames) - sectors
        geometries = {str(n.header.get("geometry")) for n in self.nodes.values() if n.header.get("geometry")}
        return {
            "key": self.key,
            "scan_number": self.number,
            "width": self.width,
            "height": self.height,
            "status": "done" if self.done else "live",
            "frames": frames,
            "expected_frames": expected,
            "completeness": sectors / (N_SECTORS * expected) if expected else 0.0,
            "sectors_lost": max(lost, 0),
            "rate": self.rate(),
            "events": self.total("events"),
            "nodes": len(self.nodes),
            "n_nodes": self.n_nodes,
            "dropped": self.total("dropped_batches") + self.total("dropped_snapshots"),
            "geometry": next(iter(self.nodes.values())).header.get("geometry") if self.nodes else None,
            "geometries_differ": len(geometries) > 1,
            "file": self.file,
            "images": self.images_kept,
            "version": self.version,
            "counted_at": self.counted_at,
            "oldest_at": self.oldest_at,
            "phase": self.phase,
        }

    def rate(self) -> float:
        """Frames counted per second over the last few seconds (0 once done)."""
        if self.done or len(self._rate) < 2:
            return 0.0
        (t0, f0), (t1, f1) = self._rate[0], self._rate[-1]
        return (f1 - f0) / (t1 - t0) if t1 > t0 else 0.0

    def merged(self) -> LiveArrays:
        """The nodes' sums added (kept until the next snapshot)."""
        if self._merged[0] == self.version:
            return self._merged[1]
        out = LiveArrays.zeros(self.width * self.height)
        for n in self.nodes.values():
            for name in (*_POSITION_ARRAYS, "pattern"):
                getattr(out, name)[:] += getattr(n.arrays, name)
        self._merged = (self.version, out)
        return out

    def geometry(self) -> LiveGeometry | None:
        """The BF geometry the images use (the first node's)."""
        g = self.summary()["geometry"]
        return LiveGeometry(**g) if g else None

    def image(self, name: str, masked: bool = False) -> np.ndarray:
        """One image as float64: scan-shaped (height, width), or the 576x576 pattern; ``masked`` (for
        display): NaN at positions no frame reached yet, the pattern binned 2x2."""
        if name in PHASE_IMAGES:
            img = self.phase_images[name]  # KeyError: none yet
            # Positions reached after the phase work began hold its filler: black, as not reached.
            used = self.phase_used if self.phase_used is not None else self.merged().frames > 0
            return np.where(used.reshape(img.shape), img, np.nan) if masked else img
        a = self.merged()
        if name == "pattern":
            pattern = a.pattern.reshape(FRAME_ROWS, FRAME_COLS).astype(np.float64)
            return (
                pattern.reshape(FRAME_ROWS // 2, 2, FRAME_COLS // 2, 2).sum(axis=(1, 3))
                if masked
                else pattern
            )
        if name in ("com_x", "com_y"):
            g = self.geometry()
            values = a.com(g)[0 if name == "com_x" else 1] if g else np.zeros(self.width * self.height)
        elif name in ("bf", "adf", "frames"):
            values = getattr(a, name).astype(np.float64)
        else:
            raise KeyError(name)
        values = np.asarray(values, np.float64)
        if masked and name != "frames":
            values = np.where(a.frames > 0, values, np.nan)
        return values.reshape(self.height, self.width)


class ViewState:
    """Every scan of the session seen so far, newest last."""

    def __init__(
        self, keep_scans: int = 200, keep_images: int = 10, max_positions: int = MAX_POSITIONS
    ) -> None:
        self.max_positions = max_positions  # streaming.max_scan_positions: larger scans are refused
        self._lock = threading.Lock()
        self._scans: dict[str, ScanView] = {}
        self._keep, self._keep_images = keep_scans, keep_images  # rows; scans whose images are kept
        self.version = 0  # bumped on every change
        self.malformed = 0
        self.changed = threading.Condition(self._lock)
        self.intake_alive: Callable[[], bool] = lambda: False  # the intake thread's, once it is made

    def intake(self) -> dict:
        """The intake's health (for /api/state): its thread alive, malformed snapshots dropped."""
        return {"alive": self.intake_alive(), "malformed": self.malformed}

    def apply(self, header: dict, arrays: dict[str, np.ndarray]) -> dict | None:
        """Take a node's snapshot (raises KeyError/ValueError when it does not fit its scan, before anything
        is allocated for it); returns the scan's agreed geometry: the first valid one any of its nodes
        settled on or proposed (None: none yet)."""
        check_snapshot(header, arrays, self.max_positions)
        part = check_parallax(header, arrays, header["width"] * header["height"])
        key = header["scan_key"] or f"number-{header['scan_number']}"
        width, height, lo, hi = header["width"], header["height"], header["lo"], header["hi"]
        with self._lock:
            scan = self._scans.get(key)
            if scan is None:
                scan = ScanView(
                    key,
                    int(header["scan_number"]),
                    width,
                    height,
                    int(header["expected_frames"]),
                    int(header["n_nodes"]),
                    time.time(),
                )
                self._scans[key] = scan
                while len(self._scans) > self._keep:
                    self._scans.pop(next(iter(self._scans)))
                for old in list(self._scans.values())[: -self._keep_images]:  # memory flat over a session
                    old.nodes = {name: _NodeSums(None, n.header) for name, n in old.nodes.items()}
                    old.images_kept, old._merged, old.phase_images = False, (-1, None), {}
                    old.phase_used = None
            node = scan.nodes.get(header["node"])
            if node is None and len(scan.nodes) >= min(max(scan.n_nodes, 1), MAX_NODES):
                raise ValueError(f"scan {key[:40]} already has its {len(scan.nodes)} nodes")
            if (width, height) != (scan.width, scan.height):
                raise ValueError(f"snapshot of {width}x{height} for a {scan.width}x{scan.height} scan")
            if node is None:
                sums = LiveArrays.zeros(width * height) if scan.images_kept else None
                node = scan.nodes[header["node"]] = _NodeSums(sums, {})
            scan.agreed = scan.agreed or valid_geometry(header.get("geometry") or header.get("proposal"))
            if node.header.get("final") or header["seq"] < node.header.get("seq", -1):
                return scan.agreed  # a stale snapshot never replaces a newer one
            if scan.images_kept:
                for name in _POSITION_ARRAYS:
                    getattr(node.arrays, name)[lo:hi] = arrays[name]
                node.arrays.pattern[:] = arrays["pattern"]
                if part is not None:
                    if node.parallax is None or not same_bins(node.parallax.bins, part.bins):
                        node.parallax = NodeParallax(part.bins, width * height)
                    node.parallax.take(part)
            node.header = header
            scan.counted_at = max(scan.counted_at, float(header.get("counted_at", 0.0)))
            scan.oldest_at = float(header.get("oldest_at", 0.0))
            now = time.time()
            scan._rate = [s for s in scan._rate if now - s[0] < 3.0] + [(now, scan.total("frames"))]
            if scan.done and not scan.ended:
                scan.ended = now
            self._bump(scan)
            return scan.agreed

    def set_file(self, key: str, path: str) -> bool:
        """Name the written file of a scan (True when that is news)."""
        with self._lock:
            scan = self._scans.get(key)
            if scan is None or scan.file == path:
                return False
            scan.file = path
            self._bump(scan)
            return True

    def scans(self) -> list[dict]:
        """Summaries of every scan, oldest first."""
        with self._lock:
            return [s.summary() for s in self._scans.values()]

    def scan(self, key: str) -> ScanView | None:
        """A scan's view (read its images under ``snapshot``)."""
        with self._lock:
            return self._scans.get(key)

    def image(self, key: str, name: str, masked: bool = False) -> tuple[int, np.ndarray]:
        """(version, image) of a scan; KeyError when unknown."""
        with self._lock:
            scan = self._scans[key]
            if not scan.images_kept:
                raise KeyError(key)
            return scan.version, scan.image(name, masked)

    def phase_due(self, interval: float) -> list[tuple[str, bool]]:
        """(key, final) of the scans whose phase work is due, scans just done first: a done scan's once
        (final), a live scan's when it changed, interval seconds passed since its last, and it will not
        end while the work runs (by its rate and the last work's time: the final would wait for it)."""
        now, due = time.monotonic(), []
        with self._lock:
            for scan in self._scans.values():
                if not scan.images_kept or not any(n.parallax for n in scan.nodes.values()):
                    continue
                final_due = not (scan.phase or {}).get("final") or scan.recalibrate
                if scan.done and final_due and scan.phase_seen != scan.version:
                    due.insert(0, (scan.key, True))
                elif (
                    not scan.done
                    and scan.phase_seen != scan.version
                    and now - scan.phase_at >= interval
                    and not _ends_before(scan, float((scan.phase or {}).get("seconds") or 0.0))
                ):
                    due.append((scan.key, False))
        return due

    def phase_take(self, key: str, take: Callable[[ScanView], object]) -> object:
        """take(scan) under the lock (a copy of what the phase work needs), the scan marked as worked on
        at its version now; None when the scan is gone or its images let go."""
        with self._lock:
            scan = self._scans.get(key)
            if scan is None or not scan.images_kept:
                return None
            scan.phase_seen, scan.phase_at = scan.version, time.monotonic()
            scan.recalibrate = scan.recalibrate and not scan.done  # a done scan's is taken now
            return take(scan)

    def set_microscope(self, key: str, attrs: dict) -> bool:
        """A scan's /metadata/microscope attributes from its file (True when that is news): its phase is
        then fitted in nm (streaming.view.phase), a final one again."""
        with self._lock:
            scan = self._scans.get(key)
            if scan is None or scan.microscope == attrs:
                return False
            scan.microscope, scan.recalibrate = attrs, True
            self._bump(scan)
            return True

    def set_phase(
        self, key: str, record: dict, images: dict[str, np.ndarray], used: np.ndarray | None = None
    ) -> None:
        """A scan's new phase record and images (images not in it stay as they were); used: the positions
        they were made from (the page shows the others as not reached)."""
        with self._lock:
            scan = self._scans.get(key)
            if scan is None:
                return
            fresh = scan.phase_seen == scan.version  # no snapshot came while the work ran
            scan.phase = record
            if scan.images_kept:
                scan.phase_images = {**scan.phase_images, **images}
                if images and used is not None:
                    scan.phase_used = used
            self._bump(scan)
            if fresh:
                scan.phase_seen = scan.version  # this bump is no new data to fit

    def wait(self, version: int, timeout: float) -> int:
        """Block until the state's version passes ``version`` or the timeout; the version then."""
        with self.changed:
            self.changed.wait_for(lambda: self.version != version, timeout)
            return self.version

    def _bump(self, scan: ScanView) -> None:
        scan.version += 1
        self.version += 1
        self.changed.notify_all()


def _ends_before(scan: ScanView, seconds: float) -> bool:
    """The scan will likely end within ``seconds`` (a live fit of that length would hold up its final)."""
    rate, expected = scan.rate(), scan.expected_frames or scan.width * scan.height
    return rate > 0 and (expected - scan.total("frames")) / rate < seconds


def check_snapshot(header: dict, arrays: dict[str, np.ndarray], max_positions: int) -> None:
    """Raise ValueError unless a snapshot's fields have their types and ranges (checked before the view
    allocates anything for it): ints that are ints, a shape within max_positions, finite times, known
    array dtypes and lengths."""
    for name in _INT_FIELDS:
        if type(header.get(name)) is not int:
            raise ValueError(f"snapshot field {name} is not an int")
    for name in _COUNTERS:
        if type(header.get(name, 0)) is not int or not 0 <= header.get(name, 0) < 2**62:
            raise ValueError(f"snapshot counter {name} is not a non-negative int")
    for name in ("scan_key", "node"):
        if not isinstance(header.get(name), str) or len(header[name]) > _TEXT_MAX:
            raise ValueError(f"snapshot field {name} is not a short string")
    width, height, lo, hi = header["width"], header["height"], header["lo"], header["hi"]
    if not (width > 0 and height > 0 and width * height <= max_positions):
        raise ValueError(f"a {width}x{height} scan is outside 1..{max_positions} positions")
    if not (0 <= lo <= hi <= width * height and 0 <= header["expected_frames"] < 2**62):
        raise ValueError("snapshot ranges do not fit the scan")
    if not 0 < header["n_nodes"] <= MAX_NODES:
        raise ValueError(f"snapshot n_nodes is outside 1..{MAX_NODES}")
    for name in ("counted_at", "oldest_at"):
        value = header.get(name, 0.0)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"snapshot field {name} is not a finite number")
    for name, dtype in _DTYPES.items():
        a = arrays[name]
        want = FRAME_ROWS * FRAME_COLS if name == "pattern" else hi - lo
        if a.dtype.str != dtype or len(a) != want:
            raise ValueError(f"snapshot array {name} is not {want} x {dtype}")


def valid_geometry(geometry: object) -> dict | None:
    """A geometry proposal as a valid LiveGeometry's dict, or None: an invalid one is never agreed on
    (nor relayed to the nodes)."""
    if not isinstance(geometry, dict):
        return None
    try:
        return LiveGeometry(**geometry).as_dict()
    except (TypeError, ValueError):
        return None
