"""Where the teacher's signal comes from: regenerated answers (regenerate.py) and the online teacher."""
