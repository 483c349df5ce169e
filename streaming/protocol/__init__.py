"""streaming.protocol."""
