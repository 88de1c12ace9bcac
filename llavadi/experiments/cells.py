"""Cells of a study in parallel: each (variant, seed) trained and evaluated in its own process.

`run_parallel` keeps up to `jobs` worker processes going, one torch thread each (two processes
that each use every core slow both down many times over), and reports every start and finish
through a `Progress`. A worker is `python -m llavadi.experiments.cell_worker GRID VARIANT SEED`: it plans
the grid again (the same deterministic plan) and trains + evaluates that one run exactly as the
in-process path does, its output going to `<run_dir>/ablate_cell.log`. When a cell fails, no
new cell starts, the running ones finish, and the error names the failed cells with the end of
their logs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass

from llavadi.experiments.progress import Progress

CELL_LOG = "ablate_cell.log"
TAIL_LINES = 25
POLL_SECONDS = 0.5


class CellFailure(RuntimeError):
    """One or more cells of a study failed; the message names them and ends with their logs."""


@dataclass
class _Running:
    run: object  # ablate.PlannedRun
    process: subprocess.Popen
    log_file: object
    k: int
    t0: float


def worker_env(threads: int = 1) -> dict:
    """The environment of a worker process: `threads` torch/OpenMP threads, no tokenizer threads."""
    n = str(threads)
    return dict(os.environ, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, LLAVADI_THREADS=n, TOKENIZERS_PARALLELISM="false")


def _tail(path: str, n: int = TAIL_LINES) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def _launch(grid_path: str, run, progress: Progress, log) -> _Running:
    os.makedirs(run.run_dir, exist_ok=True)
    log_path = os.path.join(run.run_dir, CELL_LOG)
    log_file = open(log_path, "w")
    cmd = [sys.executable, "-m", "llavadi.experiments.cell_worker", grid_path, run.variant, str(run.seed)]
    process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=worker_env(1))
    k = progress.start()
    log(f"[{progress.line(k)}] {run.name}: started (log {log_path})")
    return _Running(run, process, log_file, k, time.monotonic())


def run_parallel(grid_path: str, runs: list, jobs: int, progress: Progress, log) -> dict[str, float]:
    """Train + evaluate `runs` in up to `jobs` worker processes; returns seconds per run name."""
    waiting, running, seconds, failed = list(runs), [], {}, []
    while waiting or running:
        while waiting and len(running) < jobs and not failed:
            running.append(_launch(grid_path, waiting.pop(0), progress, log))
        time.sleep(POLL_SECONDS)
        for cell in [c for c in running if c.process.poll() is not None]:
            running.remove(cell)
            cell.log_file.close()
            took = time.monotonic() - cell.t0
            progress.finish(took)
            if cell.process.returncode != 0:
                failed.append(cell)
                log(f"[{progress.line(cell.k)}] {cell.run.name}: FAILED (exit {cell.process.returncode})")
                continue
            seconds[cell.run.name] = round(took, 1)
            log(f"[{progress.line(cell.k)}] {cell.run.name}: done in {took:.0f}s")
        if failed and not running:
            waiting.clear()
    if failed:
        details = "\n".join(f"--- {c.run.name} ({os.path.join(c.run.run_dir, CELL_LOG)}), last lines:\n"
                            + _tail(os.path.join(c.run.run_dir, CELL_LOG)) for c in failed)
        raise CellFailure(f"{len(failed)} run(s) failed: {[c.run.name for c in failed]}\n{details}")
    return seconds
