"""Fixtures the hostile-input tests share with the aggregator's own tests: aggregators on loopback in
threads (start_aggregator), fake nodes (make_node) and a thread pool for the receivers (pool)."""

from tests.streaming.test_aggregator import make_node, pool, start_aggregator  # noqa: F401 (fixtures)
