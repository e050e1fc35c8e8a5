"""Quantiles from cumulative histogram buckets, the way PromQL's ``histogram_quantile`` computes them.

Linear interpolation inside the bucket that holds the rank; the lowest bucket interpolates from 0 (or from
its own bound when that is negative); a rank in the ``+Inf`` bucket returns the highest finite bound.
Used by ``top`` and ``measure``; the recording rules use PromQL's own function, so all three agree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """``buckets``: (upper bound ``le``, cumulative count) pairs, any order, ``+Inf`` included.

    ``None`` when there are no observations.
    """
    if not buckets or math.isnan(q):
        return None
    ordered = sorted(buckets)
    if not math.isinf(ordered[-1][0]):
        return None
    # Counts must be monotonic; repair small non-monotonicities as Prometheus does.
    fixed: list[tuple[float, float]] = []
    running = 0.0
    for le, count in ordered:
        running = max(running, count)
        fixed.append((le, running))
    total = fixed[-1][1]
    if total <= 0:
        return None
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    rank = q * total
    previous_le, previous_count = 0.0, 0.0
    for i, (le, count) in enumerate(fixed):
        if count >= rank:
            if math.isinf(le):
                return fixed[-2][0] if len(fixed) > 1 else None
            if i == 0 and le <= 0:
                return le
            lower = previous_le if i > 0 else min(0.0, le)
            width = count - previous_count
            if width <= 0:
                return le
            return lower + (le - lower) * (rank - previous_count) / width
        previous_le, previous_count = le, count
    return fixed[-2][0] if len(fixed) > 1 else None
