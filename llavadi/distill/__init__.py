"""llavadi.distill."""
