"""Where the teacher's signal comes from: a frozen model run online next to the student (``online``),
teacher-regenerated answers (``regenerate``), and, built on the same view, an offline top-k cache
and on-policy student samples. The objective reads a ``ModelView`` whatever its source."""
