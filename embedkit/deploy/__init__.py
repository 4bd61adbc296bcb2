"""The deployment stage."""
