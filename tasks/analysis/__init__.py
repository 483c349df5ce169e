"""tasks.analysis."""
