"""The decision maths in one place: is speculative decoding paying for itself?

One verdict function, ``judge``, decides for a model and for each temperature bucket alike. With a
calibration from ``measure`` (the draft's cost ``c`` per token at the current load) it judges by the modelled
speed-up ``L / (1 + c*d)``: ``use`` at or above 1 + band, ``disable`` below 1 - band, ``near_break_even``
between. Without one it falls back to the rule of thumb: below ``break_even`` acceptance (0.5) the draft's
verify work costs more than it saves, up to ``near_upper`` (0.65) a wash, above it a win. The sidecar,
``top``, ``measure`` and ``plan`` all import this module; nothing else defines the thresholds' meaning. Also here: clamped ratios and histogram quantiles computed the way PromQL's ``histogram_quantile``
does (linear interpolation inside the bucket holding the rank; a rank in ``+Inf`` returns the highest finite
bound), so ``top``, ``measure`` and the recording rules agree.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass


class Verdict(enum.StrEnum):
    USE = "use"
    NEAR_BREAK_EVEN = "near_break_even"
    DISABLE = "disable"
    INSUFFICIENT_DATA = "insufficient_data"


VERDICTS: tuple[Verdict, ...] = tuple(Verdict)

DEFAULT_BREAK_EVEN = 0.5
DEFAULT_NEAR_UPPER = 0.65
# The neutral band around a speed-up of 1: the calibrated verdict's near_break_even and measure's "neutral"
# (a measured speed-up within 5% of 1 is inside the run-to-run spread seen on the same server).
DEFAULT_BAND = 0.05

SOURCE_DEFAULT = "default"
SOURCE_MEASURE = "measure"


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


@dataclass(frozen=True, slots=True)
class Thresholds:
    """What a verdict is judged against, for one model at its current load.

    ``source`` is ``measure`` when a calibration gave the draft's cost ``draft_cost`` (target passes per
    draft token at the current load) and ``default`` when the configured rule of thumb applies (then
    ``draft_cost`` is ``None``). ``break_even`` and ``near_upper`` are acceptance rates either way: the
    calibrated ones are where the modelled speed-up crosses 1 and 1 + band.
    """

    break_even: float
    near_upper: float
    source: str = SOURCE_DEFAULT
    draft_cost: float | None = None
    band: float = DEFAULT_BAND
    drafts_per_step: float | None = None


@dataclass(frozen=True, slots=True)
class Judgement:
    """One verdict with the numbers behind it."""

    verdict: Verdict
    acceptance: float | None
    modelled_speedup: float | None
    thresholds: Thresholds


def default_thresholds(
    break_even: float = DEFAULT_BREAK_EVEN, near_upper: float = DEFAULT_NEAR_UPPER, band: float = DEFAULT_BAND
) -> Thresholds:
    return Thresholds(break_even, near_upper, SOURCE_DEFAULT, None, band)


def calibrated_thresholds(draft_cost: float, drafts_per_step: float, band: float = DEFAULT_BAND) -> Thresholds:
    """Thresholds from the draft's cost c at the current load and the drafts proposed per target pass d.

    With acceptance rate r, a pass yields L = 1 + d*r tokens and costs 1 + c*d target passes, so the
    modelled speed-up L / (1 + c*d) crosses 1 exactly at r = c (the break-even, whatever d is) and reaches
    1 + band at r = ((1 + band)(1 + c*d) - 1) / d. Both are clamped to 0..1.
    """
    c = max(0.0, draft_cost)
    d = max(drafts_per_step, 1e-9)
    upper = ((1.0 + band) * (1.0 + c * d) - 1.0) / d
    return Thresholds(min(1.0, c), min(1.0, max(0.0, upper)), SOURCE_MEASURE, c, band, drafts_per_step)


def modelled_speedup(accepted: float, drafted: float, passes: float, draft_cost: float) -> float | None:
    """L / (1 + c*d) over a window's target forward passes: L = 1 + accepted / passes tokens per pass, d =
    drafted / passes draft tokens per pass, c the draft's cost per token in target passes. Passes are every
    decode pass (output tokens - accepted), not only those that verified drafts: a drafter that proposes
    nothing on a pass (n-gram without a match) saves and costs nothing there. With k drafts on every pass it
    is (1 + k*r)/(1 + k*c) for acceptance rate r, and whatever d is it crosses 1 exactly at r = c, the
    break-even. ``measure`` fits c with this same model (``fit_draft_cost``). ``None`` without passes."""
    if passes <= 0:
        return None
    length = 1.0 + max(0.0, accepted) / passes
    return length / (1.0 + max(0.0, draft_cost) * max(0.0, drafted) / passes)


def judge(
    accepted: float | None,
    drafted: float | None,
    steps: float | None,
    min_drafts: float,
    thresholds: Thresholds,
    passes: float | None = None,
) -> Judgement:
    """The verdict for one window's totals (a model's, from vLLM's counters, or a bucket's, from the tap).

    Below ``min_drafts`` draft steps: ``insufficient_data``. Calibrated: by the modelled speed-up over the
    window's target *passes* (every decode pass; the draft steps stand in when they are not known) against
    1 +- band. Otherwise: by acceptance against ``break_even`` / ``near_upper``.
    """
    acceptance = window_acceptance(accepted, drafted, steps, min_drafts)
    if acceptance is None:
        return Judgement(Verdict.INSUFFICIENT_DATA, None, None, thresholds)
    if thresholds.draft_cost is None:
        return Judgement(decide(acceptance, thresholds.break_even, thresholds.near_upper), acceptance, None, thresholds)
    assert accepted is not None and drafted is not None and steps is not None  # window_acceptance checked
    speedup = modelled_speedup(accepted, drafted, passes if passes else steps, thresholds.draft_cost)
    if speedup is None:
        return Judgement(Verdict.INSUFFICIENT_DATA, acceptance, None, thresholds)
    return Judgement(speedup_verdict(speedup, thresholds.band), acceptance, speedup, thresholds)


def speedup_verdict(speedup: float, band: float = DEFAULT_BAND) -> Verdict:
    """``use`` at or above 1 + band, ``disable`` below 1 - band, ``near_break_even`` between."""
    if math.isnan(speedup):
        return Verdict.INSUFFICIENT_DATA
    if speedup >= 1.0 + band:
        return Verdict.USE
    if speedup < 1.0 - band:
        return Verdict.DISABLE
    return Verdict.NEAR_BREAK_EVEN


def enough_drafts(steps: float | None, min_drafts: float) -> bool:
    """Whether a window holds enough draft steps to judge acceptance at all."""
    return steps is not None and steps > 0 and steps >= min_drafts


def window_acceptance(
    accepted: float | None, drafted: float | None, steps: float | None, min_drafts: float
) -> float | None:
    """Acceptance over a window (accepted / drafted tokens), or ``None`` below ``min_drafts`` draft steps:
    the one gate every acceptance figure and verdict passes, per model (from vLLM's counters) and per
    temperature bucket (from the tap). ``None`` means absent, never 0."""
    if accepted is None or not drafted or not enough_drafts(steps, min_drafts):
        return None
    return clamped_ratio(accepted, drafted)


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


# --- The break-even model (Leviathan, Kalman & Matias 2023, "Fast Inference from Transformers via
# Speculative Decoding", section 3) ---------------------------------------------------------------------
#
# With k draft tokens per step, each accepted independently with probability alpha, one target forward pass
# yields on average E(alpha, k) = (1 - alpha^(k+1)) / (1 - alpha) tokens. If one draft token costs c target
# forward passes, a step costs k*c + 1 of them, so the speed-up over plain decoding is E / (k*c + 1).
# Speculation breaks even where E(alpha, k) = k*c + 1. Since vLLM's acceptance rate is accepted / drafted =
# (E - 1) / k, the break-even *acceptance rate* is simply c: a draft token must be accepted at least as often
# as it costs. ``measure`` fits c per load level from paired runs, so the sidecar's fixed rule-of-thumb
# threshold (DEFAULT_BREAK_EVEN) can be checked against the measured one for a given draft and load.


def expected_tokens_per_step(alpha: float, k: int) -> float:
    """(1 - alpha^(k+1)) / (1 - alpha): tokens one target forward pass yields; k + 1 at alpha = 1."""
    if k < 0:
        raise ValueError("k must be >= 0")
    alpha = min(1.0, max(0.0, alpha))
    if alpha >= 1.0:
        return float(k + 1)
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def speculative_speedup(alpha: float, k: int, c: float) -> float:
    """Expected wall-time speed-up over no speculation: E(alpha, k) / (k*c + 1). k = 0 gives 1."""
    return expected_tokens_per_step(alpha, k) / (k * c + 1.0)


def alpha_from_mean_acceptance_length(mean_length: float, k: int) -> float:
    """The alpha whose E(alpha, k) equals a measured mean acceptance length (1 + accepted / steps)."""
    if k <= 0:
        raise ValueError("k must be >= 1")
    return _solve_alpha(mean_length, k)


def break_even_alpha(c: float, k: int) -> float | None:
    """The alpha at which speculation neither helps nor hurts: E(alpha, k) = k*c + 1.

    0 when drafts cost nothing (c <= 0); ``None`` when no alpha can pay for them (c >= 1: even a draft that
    is always accepted costs as much as the target pass it replaces).
    """
    if k <= 0:
        raise ValueError("k must be >= 1")
    if c <= 0:
        return 0.0
    if c >= 1:
        return None
    return _solve_alpha(k * c + 1.0, k)


def break_even_acceptance_rate(c: float) -> float | None:
    """The same break-even point as vLLM's acceptance rate (accepted / drafted): c itself, within 0..1."""
    if c >= 1:
        return None
    return max(0.0, c)


def _solve_alpha(tokens_per_step: float, k: int) -> float:
    """Invert E(., k) on 0..1 by bisection (E is increasing in alpha); clamps to the ends."""
    if tokens_per_step <= 1.0:
        return 0.0
    if tokens_per_step >= k + 1:
        return 1.0
    low, high = 0.0, 1.0
    for _ in range(60):
        mid = (low + high) / 2
        if expected_tokens_per_step(mid, k) < tokens_per_step:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def fit_draft_cost(cells: Sequence[tuple[float, ...]], k: int) -> float | None:
    """Least-squares c from measured cells ``(E, S)`` or ``(E, S, D)`` at one load level: E output tokens per
    target forward pass, S the speed-up, D draft tokens proposed per target pass (k when omitted).

    Fitted on time per token, 1/S = (1 + c*D) / E, because time (unlike speed) adds up across a mix of
    requests: minimising sum (1/S - 1/E - c*D/E)^2 gives c = sum((D/E)(1/S - 1/E)) / sum((D/E)^2). D matters
    for drafters that propose nothing on some passes: vLLM's n-gram drafter on the tiny target here drafted on
    16 of 51 passes of one request (96 tokens, 45 accepted), so D was 1.25, not k = 4, and a fit assuming k
    would call the drafts 3x cheaper than they are. With D = k this is the Leviathan model's 1/S = (k*c + 1)/E.
    ``None`` without usable cells.
    """
    if k <= 0:
        raise ValueError("k must be >= 1")
    usable = []
    for cell in cells:
        e, speedup = cell[0], cell[1]
        d = cell[2] if len(cell) > 2 else float(k)
        if all(math.isfinite(x) for x in (e, speedup, d)) and e >= 1 and speedup > 0 and d > 0:
            usable.append((d / e, 1.0 / speedup - 1.0 / e))
    if not usable:
        return None
    return sum(x * y for x, y in usable) / sum(x * x for x, _ in usable)


def best_num_speculative_tokens(alpha: float, c: float, k_max: int) -> int:
    """The k in 0..k_max with the highest modelled speed-up (0 = speculation off); ties go to the smaller k."""
    best_k, best = 0, 1.0
    for k in range(1, k_max + 1):
        s = speculative_speedup(alpha, k, c)
        if s > best + 1e-9:
            best_k, best = k, s
    return best_k


# vLLM 0.32's dynamic speculation: SpeculativeConfig.num_speculative_tokens_per_batch_size, a list of
# [first batch size, last batch size, k] ranges (inclusive, the first starting at 1, sorted, not overlapping;
# vLLM carries the last k on to max_num_seqs and checks it with validate_and_normalize_dynamic_sd_schedule).
VLLM_SCHEDULE_KEY = "num_speculative_tokens_per_batch_size"


def speculation_schedule(levels: Sequence[tuple[float, int | None]]) -> list[list[int]] | None:
    """The best k per load level, ``(concurrency, k)`` pairs in rising concurrency (k None: unknown there),
    as vLLM's schedule: each level starts a range that runs up to the next level (the first from 1), and
    neighbouring ranges with the same k merge. ``measure`` (from its fit) and the sidecar (from the live
    acceptance at each calibrated level) both build their recommendation here."""
    known = [(int(concurrency), k) for concurrency, k in levels if k is not None]
    if not known:
        return None
    entries: list[list[int]] = []
    for i, (concurrency, k) in enumerate(known):
        start = 1 if i == 0 else max(concurrency, entries[-1][1] + 1)
        end = max(known[i + 1][0] - 1, start) if i + 1 < len(known) else max(concurrency, start)
        if entries and entries[-1][2] == k:
            entries[-1][1] = end
        else:
            entries.append([start, end, k])
    return entries


def sample_quantile(q: float, values: Sequence[float]) -> float | None:
    """Quantile of raw observations, linearly interpolated between order statistics (numpy's default).

    For figures computed from every observation (``measure``); ``histogram_quantile`` is for bucketed ones.
    ``None`` without observations.
    """
    if not values or not 0.0 <= q <= 1.0:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


# Sizing a draft model (``plan``). A draft much smaller than 1/12 of the target rarely predicts it well enough;
# one larger than 1/8 costs too much per step for what it saves. A draft whose weights and KV pages take more
# than 15% of the memory vLLM uses is taking capacity (concurrent requests) the target would otherwise have.
DRAFT_SIZE_RATIO_SWEET_SPOT = (8.0, 12.0)
DRAFT_VRAM_SHARE_WARN = 0.15


def draft_size_advice(size_ratio: float) -> str:
    """``too_large`` below 1:8 (target/draft < 8), ``too_small`` above 1:12, else ``sweet_spot``."""
    low, high = DRAFT_SIZE_RATIO_SWEET_SPOT
    if size_ratio < low:
        return "too_large"
    if size_ratio > high:
        return "too_small"
    return "sweet_spot"
