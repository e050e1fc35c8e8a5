"""Pure functions from scrape history to speculative-decoding health. No I/O, no clocks.

Counters are turned into *reset-adjusted totals* as each scrape arrives (``advance``): when any counter of a
(model, engine) goes down, vLLM restarted, and every counter of that engine counts from zero again (the
increase across the restart is the new value, as Prometheus's ``increase()`` does). Window deltas are then
plain subtractions of adjusted totals, so a restart never yields a negative or spiking value.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, TypeVar

from sidecar.decision import Verdict, clamped_ratio, decide
from sidecar.upstream.vllm_metrics import COUNTERS, EngineSample, SeriesKey, VllmSnapshot

COUNTER_FIELDS: tuple[str, ...] = tuple(COUNTERS.values())
_EMPTY: Mapping[int, float] = MappingProxyType({})


def _counter_values(sample: EngineSample) -> dict[str, float]:
    values = {name: v for name in COUNTER_FIELDS if (v := sample.counter(name)) is not None}
    for position, v in sample.accepted_per_position.items():
        values[f"pos:{position}"] = v
    return values


@dataclass(frozen=True, slots=True)
class Point:
    """One successful scrape: when (monotonic seconds), what, and the reset-adjusted counter totals."""

    t: float
    snapshot: VllmSnapshot
    raw: Mapping[SeriesKey, Mapping[str, float]]
    totals: Mapping[SeriesKey, Mapping[str, float]]
    resets: int = 0


def advance(previous: Point | None, t: float, snapshot: VllmSnapshot) -> Point:
    """The next history point. An engine seen for the first time starts its totals at 0."""
    raw: dict[SeriesKey, Mapping[str, float]] = {}
    totals: dict[SeriesKey, Mapping[str, float]] = {}
    resets = 0
    for key, sample in snapshot.engines.items():
        now = _counter_values(sample)
        raw[key] = MappingProxyType(now)
        before = previous.raw.get(key) if previous else None
        before_totals = previous.totals.get(key) if previous else None
        if before is None or before_totals is None:
            totals[key] = MappingProxyType({name: 0.0 for name in now})
            continue
        restarted = any(now[name] < before[name] for name in now if name in before)
        resets += restarted
        adjusted: dict[str, float] = {}
        for name, value in now.items():
            base = before_totals.get(name)
            if base is None:  # a counter that appeared since the last scrape (e.g. a new position)
                adjusted[name] = value if restarted else 0.0
            elif restarted or name not in before:
                adjusted[name] = base + value
            else:
                adjusted[name] = base + (value - before[name])
        totals[key] = MappingProxyType(adjusted)
    return Point(t, snapshot, MappingProxyType(raw), MappingProxyType(totals), resets)


class Timed(Protocol):
    t: float


T = TypeVar("T", bound=Timed)


def base_point(points: Sequence[T], window: float, tolerance: float) -> T | None:
    """The newest point at least *window* seconds (less *tolerance*) before the last one.

    While the history is shorter than the window the oldest point is used (a partial window; its real
    span is exported). ``None`` when there are fewer than two points. Any history of items with ``.t``.
    """
    if len(points) < 2:
        return None
    target = points[-1].t - window + tolerance
    chosen = points[0]
    for i in range(len(points) - 1):
        point = points[i]
        if point.t <= target:
            chosen = point
        else:
            break
    return chosen


def trim_history(points: deque[T], now: float, keep: float) -> None:
    """Drop points no window of length *keep* can start from, keeping the newest one at least that old."""
    while len(points) > 2 and points[1].t <= now - keep:
        points.popleft()


@dataclass(frozen=True, slots=True)
class WindowStats:
    """Deltas and rates over one window, for one engine or one model (summed over engines)."""

    window: float
    span: float
    drafts: float | None
    draft_tokens: float | None
    accepted_tokens: float | None
    generation_tokens: float | None
    preemptions: float | None
    accepted_per_position: Mapping[int, float] = field(default_factory=lambda: _EMPTY)
    enough_drafts: bool = False
    acceptance_rate: float | None = None
    mean_acceptance_length: float | None = None
    position_acceptance: Mapping[int, float] = field(default_factory=lambda: _EMPTY)
    accepted_token_ratio: float | None = None

    def per_second(self, value: float | None) -> float | None:
        if value is None or self.span <= 0:
            return None
        return max(0.0, value) / self.span

    @property
    def draft_tokens_per_second(self) -> float | None:
        return self.per_second(self.draft_tokens)

    @property
    def accepted_tokens_per_second(self) -> float | None:
        return self.per_second(self.accepted_tokens)

    @property
    def wasted_draft_tokens_per_second(self) -> float | None:
        if self.draft_tokens is None or self.accepted_tokens is None:
            return None
        return self.per_second(max(0.0, self.draft_tokens - self.accepted_tokens))

    @property
    def preemptions_per_second(self) -> float | None:
        return self.per_second(self.preemptions)


def _delta(now: Mapping[str, float], base: Mapping[str, float] | None, name: str) -> float | None:
    if name not in now:
        return None
    start = base.get(name, 0.0) if base is not None else 0.0
    return max(0.0, now[name] - start)


def _sum(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) if present else None


def window_stats(
    deltas: Mapping[str, float | None],
    per_position: Mapping[int, float],
    window: float,
    span: float,
    min_drafts: int,
) -> WindowStats:
    """Rates from counter deltas over one window.

    Acceptance needs ``min_drafts`` draft steps in the window (V0 exports no draft-step counter: draft
    tokens are counted instead); below that the acceptance series are absent rather than 0.
    """
    drafts = deltas.get("drafts")
    draft_tokens = deltas.get("draft_tokens")
    accepted = deltas.get("accepted_tokens")
    generated = deltas.get("generation_tokens")
    gate = drafts if drafts is not None else draft_tokens
    enough = gate is not None and gate >= min_drafts and gate > 0
    acceptance = mean_len = None
    positions: dict[int, float] = {}
    token_ratio = None
    if enough and accepted is not None:
        if draft_tokens:
            acceptance = clamped_ratio(accepted, draft_tokens)
        if drafts:
            # 1 + accepted per step, bounded by the number of speculative positions + 1 when known.
            mean_len = 1.0 + max(0.0, accepted / drafts)
            if per_position:
                mean_len = min(mean_len, 1.0 + len(per_position))
            positions = {pos: clamped_ratio(count, drafts) for pos, count in sorted(per_position.items())}
        if generated:
            token_ratio = clamped_ratio(accepted, generated)
    return WindowStats(
        window=window,
        span=span,
        drafts=drafts,
        draft_tokens=draft_tokens,
        accepted_tokens=accepted,
        generation_tokens=generated,
        preemptions=deltas.get("preemptions"),
        accepted_per_position=MappingProxyType(dict(per_position)),
        enough_drafts=enough,
        acceptance_rate=acceptance,
        mean_acceptance_length=mean_len,
        position_acceptance=MappingProxyType(positions),
        accepted_token_ratio=token_ratio,
    )


@dataclass(frozen=True, slots=True)
class Pressure:
    """Instantaneous KV-cache and queue state (from the latest scrape)."""

    kv_usage: float | None
    running: float | None
    waiting: float | None
    kv_capacity_tokens: float | None
    kv_capacity_bytes: float | None


@dataclass(frozen=True, slots=True)
class GroupHealth:
    """One engine, or one model summed over its engines."""

    windows: Mapping[float, WindowStats]
    pressure: Pressure
    v0_acceptance_rate: float | None = None
    v0_efficiency: float | None = None


@dataclass(frozen=True, slots=True)
class Health:
    """Everything the collector renders. Built once per scrape, never mutated."""

    models: Mapping[str, GroupHealth]
    engines: Mapping[SeriesKey, GroupHealth]
    verdicts: Mapping[str, Verdict]
    verdict_acceptance: Mapping[str, float | None]
    spans: Mapping[float, float]
    totals: Mapping[str, Mapping[str, float]] = field(default_factory=lambda: MappingProxyType({}))


def _engine_deltas(
    now: Mapping[str, float], base: Mapping[str, float] | None
) -> tuple[dict[str, float | None], dict[int, float]]:
    deltas = {name: _delta(now, base, name) for name in COUNTER_FIELDS}
    positions: dict[int, float] = {}
    for name in now:
        if name.startswith("pos:"):
            positions[int(name[4:])] = _delta(now, base, name) or 0.0
    return deltas, positions


def _pressure(samples: list[EngineSample]) -> Pressure:
    usages = [u for s in samples if (u := s.kv_usage_ratio) is not None]
    return Pressure(
        # The fullest engine is what preempts first, so a model's KV usage is its maximum.
        kv_usage=min(1.0, max(0.0, max(usages))) if usages else None,
        running=_sum([s.running for s in samples]),
        waiting=_sum([s.waiting for s in samples]),
        kv_capacity_tokens=_sum([s.kv_capacity_tokens for s in samples]),
        kv_capacity_bytes=_sum([s.kv_capacity_bytes for s in samples]),
    )


def derive(
    points: Sequence[Point],
    windows: Sequence[float],
    *,
    min_drafts: int,
    verdict_window: float,
    break_even: float,
    near_upper: float,
    tolerance: float = 0.0,
) -> Health | None:
    """Health over each window from the history ``points`` (oldest first). ``None`` without history."""
    if not points:
        return None
    last = points[-1]
    bases = {w: base_point(points, w, tolerance) for w in windows}
    spans = {w: (last.t - b.t) if b is not None else 0.0 for w, b in bases.items()}

    engine_health: dict[SeriesKey, GroupHealth] = {}
    model_windows: dict[str, dict[float, list[tuple[dict[str, float | None], dict[int, float]]]]] = {}
    for key, totals in last.totals.items():
        sample = last.snapshot.engines[key]
        stats: dict[float, WindowStats] = {}
        for w, base in bases.items():
            if base is None:
                continue
            deltas, positions = _engine_deltas(totals, base.totals.get(key))
            stats[w] = window_stats(deltas, positions, w, spans[w], min_drafts)
            model_windows.setdefault(key[0], {}).setdefault(w, []).append((deltas, positions))
        engine_health[key] = GroupHealth(
            windows=MappingProxyType(stats),
            pressure=_pressure([sample]),
            v0_acceptance_rate=sample.v0_acceptance_rate,
            v0_efficiency=sample.v0_efficiency,
        )

    model_health: dict[str, GroupHealth] = {}
    verdicts: dict[str, Verdict] = {}
    verdict_acceptance: dict[str, float | None] = {}
    for model in last.snapshot.models:
        samples = [s for (m, _), s in last.snapshot.engines.items() if m == model]
        stats = {}
        for w, parts in model_windows.get(model, {}).items():
            deltas = {name: _sum([d[name] for d, _ in parts]) for name in COUNTER_FIELDS}
            positions: dict[int, float] = {}
            for _, per_pos in parts:
                for pos, v in per_pos.items():
                    positions[pos] = positions.get(pos, 0.0) + v
            stats[w] = window_stats(deltas, positions, w, spans[w], min_drafts)
        v0_rates = [s.v0_acceptance_rate for s in samples if s.v0_acceptance_rate is not None]
        v0_eff = [s.v0_efficiency for s in samples if s.v0_efficiency is not None]
        model_health[model] = GroupHealth(
            windows=MappingProxyType(stats),
            pressure=_pressure(samples),
            v0_acceptance_rate=sum(v0_rates) / len(v0_rates) if v0_rates else None,
            v0_efficiency=sum(v0_eff) / len(v0_eff) if v0_eff else None,
        )
        chosen = stats.get(verdict_window)
        acceptance = chosen.acceptance_rate if chosen is not None else None
        verdict_acceptance[model] = acceptance
        verdicts[model] = decide(acceptance, break_even, near_upper)

    totals: dict[str, dict[str, float]] = {}
    for (model, _), engine_totals in last.totals.items():
        summed = totals.setdefault(model, {})
        for name, value in engine_totals.items():
            summed[name] = summed.get(name, 0.0) + value

    return Health(
        totals=MappingProxyType({m: MappingProxyType(t) for m, t in totals.items()}),
        models=MappingProxyType(model_health),
        engines=MappingProxyType(engine_health),
        verdicts=MappingProxyType(verdicts),
        verdict_acceptance=MappingProxyType(verdict_acceptance),
        spans=MappingProxyType(spans),
    )
