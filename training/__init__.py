"""Training scripts (not yet implemented)."""
