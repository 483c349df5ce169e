"""streaming.aggregator."""
