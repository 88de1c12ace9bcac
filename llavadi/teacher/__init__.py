"""llavadi.teacher."""
