"""streaming.node."""
