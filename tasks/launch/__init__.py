"""tasks.launch."""
