"""tasks.acquisition."""
