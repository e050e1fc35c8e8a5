"""Pure functions from scrape history to speculative-decoding health. No I/O, no clocks.

Counters are turned into *reset-adjusted totals* as each scrape arrives (``advance``): when any counter of a
(model, engine) goes down, vLLM restarted, and every counter of that engine counts from zero again (the
increase across the restart is the new value, as Prometheus's ``increase()`` does). Window deltas are then
plain subtractions of adjusted totals, so a restart never yields a negative or spiking value.

A counter (or a whole engine) missing from one poll is not a restart: its last raw value and its total are
carried until it comes back, and only a value that really went down counts as one. Totals per model add up
every engine ever seen, so an engine that disappears never makes a model's totals go down.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from itertools import islice
from dataclasses import dataclass, field
from types import MappingProxyType

from sidecar.decision import clamped_ratio, enough_drafts, window_acceptance
from sidecar.windows import base_point, trim_history  # noqa: F401 (the poll loop trims with it)
from sidecar.upstream.vllm_metrics import COUNTERS, EngineSample, SeriesKey, VllmSnapshot

COUNTER_FIELDS: tuple[str, ...] = tuple(COUNTERS.values())
_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Counts:
    """Counter values of one (model, engine), or summed over a model's engines: vLLM's named counters
    (``COUNTER_FIELDS``) and the accepted tokens per speculative position. Raw readings and reset-adjusted
    totals both use it."""

    named: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    positions: Mapping[int, float] = field(default_factory=lambda: _EMPTY)

    @classmethod
    def of(cls, sample: EngineSample) -> Counts:
        named = {name: v for name in COUNTER_FIELDS if (v := sample.counter(name)) is not None}
        return cls(MappingProxyType(named), MappingProxyType(dict(sample.accepted_per_position)))

    def went_down(self, before: Counts) -> bool:
        """True when any counter present in both readings is lower now: the engine restarted."""
        return any(v < before.named[k] for k, v in self.named.items() if k in before.named) or any(
            v < before.positions[k] for k, v in self.positions.items() if k in before.positions
        )

    def plus_newer(self, newer: Counts) -> Counts:
        """These values overwritten by *newer*'s where it has them."""
        return Counts(
            MappingProxyType({**self.named, **newer.named}), MappingProxyType({**self.positions, **newer.positions})
        )

    def plus(self, other: Counts) -> Counts:
        named = dict(self.named)
        for k, v in other.named.items():
            named[k] = named.get(k, 0.0) + v
        positions = dict(self.positions)
        for k, v in other.positions.items():
            positions[k] = positions.get(k, 0.0) + v
        return Counts(MappingProxyType(named), MappingProxyType(positions))


def _carry(now: Mapping, raw: Mapping, totals: Mapping, restarted: bool) -> tuple[dict, dict]:
    """Next (raw, totals) for one family of counters. Counters absent now keep their raw value and total
    (after a restart their raw value is 0: when they come back, all of it is new)."""
    next_raw = {k: (0.0 if restarted else v) for k, v in raw.items()}
    next_totals = dict(totals)
    for k, value in now.items():
        base = totals.get(k)
        if base is None:  # first seen on a known engine (e.g. a new position): its value is the baseline
            next_totals[k] = value if restarted else 0.0
        elif restarted:
            next_totals[k] = base + value
        else:
            next_totals[k] = base + (value - raw[k])
        next_raw[k] = value
    return next_raw, next_totals


@dataclass(frozen=True, slots=True)
class EngineCounters:
    """The last raw value and the reset-adjusted total of every counter of one (model, engine) ever seen."""

    raw: Counts
    totals: Counts
    present: bool = True  # in the latest scrape (else carried from an earlier one)
    gap_polls: int = 0  # consecutive polls that lacked some of this engine's counters
    held: Counts | None = None  # the newest values of those held-back polls (folded in on a restart)


