"""stemstream.tasks."""
