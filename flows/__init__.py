"""stemstream.flows."""
