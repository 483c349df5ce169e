"""Counting a scan batch by batch: thresholds first (fixed, or estimated from its first complete frames),
then every frame, laid out as a CountedScan. Shared by offline counting and the node streamers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from counting.geometry import ALL_SECTORS, FrameBatch, ScanShape
from counting.kernel import Counter, Thresholds, default_workers
from counting.sparse import CountedScan, ScanAccumulator
from counting.thresholds import (
    ThresholdConfig,
    ThresholdError,
    estimate_thresholds,
    fixed_threshold_metadata,
)

# If this many frames arrive without enough complete ones to sample, estimate from what there is.
_MAX_BUFFERED_FRAMES = 4096


@dataclass(frozen=True)
class CountingOptions:
    """What to count with: fixed thresholds, or estimation settings; plus the cores to use. Built from
    CountingSettings by streaming.components.counting_options."""

    fixed: Thresholds | None
    estimate: ThresholdConfig
    workers: int  # 0 = every core this process may use

    @property
    def threads(self) -> int:
        """Resolved thread count."""
        return self.workers if self.workers > 0 else default_workers()


class ScanCounter:
    """Counts the frames of one scan as they come; memory is bounded by the threshold sampling buffer."""

    def __init__(
        self,
        scan: ScanShape,
        dark: np.ndarray | None,
        options: CountingOptions,
        gain: np.ndarray | None = None,
    ):
        self.scan = scan
        self.dark = dark
        self.gain = gain
        self.options = options
        self.accumulator = ScanAccumulator(scan)
        self.counter: Counter | None = None
        self.threshold_metadata: dict = {}
        self._pending: list[FrameBatch] = []
        self.frames_counted = 0
        self.incomplete_frames = 0
        self.counting_seconds = 0.0
        if options.fixed is not None:
            self._prepare(options.fixed, fixed_threshold_metadata(options.fixed))

    def _prepare(self, thresholds: Thresholds, metadata: dict) -> None:
        self.counter = Counter(self.dark, thresholds, self.gain)
        self.threshold_metadata = metadata

    def add(self, batch: FrameBatch) -> None:
        """Count a batch now, or hold it until enough complete frames have arrived to set thresholds."""
        if self.counter is None:
            if not self._pending and self._complete(batch) >= self.options.estimate.sample_frames:
                self._pending = [batch]  # enough on its own: estimate from it without copying
                self._estimate_from_pending()
                self._count(None)
                return
            # Sources may reuse their batch buffer, so a batch held back must own its frames.
            self._pending.append(
                FrameBatch(
                    batch.frames.copy(),
                    batch.frame_numbers.copy(),
                    batch.positions.copy(),
                    batch.sector_masks.copy(),
                )
            )
            complete = sum(self._complete(b) for b in self._pending)
            buffered = sum(len(b) for b in self._pending)
            if complete < self.options.estimate.sample_frames and buffered < _MAX_BUFFERED_FRAMES:
                return
            self._estimate_from_pending()
            self._count(None)
            return
        self._count(batch)

    @staticmethod
    def _complete(batch: FrameBatch) -> int:
        return int(np.count_nonzero(batch.sector_masks == ALL_SECTORS))

    def _estimate_from_pending(self) -> None:
        need = self.options.estimate.sample_frames
        picks, have = [], 0
        for b in self._pending:
            idx = np.flatnonzero(b.sector_masks == ALL_SECTORS)[: need - have]
            picks.append(b.frames[idx])
            have += len(idx)
        sample = np.concatenate(picks) if len(picks) > 1 else picks[0]
        if len(sample) == 0:
            raise ThresholdError("no complete frame arrived, so thresholds cannot be estimated")
        est = estimate_thresholds(sample, self.dark, self.options.estimate, self.gain)
        self._prepare(est.thresholds, est.metadata())

    def _count(self, batch: FrameBatch | None) -> None:
        batches = self._pending if batch is None else [batch]
        self._pending = []
        for b in batches:
            t0 = time.perf_counter()
            events = self.counter.count(b.frames, workers=self.options.threads)
            self.counting_seconds += time.perf_counter() - t0
            self.accumulator.add(b.positions, b.frame_numbers, b.sector_masks, events)
            self.frames_counted += len(b)
            self.incomplete_frames += int(np.count_nonzero(b.sector_masks != ALL_SECTORS))

    def finish(self, metadata: dict | None = None, frames_per_position: int = 1) -> CountedScan:
        """Count anything still held back and return the laid-out scan with counting metadata."""
        if self.counter is None and self._pending:
            self._estimate_from_pending()
            self._count(None)
        meta = {"electron_counting": dict(self.threshold_metadata), **(metadata or {})}
        stem = meta.setdefault("stemstream", {})
        stem.update(
            frames_counted=self.frames_counted,
            incomplete_frames=self.incomplete_frames,
            counting_seconds=round(self.counting_seconds, 6),
        )
        return self.accumulator.finish(meta, frames_per_position)


def count_batches(
    batches: Iterable[FrameBatch],
    scan: ScanShape,
    dark: np.ndarray | None,
    options: CountingOptions,
    gain: np.ndarray | None = None,
    metadata: dict | None = None,
    frames_per_position: int = 1,
    progress: Callable[[int], None] | None = None,
) -> CountedScan:
    """Count every batch of a scan and return it laid out; ``progress`` gets the frames of each batch."""
    counter = ScanCounter(scan, dark, options, gain)
    for batch in batches:
        counter.add(batch)
        if progress is not None:
            progress(len(batch))
    return counter.finish(metadata, frames_per_position)
