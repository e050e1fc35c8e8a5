"""The decision maths in one place: is speculative decoding paying for itself?

Below ``break_even`` acceptance the draft's extra verify compute costs more than the accepted tokens save:
turn it off. From ``break_even`` up to ``near_upper`` it is roughly a wash. At or above it usually helps.
The sidecar, ``top``, ``measure`` and ``plan`` all import this module; nothing else defines the thresholds'
meaning. Also here: clamped ratios and histogram quantiles computed the way PromQL's ``histogram_quantile``
does (linear interpolation inside the bucket holding the rank; a rank in ``+Inf`` returns the highest finite
bound), so ``top``, ``measure`` and the recording rules agree.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence


class Verdict(enum.StrEnum):
    USE = "use"
    NEAR_BREAK_EVEN = "near_break_even"
    DISABLE = "disable"
    INSUFFICIENT_DATA = "insufficient_data"


VERDICTS: tuple[Verdict, ...] = tuple(Verdict)

DEFAULT_BREAK_EVEN = 0.5
DEFAULT_NEAR_UPPER = 0.65


def decide(
    acceptance: float | None,
    break_even: float = DEFAULT_BREAK_EVEN,
    near_upper: float = DEFAULT_NEAR_UPPER,
) -> Verdict:
    """Verdict for an acceptance rate (0..1); ``None`` or NaN (too few drafts) -> insufficient data."""
    if acceptance is None or math.isnan(acceptance):
        return Verdict.INSUFFICIENT_DATA
    if acceptance < break_even:
        return Verdict.DISABLE
    if acceptance < near_upper:
        return Verdict.NEAR_BREAK_EVEN
    return Verdict.USE


def clamped_ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator held to 0..1: counters read a moment apart must not yield 1.02 or -0.01."""
    return min(1.0, max(0.0, numerator / denominator))

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
