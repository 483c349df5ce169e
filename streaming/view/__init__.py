"""streaming.view."""
