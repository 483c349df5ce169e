"""How fast a sender sends: a token bucket for a rate limit, a frame clock for a camera in real time.

Both sleep instead of spinning, at least MIN_SLEEP at a time, so high rates do not sleep once per frame.
"""

from __future__ import annotations

import time

MIN_SLEEP = 0.001  # seconds


class Pacer:
    """Token bucket: `rate` tokens per second, a small burst, sleeps instead of spinning."""

    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 frames/s, got {rate}")
        self._rate = rate
        self._burst = max(1.0, 2.0 * rate * MIN_SLEEP)
        self._tokens = 1.0
        self._last = time.monotonic()

    def take(self) -> None:
        """Wait until one frame may be sent."""
        self._refill()
        if self._tokens < 1.0:
            time.sleep(max((1.0 - self._tokens) / self._rate, MIN_SLEEP))
            self._refill()
        self._tokens -= 1.0

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now


class FrameClock:
    """Real time: frame k is due at start + k / rate, as on the camera's frame clock. A sender that fell
    behind (CPU) catches up at once: the camera does not slow down, its frames already exist."""

    def __init__(self, rate: float) -> None:
        if not rate > 0:
            raise ValueError(f"rate must be > 0 frames/s, got {rate}")
        self._period = 1.0 / rate
        self._due: float | None = None

    def take(self) -> None:
        """Wait until the next frame is due (not at all when late)."""
        now = time.monotonic()
        if self._due is None:
            self._due = now
        elif self._due - now >= MIN_SLEEP:
            time.sleep(self._due - now)
        self._due += self._period
