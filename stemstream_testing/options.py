"""Counting options for tests and benchmarks, built from settings as the product builds them."""

from __future__ import annotations

from counting.kernel import Thresholds
from counting.pipeline import CountingOptions
from counting.settings import CountingSettings
from counting.thresholds import ThresholdConfig
from streaming.components import counting_options, threshold_config


def options(fixed: Thresholds | None = None, workers: int = 0, **settings: object) -> CountingOptions:
    """Counting options: fixed thresholds, or estimated with the default (production) settings."""
    if fixed is not None:
        settings |= {"background_threshold": fixed.background, "xray_threshold": fixed.xray}
    return counting_options(CountingSettings(workers=workers, **settings))


def estimation(**settings: object) -> ThresholdConfig:
    """Threshold estimation config: the production defaults, with overrides."""
    return threshold_config(CountingSettings(**settings))
