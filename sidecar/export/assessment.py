"""Verdicts from the sources' snapshots: the one place where vLLM's load, the tap's windows and the calibration
meet. Pure: snapshots in, an immutable ``Assessment`` out; the collector, the status page and ``top``'s
view all call ``assess`` (or read what it produced), and every verdict goes through ``decision.judge``.

Per model the thresholds are the calibration's at the model's current load (vLLM's running requests,
interpolated between the calibrated levels, clamped at the ends) when the calibration names the model, and
the configured ``--break-even`` / ``--near-break-even-upper`` otherwise (``source="default"``). While vLLM is
unreachable the load last seen is used, so the tap's verdicts keep their thresholds.

A temperature bucket is judged by its model's thresholds, except where the calibration holds costs of its own
for temperatures in that bucket (``by_temperature``): then by those, at the same load (``bucket_thresholds``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING

from sidecar.decision import (
    Judgement,
    Thresholds,
    alpha_from_mean_acceptance_length,
    best_num_speculative_tokens,
    calibrated_thresholds,
    default_thresholds,
    judge,
    speculation_schedule,
)
from sidecar.tap.windows import BucketCounts, BucketKey, TapHealth
from sidecar.upstream.derive import LoadCell, WindowStats

if TYPE_CHECKING:
    from sidecar.calibration import Calibration, ModelCalibration
    from sidecar.config import Settings
    from sidecar.upstream.monitor import MonitorState


@dataclass(frozen=True, slots=True)
class CalibrationUse:
    """Which calibration a model's verdicts use (``specdec_calibration_info``)."""

    source: str
    method: str = ""
    k: str = ""
    measured_at: str = ""


@dataclass(frozen=True, slots=True)
class LevelAdvice:
    """One calibrated load level: the live acceptance seen while vLLM ran that many requests (up to the next
    level) and the k that pays best there: from the live acceptance when the history holds --min-drafts draft
    steps at that load (``source="live"``), else the calibration's own (``source="calibration"``)."""

    concurrency: float
    draft_cost: float
    acceptance: float | None
    best_k: int
    source: str


@dataclass(frozen=True, slots=True)
class ScheduleAdvice:
    """The recommended ``num_speculative_tokens_per_batch_size`` for a calibrated model."""

    entries: tuple[tuple[int, int, int], ...]
    levels: tuple[LevelAdvice, ...]

    @property
    def json(self) -> str:
        return "[" + ",".join(f"[{a},{b},{k}]" for a, b, k in self.entries) + "]"


def live_schedule(cal: ModelCalibration, profile: Mapping[int, LoadCell], min_drafts: float) -> ScheduleAdvice | None:
    """Per calibrated level, the best k for the live acceptance at that load (the calibrated draft cost, the
    Leviathan model in ``decision``), as vLLM's schedule (``decision.speculation_schedule``, as ``measure``)."""
    advice = []
    for i, level in enumerate(cal.levels):
        low = level.concurrency if i else float("-inf")
        high = cal.levels[i + 1].concurrency if i + 1 < len(cal.levels) else float("inf")
        cells = [cell for load, cell in profile.items() if low <= load < high]
        accepted, drafted, drafts, generated = (
            sum(getattr(c, f) for c in cells) for f in ("accepted", "drafted", "drafts", "generated")
        )
        acceptance = accepted / drafted if drafted > 0 else None
        if drafts >= min_drafts and drafts > 0 and cal.k > 0:
            # Tokens per target pass over every pass, as measure computes it for its best k (E = generated /
            # (generated - accepted)); per draft step where vLLM's generated tokens are not known.
            passes = generated - accepted
            tokens_per_pass = generated / passes if generated > 0 and passes > 0 else 1.0 + accepted / drafts
            alpha = alpha_from_mean_acceptance_length(min(tokens_per_pass, cal.k + 1.0), cal.k)
            best = best_num_speculative_tokens(alpha, max(level.draft_cost, 0.0), cal.k)
            advice.append(LevelAdvice(level.concurrency, level.draft_cost, acceptance, best, "live"))
        else:
            advice.append(LevelAdvice(level.concurrency, level.draft_cost, acceptance, level.best_k, "calibration"))
    entries = speculation_schedule([(a.concurrency, a.best_k) for a in advice])
    if entries is None:
        return None
    return ScheduleAdvice(tuple((a, b, k) for a, b, k in entries), tuple(advice))


@dataclass(frozen=True, slots=True)
class Assessment:
    models: Mapping[str, Judgement] = field(default_factory=lambda: MappingProxyType({}))
    buckets: Mapping[BucketKey, Judgement] = field(default_factory=lambda: MappingProxyType({}))
    thresholds: Mapping[str, Thresholds] = field(default_factory=lambda: MappingProxyType({}))
    calibration: Mapping[str, CalibrationUse] = field(default_factory=lambda: MappingProxyType({}))
    load: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    schedules: Mapping[str, ScheduleAdvice] = field(default_factory=lambda: MappingProxyType({}))
    # buckets judged by the calibration's own costs for their temperatures (the others use their model's)
    bucket_thresholds: Mapping[BucketKey, Thresholds] = field(default_factory=lambda: MappingProxyType({}))


