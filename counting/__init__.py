"""stemstream.counting."""
