"""llavadi.eval."""
