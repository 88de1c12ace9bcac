"""llavadi.train."""