def _model_counts(
    stats: WindowStats | None, k: int | None
) -> tuple[float | None, float | None, float | None, float | None]:
    """(accepted, drafted, draft steps, target passes) of a model's window. Passes are every decode pass:
    generated - accepted tokens (each pass yields one token plus the drafts it accepted). V0 engines count no
    draft steps: with a known k every step drafted k tokens; without one the draft tokens stand in (the
    acceptance gate does the same)."""
    if stats is None:
        return None, None, None, None
    steps = stats.drafts
    if steps is None and stats.draft_tokens is not None:
        steps = stats.draft_tokens / k if k else stats.draft_tokens
    passes = None
    if stats.generation_tokens is not None and stats.accepted_tokens is not None:
        passes = stats.generation_tokens - stats.accepted_tokens
    return stats.accepted_tokens, stats.draft_tokens, steps, passes if passes and passes > 0 else None


def model_thresholds(
    calibration: ModelCalibration | None, load: float | None, drafts_per_step: float | None, settings: Settings
) -> Thresholds:
    """The thresholds a model is judged by at *load* (see the module docstring)."""
    if calibration is None:
        return default_thresholds(settings.break_even, settings.near_break_even_upper, settings.band)
    d = drafts_per_step if drafts_per_step else float(calibration.k)
    return calibrated_thresholds(calibration.draft_cost_at(load or 0.0), d, settings.band)


def bucket_thresholds(
    calibration: ModelCalibration | None, bucket: str, load: float | None, counts: BucketCounts, settings: Settings
) -> Thresholds | None:
    """A bucket's thresholds from the calibration's costs for the temperatures it holds, at *load*; ``None``
    where the calibration measured no temperature in this bucket (the model's thresholds then apply)."""
    if calibration is None:
        return None
    buckets = settings.temperature_buckets
    measured = [t for t in calibration.measured_temperatures() if buckets.bucket(t) == bucket]
    if not measured:
        return None
    passes = counts.passes or counts.steps
    d = counts.drafted / passes if counts.drafted and passes else float(calibration.k)
    cost = calibration.draft_cost_at(load or 0.0, lambda t: buckets.bucket(t) == bucket)
    return calibrated_thresholds(cost, d, settings.band)


def assess(
    upstream: MonitorState, tap: TapHealth | None, calibration: Calibration | None, settings: Settings
) -> Assessment:
    window = settings.verdict_window
    health = upstream.health if upstream.up else None
    model_stats: dict[str, WindowStats | None] = {}
    if health is not None:
        model_stats = {m: g.windows.get(window) for m, g in health.models.items()}
    bucket_counts: Mapping[BucketKey, BucketCounts] = tap.windows.get(window, {}) if tap is not None else {}
    judged = tap.judged if tap is not None else frozenset()
    names = sorted(set(model_stats) | {m for m, _ in bucket_counts if (m, _) in judged})

    judgements: dict[str, Judgement] = {}
    thresholds: dict[str, Thresholds] = {}
    uses: dict[str, CalibrationUse] = {}
    loads: dict[str, float] = {}
    schedules: dict[str, ScheduleAdvice] = {}
    for model in names:
        cal = calibration.models.get(model) if calibration is not None else None
        load = upstream.load.get(model)
        if load is not None:
            loads[model] = load
        accepted, drafted, steps, passes = _model_counts(model_stats.get(model), cal.k if cal else None)
        per_pass = drafted / (passes or steps) if drafted and (passes or steps) else None
        thresholds[model] = t = model_thresholds(cal, load, per_pass, settings)
        if model in model_stats:
            judgements[model] = judge(accepted, drafted, steps, settings.min_drafts, t, passes)
        uses[model] = (
            CalibrationUse("measure", cal.method, str(cal.k), cal.measured_at) if cal else CalibrationUse("default")
        )
        if cal is not None and health is not None:
            advice = live_schedule(cal, health.load_profile.get(model, {}), settings.min_drafts)
            if advice is not None:
                schedules[model] = advice
    buckets: dict[BucketKey, Judgement] = {}
    own: dict[BucketKey, Thresholds] = {}
    for key, c in bucket_counts.items():
        if key not in judged:
            continue
        model = key[0]
        cal = calibration.models.get(model) if calibration is not None else None
        t = bucket_thresholds(cal, key[1], upstream.load.get(model), c, settings)
        if t is not None:
            own[key] = t
        buckets[key] = judge(c.accepted, c.drafted, c.steps, settings.min_drafts, t or thresholds[model], c.passes)
    return Assessment(
        MappingProxyType(judgements), MappingProxyType(buckets), MappingProxyType(thresholds),
        MappingProxyType(uses), MappingProxyType(loads), MappingProxyType(schedules), MappingProxyType(own),
    )  # fmt: skip
