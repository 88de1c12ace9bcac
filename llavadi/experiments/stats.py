"""Summaries over seeds: mean and sample standard deviation."""

from __future__ import annotations

import statistics
from typing import Sequence


def mean_std(values: Sequence[float]) -> dict:
    """`{"mean", "std", "n"}` of `values`; std is the sample std (n - 1 denominator), 0.0 for one value."""
    values = list(values)
    if not values:
        raise ValueError("mean_std needs at least one value")
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}