# A poll that lacks some counters an engine had is held back whole (all its counters keep their last values),
# so every ratio over a window stays consistent; after this many such polls in a row the missing counters
# are taken as gone for good and the others move on.
MAX_GAP_POLLS = 3


def _lacks(now: Counts, before: Counts) -> bool:
    return any(k not in now.named for k in before.named) or any(k not in now.positions for k in before.positions)


def _next_engine(before: EngineCounters | None, now: Counts) -> tuple[EngineCounters, bool]:
    if before is None:  # an engine seen for the first time starts its totals at 0
        zero = Counts(
            MappingProxyType(dict.fromkeys(now.named, 0.0)), MappingProxyType(dict.fromkeys(now.positions, 0.0))
        )
        return EngineCounters(now, zero), False
    restarted = now.went_down(before.raw)
    lacking = _lacks(now, before.raw)
    if lacking and not restarted and before.gap_polls < MAX_GAP_POLLS:
        held = before.held.plus_newer(now) if before.held is not None else now
        return EngineCounters(before.raw, before.totals, True, before.gap_polls + 1, held), False
    if restarted and before.held is not None:  # count what the held-back polls saw before the restart
        before, _ = _next_engine(EngineCounters(before.raw, before.totals, gap_polls=MAX_GAP_POLLS), before.held)
    named_raw, named_totals = _carry(now.named, before.raw.named, before.totals.named, restarted)
    pos_raw, pos_totals = _carry(now.positions, before.raw.positions, before.totals.positions, restarted)
    return (
        EngineCounters(
            Counts(MappingProxyType(named_raw), MappingProxyType(pos_raw)),
            Counts(MappingProxyType(named_totals), MappingProxyType(pos_totals)),
            gap_polls=before.gap_polls if lacking and not restarted else 0,
        ),
        restarted,
    )


@dataclass(frozen=True, slots=True)
class Point:
    """One successful scrape: when (monotonic seconds), what, and every engine's counters."""

    t: float
    snapshot: VllmSnapshot
    engines: Mapping[SeriesKey, EngineCounters]
    resets: int = 0

    def totals(self, key: SeriesKey) -> Counts | None:
        engine = self.engines.get(key)
        return engine.totals if engine is not None else None


def advance(previous: Point | None, t: float, snapshot: VllmSnapshot) -> Point:
    """The next history point, carrying counters and engines this scrape lacks."""
    engines: dict[SeriesKey, EngineCounters] = {}
    resets = 0
    before_engines = previous.engines if previous is not None else {}
    for key, sample in snapshot.engines.items():
        engines[key], restarted = _next_engine(before_engines.get(key), Counts.of(sample))
        resets += restarted
    for key, carried in before_engines.items():
        if key not in engines:
            engines[key] = EngineCounters(carried.raw, carried.totals, present=False)
    return Point(t, snapshot, MappingProxyType(engines), resets)


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


def _delta(now: Mapping, base: Mapping | None, key: object) -> float | None:
    if key not in now:
        return None
    start = base.get(key, 0.0) if base is not None else 0.0
    return max(0.0, now[key] - start)


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
    enough = enough_drafts(gate, min_drafts)
    acceptance = window_acceptance(accepted, draft_tokens, gate, min_drafts)
    mean_len = None
    positions: dict[int, float] = {}
    token_ratio = None
    if enough and accepted is not None:
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
    spans: Mapping[float, float]
    totals: Mapping[str, Counts] = field(default_factory=lambda: MappingProxyType({}))
    # Per model: draft work by the load it ran at, over the whole history (see ``load_profile``).
    load_profile: Mapping[str, Mapping[int, LoadCell]] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class LoadCell:
    """Draft work done between polls while a model ran this many requests: what the live
    ``num_speculative_tokens_per_batch_size`` recommendation reads per load level."""

    accepted: float = 0.0
    drafted: float = 0.0
    drafts: float = 0.0
    generated: float = 0.0

    def plus(self, accepted: float, drafted: float, drafts: float, generated: float) -> LoadCell:
        return LoadCell(self.accepted + accepted, self.drafted + drafted, self.drafts + drafts,
                        self.generated + generated)


