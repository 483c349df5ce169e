"""Soak: one long local session of back-to-back scans (the paper's 60-scan stability run, scaled down to
64x64 scans) through the real session flow, with the memory of every node streamer, counting worker and
the aggregator sampled from /proc while it runs. Used by `stemstream soak`, benchmarks/soak.py and tests.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flows.settings import load_settings
from flows.summary import summary_row
from tasks.acquisition.result import ScanResult
from tasks.launch.processes import process_tree, rss_kb
from tasks.launch.state import SessionState


@dataclass
class SoakReport:
    """What a soak session did, scan by scan, and how the memory of its processes behaved."""

    scans: int
    width: int
    height: int
    nodes: int
    state: str
    message: str
    wall_s: float
    results: list[ScanResult] = field(default_factory=list)  # one per scan
    rss_mb: list[float] = field(default_factory=list)  # peak RSS of all session processes during scan k
    private_mb: list[float] = field(default_factory=list)  # the same for their private heaps (RssAnon)
    samples: int = 0

    @property
    def complete_scans(self) -> int:
        """Scans written complete and verified."""
        return sum(r.complete_and_verified for r in self.results)

    @property
    def frames_lost(self) -> int:
        """Frames missing or incomplete over all scans, scans that never came included."""
        missing_scans = self.scans - len(self.results)
        return (
            sum(r.record.frames_incomplete for r in self.results) + missing_scans * self.width * self.height
        )

    @property
    def sectors_lost(self) -> int:
        """Sectors dropped by the receivers or lost between aggregator and nodes."""
        return sum(r.sectors_overflowed + r.record.sectors_lost_in_transit for r in self.results)

    @staticmethod
    def _window(series: list[float], last: bool) -> float:
        """Peak over the last third of the scans, or over the scans before it (after the first, which pays
        for start-up: JIT compilation, first allocations). Bounded buffers (hold queues, slots, queues)
        reach their high-water marks early, so a late peak well above every earlier one is growth."""
        steady = series[1:] or series
        n = max(1, len(steady) // 3)
        window = steady[-n:] if last else steady[:-n] or steady
        return max(window, default=0.0)

    @property
    def private_slope_mb_per_scan(self) -> float:
        """Least-squares trend of private memory over the last two thirds of the scans (a leak is > 0)."""
        tail = self.private_mb[len(self.private_mb) // 3 :]
        if len(tail) < 2:
            return 0.0
        return round(statistics.linear_regression(range(len(tail)), tail).slope, 3)

    @property
    def rss_early_mb(self) -> float:
        """Peak RSS before the last third of the scans (shared memory slots count in every process that
        maps them, and grow as slots are first touched)."""
        return self._window(self.rss_mb, last=False)

    @property
    def rss_late_mb(self) -> float:
        """Peak RSS in the last third of the scans."""
        return self._window(self.rss_mb, last=True)

    @property
    def private_early_mb(self) -> float:
        """Peak private memory (RssAnon) before the last third: where a leak would show."""
        return self._window(self.private_mb, last=False)

    @property
    def private_late_mb(self) -> float:
        """Peak private memory in the last third."""
        return self._window(self.private_mb, last=True)

    def as_dict(self) -> dict:
        """JSON-friendly form with the derived figures."""
        d = asdict(self)
        d["results"] = [summary_row(r) for r in self.results]
        d.update(
            complete_scans=self.complete_scans,
            frames_lost=self.frames_lost,
            sectors_lost=self.sectors_lost,
            rss_early_mb=self.rss_early_mb,
            rss_late_mb=self.rss_late_mb,
            private_early_mb=self.private_early_mb,
            private_late_mb=self.private_late_mb,
            private_slope_mb_per_scan=self.private_slope_mb_per_scan,
        )
        return d


class _MemorySampler(threading.Thread):
    """Samples the summed RSS of the session's processes and how many scans were written by then."""

    def __init__(self, sessions: Path, scan_dir: Path | None, since: float, every: float) -> None:
        super().__init__(name="soak-memory", daemon=True)
        self.sessions, self.scan_dir, self.since, self.every = sessions, scan_dir, since, every
        self.samples: list[tuple[int, int, int]] = []  # (scans written, RSS kB, private kB)
        self.stop_event = threading.Event()

    def run(self) -> None:
        """Sample until stopped."""
        while not self.stop_event.wait(self.every):
            session_dir = self._session_dir()
            if session_dir is None:
                continue
            try:
                state = SessionState.load(session_dir)
            except (OSError, ValueError, TypeError):  # a file from another version: nothing to sample
                continue
            roots = [*state.local_pids, state.aggregator_pid]
            pids = [pid for root in roots if root for pid in process_tree(int(root))]
            kb, private = sum(rss_kb(p) for p in pids), sum(rss_kb(p, "RssAnon") for p in pids)
            scans = self.scan_dir or session_dir / "scans"
            written = len(list(scans.glob("*.json"))) if scans.is_dir() else 0
            if kb:
                self.samples.append((written, kb, private))

    def _session_dir(self) -> Path | None:
        if not self.sessions.is_dir():
            return None
        fresh = [p for p in self.sessions.iterdir() if p.stat().st_mtime >= self.since]
        return max(fresh, key=lambda p: p.stat().st_mtime) if fresh else None


def run_soak(
    n_scans: int = 60,
    width: int = 64,
    height: int = 64,
    dose: float = 200.0,
    nodes: int = 2,
    every: float = 0.5,
    settings_file: str | None = None,
) -> SoakReport:
    """Run one local session of n_scans back to back (no py4DSTEM) and sample its processes' memory;
    settings_file: the settings to run with (None: the environment and stemstream.toml)."""
    from flows.session import session

    settings = load_settings(Path(settings_file) if settings_file else None)
    t0 = time.time()
    sampler = _MemorySampler(settings.output_dir / "sessions", settings.session.scan_dir, t0 - 1, every)
    sampler.start()
    try:
        state = session(
            n_scans=n_scans,
            scan_width=width,
            scan_height=height,
            dose=dose,
            nodes=nodes,
            backend="local",
            postprocess=False,
            settings_file=settings_file or "",
            return_state=True,
        )
    finally:
        sampler.stop_event.set()
        sampler.join(10)
    results = state.result(raise_on_failure=False)
    peaks: dict[int, int] = {}
    private: dict[int, int] = {}
    for written, kb, anon in sampler.samples:
        if written < n_scans:
            peaks[written] = max(peaks.get(written, 0), kb)
            private[written] = max(private.get(written, 0), anon)
    return SoakReport(
        scans=n_scans,
        width=width,
        height=height,
        nodes=nodes,
        state=state.name,
        message=str(state.message or ""),
        wall_s=round(time.time() - t0, 1),
        results=results if isinstance(results, list) else [],
        rss_mb=[round(peaks[k] / 1024, 1) for k in sorted(peaks)],
        private_mb=[round(private[k] / 1024, 1) for k in sorted(private)],
        samples=len(sampler.samples),
    )
