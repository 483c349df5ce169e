"""streaming.writer."""
