"""Prometheus metrics of the streaming processes: each process serves its own registry over HTTP.

exporter: the bounded HTTP server (GET /metrics only), the ports each role takes and ``exported`` (an
exporter around a process's run); aggregator, node (with node 0's scan writer and counting pool) and view:
collectors that read the process's existing counters at scrape time (nothing is counted on the data path
for them), and each role's body with its exporter. Names, labels and ports: docs/facility/metrics.md.
"""
