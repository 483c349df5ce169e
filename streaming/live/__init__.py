"""streaming.live."""
