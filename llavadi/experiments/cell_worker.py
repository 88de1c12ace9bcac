"""One cell of a study in its own process: `python -m llavadi.experiments.cell_worker GRID VARIANT SEED`.

Started by llavadi.experiments.cells.run_parallel. It plans the grid again (the same deterministic
plan) and trains + evaluates that one (variant, seed) exactly as `llavadi ablate --jobs 1` does,
with LLAVADI_THREADS torch threads.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    """Train and evaluate one (variant, seed) of a grid."""
    import torch

    from llavadi.experiments import ablate

    grid_path, variant, seed = argv if argv is not None else sys.argv[1:]
    if os.environ.get("LLAVADI_THREADS"):
        torch.set_num_threads(int(os.environ["LLAVADI_THREADS"]))
    grid = ablate.load_grid(grid_path)
    (run,) = [r for r in ablate.plan_runs(grid) if r.variant == variant and r.seed == int(seed)]
    ablate.train_and_eval(grid, run, lambda *a: print(*a, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