def load_profile(points: Sequence[Point]) -> dict[str, dict[int, LoadCell]]:
    """Per model, the accepted / drafted tokens and draft steps of each poll interval in *points*, added up by
    the model's running requests at the end of the interval (rounded; vLLM's batch size, near enough)."""
    profile: dict[str, dict[int, LoadCell]] = {}
    for before, after in zip(points, islice(points, 1, None)):
        running: dict[str, float] = {}
        for (model, _), sample in after.snapshot.engines.items():
            if sample.running is not None:
                running[model] = running.get(model, 0.0) + sample.running
        deltas: dict[str, list[float]] = {}
        for key, engine in after.engines.items():
            if key[0] not in running:
                continue
            base = before.totals(key)
            d = deltas.setdefault(key[0], [0.0, 0.0, 0.0, 0.0])
            for i, name in enumerate(("accepted_tokens", "draft_tokens", "drafts", "generation_tokens")):
                d[i] += _delta(engine.totals.named, base.named if base else None, name) or 0.0
        for model, (accepted, drafted, drafts, generated) in deltas.items():
            if drafted <= 0:
                continue
            cells = profile.setdefault(model, {})
            load = round(running[model])
            cells[load] = cells.get(load, LoadCell()).plus(accepted, drafted, drafts, generated)
    return profile


def window_load(points: Sequence[Point], since: float) -> dict[str, float]:
    """Per model, the running requests the drafts of the intervals ending after *since* ran at, weighted by
    draft tokens (the load the window's acceptance was reached at, what a calibrated break-even is read at).
    A model without drafts there is left out. The last poll's running requests alone jump with every request
    that starts or ends (seen: 0 between two polls of four busy clients)."""
    start = max(0, bisect.bisect_left([p.t for p in points], since) - 1)
    out: dict[str, float] = {}
    for model, cells in load_profile(list(islice(points, start, None))).items():
        drafted = sum(cell.drafted for cell in cells.values())
        if drafted > 0:
            out[model] = sum(load * cell.drafted for load, cell in cells.items()) / drafted
    return out


def _engine_deltas(now: Counts, base: Counts | None) -> tuple[dict[str, float | None], dict[int, float]]:
    deltas = {name: _delta(now.named, base.named if base else None, name) for name in COUNTER_FIELDS}
    positions = {
        pos: _delta(now.positions, base.positions if base else None, pos) or 0.0 for pos in now.positions
    }
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
    for key, engine in last.engines.items():
        stats: dict[float, WindowStats] = {}
        for w, base in bases.items():
            if base is None:
                continue
            deltas, positions = _engine_deltas(engine.totals, base.totals(key))
            stats[w] = window_stats(deltas, positions, w, spans[w], min_drafts)
            # A model's windows add up every engine it has had, present or carried: an engine that vanished
            # mid-window still produced what it produced.
            model_windows.setdefault(key[0], {}).setdefault(w, []).append((deltas, positions))
        sample = last.snapshot.engines.get(key)
        if sample is None:  # carried, not in this scrape: no per-engine series
            continue
        engine_health[key] = GroupHealth(
            windows=MappingProxyType(stats),
            pressure=_pressure([sample]),
            v0_acceptance_rate=sample.v0_acceptance_rate,
            v0_efficiency=sample.v0_efficiency,
        )

    model_health: dict[str, GroupHealth] = {}
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

    totals: dict[str, Counts] = {}
    for (model, _), engine in last.engines.items():
        if model in model_health:
            totals[model] = totals.get(model, Counts()).plus(engine.totals)

    profile = load_profile(points)
    return Health(
        load_profile=MappingProxyType({m: MappingProxyType(c) for m, c in profile.items() if m in model_health}),
        totals=MappingProxyType(totals),
        models=MappingProxyType(model_health),
        engines=MappingProxyType(engine_health),
        spans=MappingProxyType(spans),
    )
