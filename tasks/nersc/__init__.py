"""tasks.nersc."""
