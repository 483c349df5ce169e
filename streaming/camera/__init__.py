"""streaming.camera."""
