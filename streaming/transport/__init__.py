"""streaming.transport."""
