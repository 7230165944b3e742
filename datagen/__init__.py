"""SynCD synthetic dataset generation (not yet implemented)."""
