"""llavadi.data."""
