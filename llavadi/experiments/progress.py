"""Progress of a long study: run k of N, time elapsed, estimated time left."""

from __future__ import annotations

import time


def format_duration(seconds: float) -> str:
    """'42s', '3m05s', '1h02m'."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    """Counts started and finished runs of a study and estimates the time left.

    The estimate is the mean duration of the finished runs times the runs not finished, divided
    by the number of runs going at once (`jobs`); before any run finishes there is none.
    """

    def __init__(self, total: int, jobs: int = 1, clock=time.monotonic):
        if total < 0 or jobs < 1:
            raise ValueError(f"total must be >= 0 and jobs >= 1, got {total} and {jobs}")
        self.total, self.jobs, self.clock = total, jobs, clock
        self.t0 = clock()
        self.started = 0
        self.durations: list[float] = []

    def start(self) -> int:
        """Mark a run as started; returns its number k (1-based)."""
        self.started += 1
        return self.started

    def finish(self, seconds: float) -> None:
        """Mark a run as finished after `seconds`."""
        self.durations.append(seconds)

    def eta_seconds(self) -> float | None:
        """Estimated seconds until every run is finished (None before the first finishes)."""
        if not self.durations:
            return None
        left = self.total - len(self.durations)
        mean = sum(self.durations) / len(self.durations)
        return mean * left / min(self.jobs, max(left, 1))

    def line(self, k: int) -> str:
        """'run k of N, elapsed 3m05s, ~12m10s left'."""
        eta = self.eta_seconds()
        left = "time left unknown" if eta is None else f"~{format_duration(eta)} left"
        return f"run {k} of {self.total}, elapsed {format_duration(self.clock() - self.t0)}, {left}"
