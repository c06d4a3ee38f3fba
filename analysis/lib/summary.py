"""Small statistics shared by the benchmark and load tools."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least ``q`` of the values at or below it."""
    if not xs:
        raise ValueError("percentile of no values")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def p50_p95(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.median(xs), percentile(xs, 0.95)
