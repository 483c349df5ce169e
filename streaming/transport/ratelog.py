"""Rate-limited logging for refused and malformed input: one line per power of two of a count, per kind.

Every socket loop that drops hostile or broken input counts it; logging each drop would let a peer flood
the log, so a `RateLimitedLog` logs the 1st, 2nd, 4th, 8th, ... occurrence of each kind and says how many
there have been.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter


class RateLimitedLog:
    """Counts occurrences per kind and logs only the powers of two (1, 2, 4, 8, ...) of each count."""

    def __init__(self, logger: logging.Logger, level: int = logging.WARNING) -> None:
        """Log through `logger` at `level`."""
        self._logger = logger
        self._level = level
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()  # loops in several threads may share one instance

    def count(self, kind: str) -> int:
        """How many times `kind` has been reported so far."""
        with self._lock:
            return self._counts[kind]

    @property
    def total(self) -> int:
        """How many reports of every kind so far."""
        with self._lock:
            return sum(self._counts.values())

    def __call__(self, kind: str, msg: str, *args: object) -> bool:
        """Count one `kind`; log `msg % args` (prefixed with the count) when the count is a power of two.

        Returns whether it logged. `kind` groups the counting (e.g. "malformed w.begin", "refused hello"),
        so a flood of one kind does not silence another.
        """
        with self._lock:
            self._counts[kind] += 1
            n = self._counts[kind]
        if n & (n - 1):
            return False
        self._logger.log(self._level, "%s #%d: " + msg, kind, n, *args)
        return True
