"""Precision and recall of counted events against simulator ground truth."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from counting.geometry import FRAME_COLS


@dataclass(frozen=True)
class Accuracy:
    """Matched counts over many frames."""

    events: int
    electrons: int
    matched: int

    @property
    def precision(self) -> float:
        """Fraction of events that are a real electron."""
        return self.matched / self.events if self.events else 1.0

    @property
    def recall(self) -> float:
        """Fraction of electrons that gave an event."""
        return self.matched / self.electrons if self.electrons else 1.0

    def __add__(self, other: Accuracy) -> Accuracy:
        return Accuracy(
            self.events + other.events, self.electrons + other.electrons, self.matched + other.matched
        )


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]


def match_frame(events: np.ndarray, truth: np.ndarray, width: int = FRAME_COLS) -> Accuracy:
    """One-to-one matching of events to true electron pixels, exact first, then within one pixel."""
    free = set(truth.tolist())
    matched = 0
    unmatched = []
    for e in events.tolist():
        if e in free:
            free.discard(e)
            matched += 1
        else:
            unmatched.append(e)
    for e in unmatched:
        y, x = divmod(e, width)
        for dy, dx in _NEIGHBOURS:
            q = (y + dy) * width + (x + dx)
            if 0 <= x + dx < width and q in free:
                free.discard(q)
                matched += 1
                break
    return Accuracy(len(events), len(truth), matched)


def match_frames(events: Iterable[np.ndarray], truths: Iterable[np.ndarray]) -> Accuracy:
    """Sum of per-frame matches."""
    total = Accuracy(0, 0, 0)
    for e, t in zip(events, truths, strict=True):
        total = total + match_frame(e, t)
    return total
