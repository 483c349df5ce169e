"""Small helpers to build metric families: counters and gauges with or without labels, from plain values."""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

PREFIX = "stemstream_"


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    """A counter without labels (``name`` without ``_total``: the exposition adds it)."""
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    """A gauge without labels."""
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def labelled_counter(name: str, doc: str, label: str, values: Mapping[object, float]) -> CounterMetricFamily:
    """A counter with one label: a sample per key of ``values``."""
    family = CounterMetricFamily(PREFIX + name, doc, labels=[label])
    for key, value in sorted(values.items(), key=lambda kv: str(kv[0])):
        family.add_metric([str(key)], value)
    return family


def labelled_gauge(name: str, doc: str, label: str, values: Mapping[object, float]) -> GaugeMetricFamily:
    """A gauge with one label: a sample per key of ``values``."""
    family = GaugeMetricFamily(PREFIX + name, doc, labels=[label])
    for key, value in sorted(values.items(), key=lambda kv: str(kv[0])):
        family.add_metric([str(key)], value)
    return family
