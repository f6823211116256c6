"""Small statistics helpers shared by the benchmark modules (no numpy needed)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p95/p99/mean/max in milliseconds of latencies given in seconds."""
    if not seconds:
        return {"count": 0, "p50": math.nan, "p95": math.nan, "p99": math.nan, "mean": math.nan}
    ordered = sorted(seconds)
    return {
        "count": len(ordered),
        "p50": percentile(ordered, 50) * 1e3,
        "p95": percentile(ordered, 95) * 1e3,
        "p99": percentile(ordered, 99) * 1e3,
        "mean": statistics.fmean(ordered) * 1e3,
        "max": ordered[-1] * 1e3,
    }


def median(values: Sequence[float]) -> float:
    clean = [v for v in values if not math.isnan(v)]
    return statistics.median(clean) if clean else math.nan


def ratio(a: float, b: float) -> float:
    if b == 0 or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b
