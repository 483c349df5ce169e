"""tasks.steps."""
