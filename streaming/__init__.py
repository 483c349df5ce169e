"""stemstream.streaming."""
