"""Audio in."""
