"""Summaries over seeds: mean and sample standard deviation, and the paired t-test over seeds."""

from __future__ import annotations

import math
import statistics
from typing import Sequence


def mean_std(values: Sequence[float]) -> dict:
    """`{"mean", "std", "n"}` of `values`; std is the sample std (n - 1 denominator), 0.0 for one value."""
    values = list(values)
    if not values:
        raise ValueError("mean_std needs at least one value")
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz's method)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta did not converge (a={a}, b={b}, x={x})")


def regularized_incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x must be in [0, 1], got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # the fraction converges fast for x < (a + 1) / (a + b + 2); use the symmetry I_x(a,b) = 1 - I_{1-x}(b,a) beyond
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of Student's t statistic with `df` degrees of freedom: P(|T| >= |t|)."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if math.isinf(t):
        return 0.0
    return regularized_incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def paired_t(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired t-test of a − b over matched pairs (seeds): `{"mean", "std", "n", "t", "df", "p"}`.

    t = mean(d) / (std(d) / √n), d = a − b, std the sample std, df = n − 1; p is two-sided.
    Fewer than 2 pairs: t and p are None. Every pair equal: t = 0, p = 1. Differences all the
    same non-zero value: |t| = ∞, p = 0.
    """
    if len(a) != len(b):
        raise ValueError(f"paired_t needs pairs: {len(a)} values against {len(b)}")
    diffs = [x - y for x, y in zip(a, b)]
    out = {**mean_std(diffs), "t": None, "df": len(diffs) - 1, "p": None}
    if len(diffs) < 2:
        return out
    mean, std = out["mean"], out["std"]
    if std == 0.0:
        out["t"], out["p"] = (0.0, 1.0) if mean == 0.0 else (math.copysign(math.inf, mean), 0.0)
        return out
    out["t"] = mean / (std / math.sqrt(len(diffs)))
    out["p"] = t_two_sided_p(out["t"], out["df"])
    return out


def significance_mark(p: float | None) -> str:
    """'**' for p < 0.01, '*' for p < 0.05, '' otherwise (or no test)."""
    if p is None:
        return ""
    return "**" if p < 0.01 else "*" if p < 0.05 else ""
