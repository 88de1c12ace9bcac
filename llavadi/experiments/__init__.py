"""llavadi.experiments."""
