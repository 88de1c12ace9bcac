"""llavadi.models."""
