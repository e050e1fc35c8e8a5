"""The decision framework in one place: is speculative decoding paying for itself?

Below ``break_even`` acceptance the draft's extra verify compute costs more than the accepted tokens save:
turn it off. From ``break_even`` up to ``near_upper`` it is roughly a wash. At or above it usually helps.
The sidecar, ``measure`` and ``plan`` all import this module; nothing else defines the thresholds' meaning.
"""

from __future__ import annotations

import enum
import math


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
