"""``measure``'s arithmetic: requests -> cells -> speed-ups with uncertainty -> the break-even fit -> calibration.

Pure functions over plain records, so the figures in ``results.json`` can be recomputed from the
per-request JSONL. Acceptance is token-weighted (sum of accepted / sum of drafted, never a mean of
ratios). A speed-up is baseline / speculative for TPOT and speculative / baseline for throughput, so above
1 always means speculation helps; its 95% interval comes from a seeded bootstrap over requests, and so does
the interval of the fitted draft cost in ``calibration.json``. The break-even model and thresholds come from
:mod:`sidecar.decision`, the calibration's format from :mod:`sidecar.calibration`.

Every result is a frozen dataclass whose ``to_json()`` is its part of ``results.json``; field order is key
order.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace

from sidecar.buckets import TemperatureBuckets
from sidecar.calibration import Level, ModelCalibration, TemperatureCost, break_even_of
from sidecar.decision import (
    DEFAULT_BREAK_EVEN,
    DEFAULT_NEAR_UPPER,
    alpha_from_mean_acceptance_length,
    best_num_speculative_tokens,
    break_even_acceptance_rate,
    break_even_alpha,
    clamped_ratio,
    decide,
    fit_draft_cost,
    Verdict,
    modelled_speedup,
    sample_quantile,
    speculation_schedule,
)
from sidecar.decision import speedup_verdict as modelled_verdict

SPEC, BASELINE = "spec", "baseline"
HELPS, NEUTRAL, HURTS = "helps", "neutral", "hurts"
VLLM_CONFIG_KEY = "num_speculative_tokens_per_batch_size"  # vLLM 0.32 SpeculativeConfig field
CONFIDENCE = 0.95
LEVIATHAN = ("Leviathan et al. 2023: tokens per step E = (1 - alpha^(k+1)) / (1 - alpha), "
             "speed-up = E / (k*c + 1)")


@dataclass(slots=True)
class RequestRecord:
    """One request as ``measure`` saw it; one line of ``requests.jsonl``."""

    server: str
    temperature: float
    concurrency: int
    round: int
    index: int
    prompt: int
    ok: bool = False
    status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int | None = None
    content_chunks: int = 0
    accepted_tokens: int | None = None
    draft_tokens: int | None = None
    spec_steps: int | None = None
    num_spec_tokens: int | None = None
    acceptance_rate: float | None = None
    acceptance_source: str | None = None  # "vllm" | "stream_steps" | None

    def to_json(self) -> dict:
        return asdict(self)


def _quantiles(values: Sequence[float], qs: Sequence[float]) -> dict[str, float | None]:
    return {f"p{round(q * 100)}": sample_quantile(q, values) for q in qs}


@dataclass(frozen=True, slots=True)
class Interval:
    value: float | None
    ci_low: float | None
    ci_high: float | None

    def to_json(self) -> dict:
        return asdict(self)


NO_INTERVAL = Interval(None, None, None)


def bootstrap_ratio(
    numerator: Sequence[RequestRecord],
    denominator: Sequence[RequestRecord],
    statistic: Callable[[Sequence[RequestRecord]], float | None],
    resamples: int = 1000,
    confidence: float = CONFIDENCE,
    seed: int = 0,
) -> Interval:
    """statistic(numerator) / statistic(denominator) with a percentile bootstrap interval.

    Each side is resampled with replacement on its own (the two servers ran separate requests).
    """
    point_num, point_den = statistic(numerator), statistic(denominator)
    if not point_num or not point_den:
        return NO_INTERVAL
    value = point_num / point_den
    rng = random.Random(seed)
    ratios = []
    for _ in range(resamples):
        num = statistic([rng.choice(numerator) for _ in numerator])
        den = statistic([rng.choice(denominator) for _ in denominator])
        if num and den:
            ratios.append(num / den)
    if len(ratios) < resamples // 2:
        return Interval(value, None, None)
    tail = (1.0 - confidence) / 2
    return Interval(value, sample_quantile(tail, ratios), sample_quantile(1.0 - tail, ratios))


def median_tpot(records: Sequence[RequestRecord]) -> float | None:
    return sample_quantile(0.5, [r.tpot_s for r in records if r.tpot_s is not None])


def tokens_per_request_second(records: Sequence[RequestRecord]) -> float | None:
    """Sum of output tokens / sum of request durations: throughput per concurrent slot, resamplable by request.

    In a closed loop with C clients each slot is always busy, so the cell's throughput is about C times this;
    C is the same for both servers of a cell, so ratios need no wall clock.
    """
    seconds = sum(r.e2e_s for r in records if r.e2e_s is not None)
    tokens = sum(r.output_tokens or 0 for r in records if r.e2e_s is not None)
    return tokens / seconds if seconds > 0 else None


def inverse(statistic: Callable[[Sequence[RequestRecord]], float | None]):
    def inverted(records: Sequence[RequestRecord]) -> float | None:
        value = statistic(records)
        return 1.0 / value if value else None

    return inverted


def speedup_verdict(interval: Interval, band: float) -> str:
    """helps: the whole interval above 1 and the point a ``use`` by the sidecar's own band
    (``decision.speedup_verdict``: at least 1 + band); hurts: the whole interval below 1 and the point a
    ``disable`` (below 1 - band); else neutral."""
    if interval.value is None or interval.ci_low is None or interval.ci_high is None:
        return NEUTRAL
    point = modelled_verdict(interval.value, band)
    if interval.ci_low > 1.0 and point is Verdict.USE:
        return HELPS
    if interval.ci_high < 1.0 and point is Verdict.DISABLE:
        return HURTS
    return NEUTRAL


@dataclass(frozen=True, slots=True)
class Speedup:
    """A speculative cell over its baseline cell: both speed-ups with 95% intervals, and the verdict."""

    tpot: Interval
    throughput: Interval
    verdict: str
    basis: str = "throughput"

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Cell:
    server: str
    temperature: float
    concurrency: int
    records: list[RequestRecord] = field(default_factory=list)
    wall_seconds: float = 0.0

    @property
    def ok(self) -> list[RequestRecord]:
        return [r for r in self.records if r.ok]


@dataclass(frozen=True, slots=True)
class CellSummary:
    """One server's cell: an entry of ``results.json``'s ``cells``."""

    server: str
    temperature: float
    temperature_bucket: str
    concurrency: int
    requests: int
    errors: int
    output_tokens: int
    wall_seconds: float
    output_tokens_per_second: float | None
    accepted_tokens: int
    draft_tokens: int
    spec_steps: int
    acceptance_source: str | None
    acceptance_rate: float | None
    mean_acceptance_length: float | None
    acceptance_verdict: str | None
    acceptance_p10: float | None
    acceptance_p50: float | None
    acceptance_p90: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_p99_s: float | None
    tpot_p50_s: float | None
    tpot_p95_s: float | None
    tpot_p99_s: float | None
    e2e_p50_s: float | None
    e2e_p95_s: float | None
    e2e_p99_s: float | None
    num_spec_tokens: int | None
    speedup: Speedup | None = None  # speculative cells with a baseline

    def to_json(self) -> dict:
        return asdict(self)


def summarise(
    cell: Cell,
    buckets: TemperatureBuckets,
    break_even: float = DEFAULT_BREAK_EVEN,
    near_upper: float = DEFAULT_NEAR_UPPER,
) -> CellSummary:
    """A cell's summary (without the speed-up, which needs the other server's cell)."""
    ok = cell.ok
    vllm = [r for r in ok if r.acceptance_source == "vllm"]
    counted = [r for r in ok if r.accepted_tokens is not None]
    sources = sorted({r.acceptance_source for r in counted if r.acceptance_source})
    accepted = sum(r.accepted_tokens for r in counted)  # type: ignore[misc]
    drafted = sum(r.draft_tokens or 0 for r in vllm)
    steps = sum(r.spec_steps or 0 for r in counted)
    accepted_vllm = sum(r.accepted_tokens or 0 for r in vllm)
    acceptance = clamped_ratio(accepted_vllm, drafted) if drafted else None
    rates = [r.acceptance_rate for r in vllm if r.acceptance_rate is not None]
    tokens = sum(r.output_tokens or 0 for r in ok)
    latency: dict[str, float | None] = {}
    for name, attr in (("ttft", "ttft_s"), ("tpot", "tpot_s"), ("e2e", "e2e_s")):
        values = [getattr(r, attr) for r in ok if getattr(r, attr) is not None]
        latency.update({f"{name}_{k}_s": v for k, v in _quantiles(values, (0.5, 0.95, 0.99)).items()})
    k_values = {r.num_spec_tokens for r in vllm if r.num_spec_tokens}
    return CellSummary(
        server=cell.server,
        temperature=cell.temperature,
        temperature_bucket=buckets.bucket(cell.temperature),
        concurrency=cell.concurrency,
        requests=len(ok),
        errors=len(cell.records) - len(ok),
        output_tokens=tokens,
        wall_seconds=cell.wall_seconds,
        output_tokens_per_second=tokens / cell.wall_seconds if cell.wall_seconds > 0 else None,
        accepted_tokens=accepted,
        draft_tokens=drafted,
        spec_steps=steps,
        acceptance_source="+".join(sources) if sources else None,
        acceptance_rate=acceptance,
        mean_acceptance_length=1.0 + accepted / steps if steps else None,
        acceptance_verdict=decide(acceptance, break_even, near_upper).value if cell.server == SPEC else None,
        **{f"acceptance_{k}": v for k, v in _quantiles(rates, (0.1, 0.5, 0.9)).items()},
        **latency,
        num_spec_tokens=k_values.pop() if len(k_values) == 1 else None,
    )


def compare(spec: Cell, baseline: Cell, band: float, resamples: int = 1000, seed: int = 0) -> Speedup:
    """Speed-ups of a speculative cell over its baseline cell, with 95% bootstrap intervals and a verdict."""
    spec_ok, base_ok = spec.ok, baseline.ok
    if not spec_ok or not base_ok:
        return Speedup(NO_INTERVAL, NO_INTERVAL, NEUTRAL)
    tpot = bootstrap_ratio(spec_ok, base_ok, inverse(median_tpot), resamples, seed=seed)
    throughput = bootstrap_ratio(spec_ok, base_ok, tokens_per_request_second, resamples, seed=seed + 1)
    return Speedup(tpot, throughput, speedup_verdict(throughput, band))


def drafts_per_pass(output_tokens: int, accepted_tokens: int, draft_tokens: int) -> float | None:
    """Draft tokens proposed per target forward pass (passes = output - accepted, as ``tokens_per_pass``):
    k when the drafter proposes k on every pass, fewer for n-gram drafting (no match, no draft)."""
    passes = output_tokens - accepted_tokens
    return draft_tokens / passes if passes > 0 and draft_tokens > 0 else None


def tokens_per_pass(output_tokens: int, accepted_tokens: int) -> float | None:
    """Output tokens per target forward pass: every pass yields one token plus the drafts it accepted, so
    passes = output - accepted. Counts passes where the drafter proposed nothing (n-gram) too."""
    passes = output_tokens - accepted_tokens
    return output_tokens / passes if passes > 0 and output_tokens > 0 else None


# --- the break-even fit ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CellFit:
    """The model against the measurement for one speculative cell of a level."""

    temperature: float
    tokens_per_pass: float
    alpha: float
    model_speedup: float
    measured_speedup: float  # the cell's throughput speed-up, what c is fitted to
    pays: bool
    draft_cost: float | None = None  # c fitted from this cell alone (calibration.json's by_temperature)


@dataclass(frozen=True, slots=True)
class LevelFit:
    """One concurrency level of ``break_even_fit``."""

    concurrency: int
    cells: int
    draft_cost: float | None
    alpha: float | None
    tokens_per_pass: float | None
    break_even_alpha: float | None = None
    break_even_acceptance_rate: float | None = None
    predicted_speedup: float | None = None
    pays: bool | None = None
    suggested_num_speculative_tokens: int | None = None
    per_temperature: tuple[CellFit, ...] = ()


@dataclass(frozen=True, slots=True)
class Schedule:
    """vLLM's dynamic speculation schedule: ``--speculative-config '{"<key>": <value>, ...}'``."""

    key: str
    value: list[list[int]]
    note: str = "batch sizes approximated by client concurrency; vLLM carries the last entry forward"


@dataclass(frozen=True, slots=True)
class BreakEvenFit:
    """``results.json``'s ``break_even_fit``."""

    model: str
    k: int
    levels: tuple[LevelFit, ...]
    stops_paying_at_concurrency: int | None
    stops_paying_at_concurrency_by_temperature: dict[str, int | None]
    measured_hurts_from_concurrency_by_temperature: dict[str, int | None]
    schedule: Schedule | None

    def to_json(self) -> dict:
        return asdict(self)


def _fittable(row: CellSummary) -> bool:
    return (row.server == SPEC and row.speedup is not None and bool(row.speedup.throughput.value)
            and tokens_per_pass(row.output_tokens, row.accepted_tokens) is not None
            and drafts_per_pass(row.output_tokens, row.accepted_tokens, row.draft_tokens) is not None)


def fit_model(rows: Sequence[CellSummary], k: int | None) -> BreakEvenFit | None:
    """Fit the draft cost c and alpha per concurrency level (Leviathan et al.) from the paired cells.

    Per spec cell: E = output tokens per target pass (measured), D = draft tokens proposed per pass, alpha
    the value with E(alpha, k) = E (an effective alpha over every pass), S = the cell's throughput speed-up
    (tokens per request-second, the basis of the cell's verdict). Not the TPOT speed-up: on a CPU-starved API
    server a whole response can reach the client in one read (TPOT 0 at the client, seen with two vLLM
    servers on 2 cores at concurrency 1), which leaves a level without a fit. Per level: c by least squares over the level's cells (on time
    per token, 1/S = (1 + c*D)/E: ``decision.fit_draft_cost``), the break-even alpha and acceptance rate for
    that c, and for the measured mix of temperatures (E and D pooled over all passes, which is how their times
    add up) the modelled speed-up E / (1 + c*D) (``decision.modelled_speedup``, as the sidecar computes it),
    whether it pays and the best k.
    """
    if not k:
        return None
    by_level: dict[int, list[CellSummary]] = defaultdict(list)
    for row in rows:
        if _fittable(row):
            by_level[row.concurrency].append(row)
    if not by_level:
        return None
    levels: list[LevelFit] = []
    for concurrency in sorted(by_level):
        cells = by_level[concurrency]
        pairs = [(tokens_per_pass(r.output_tokens, r.accepted_tokens), r.speedup.throughput.value,  # type: ignore[union-attr]
                  drafts_per_pass(r.output_tokens, r.accepted_tokens, r.draft_tokens)) for r in cells]
        c = fit_draft_cost(pairs, k)  # type: ignore[arg-type]
        output, accepted = sum(r.output_tokens for r in cells), sum(r.accepted_tokens for r in cells)
        drafted = sum(r.draft_tokens for r in cells)
        mix = tokens_per_pass(output, accepted)
        alpha = alpha_from_mean_acceptance_length(mix, k) if mix else None
        level = LevelFit(concurrency, len(cells), c, alpha, mix)
        if c is not None:
            predicted = modelled_speedup(accepted, drafted, output - accepted, max(c, 0.0))
            per_temperature = []
            for r, (e, s, d) in sorted(zip(cells, pairs), key=lambda item: item[0].temperature):
                a = alpha_from_mean_acceptance_length(e, k)  # type: ignore[arg-type]
                modelled = modelled_speedup(r.accepted_tokens, r.draft_tokens, r.output_tokens - r.accepted_tokens,
                                            max(c, 0.0))
                own = fit_draft_cost([(e, s, d)], k)  # type: ignore[list-item]
                per_temperature.append(CellFit(r.temperature, e, a, modelled, s, modelled > 1.0, own))  # type: ignore[arg-type]
            level = replace(
                level,
                break_even_alpha=break_even_alpha(c, k),
                break_even_acceptance_rate=break_even_acceptance_rate(c),
                predicted_speedup=predicted,
                pays=None if predicted is None else predicted > 1.0,
                suggested_num_speculative_tokens=None if alpha is None else best_num_speculative_tokens(
                    alpha, max(c, 0.0), k),
                per_temperature=tuple(per_temperature),
            )
        levels.append(level)
    stops = next((lv.concurrency for lv in levels if lv.pays is False), None)
    per_temperature_stops: dict[str, int | None] = {}
    for lv in levels:
        for entry in lv.per_temperature:
            key = f"{entry.temperature:g}"
            per_temperature_stops.setdefault(key, None)
            if not entry.pays and per_temperature_stops[key] is None:
                per_temperature_stops[key] = lv.concurrency
    hurts_from: dict[str, int | None] = {}
    for row in sorted(rows, key=lambda r: r.concurrency):
        if row.server == SPEC and row.speedup is not None:
            key = f"{row.temperature:g}"
            hurts_from.setdefault(key, None)
            if row.speedup.verdict == HURTS and hurts_from[key] is None:
                hurts_from[key] = row.concurrency
    return BreakEvenFit(
        model=LEVIATHAN,
        k=k,
        levels=tuple(levels),
        stops_paying_at_concurrency=stops,
        stops_paying_at_concurrency_by_temperature=per_temperature_stops,
        measured_hurts_from_concurrency_by_temperature=hurts_from,
        schedule=schedule([(lv.concurrency, lv.suggested_num_speculative_tokens) for lv in levels]),
    )


def schedule(levels: Sequence[tuple[int, int | None]]) -> Schedule | None:
    """The best k per load level, ``(concurrency, k)`` pairs in rising concurrency (k None: not fitted), as
    vLLM's dynamic speculation schedule, built by ``decision.speculation_schedule`` (as the sidecar's live one).
    """
    entries = speculation_schedule(levels)
    return Schedule(VLLM_CONFIG_KEY, entries) if entries is not None else None


# --- calibration.json: the fit with its uncertainty ------------------------------------------------------

def paired_point(
    spec: Sequence[RequestRecord], baseline: Sequence[RequestRecord]
) -> tuple[float, float, float] | None:
    """(E, S, D) of one paired cell from its requests, as ``fit_model`` reads them from the cells' summaries:
    E = output tokens per target pass of the speculative requests, S = the throughput speed-up (speculative
    tokens per request-second / baseline's, as the cell's verdict), D = draft tokens per pass."""
    output = sum(r.output_tokens or 0 for r in spec)
    accepted = sum(r.accepted_tokens or 0 for r in spec)
    e = tokens_per_pass(output, accepted)
    d = drafts_per_pass(output, accepted, sum(r.draft_tokens or 0 for r in spec))
    spec_rate, base_rate = tokens_per_request_second(spec), tokens_per_request_second(baseline)
    if e is None or d is None or not spec_rate or not base_rate:
        return None
    return e, spec_rate / base_rate, d


def draft_cost_interval(
    pairs: Sequence[tuple[Cell, Cell]], k: int, resamples: int, seed: int, confidence: float = CONFIDENCE
) -> tuple[float, float] | None:
    """The percentile bootstrap interval of c at one level, as for the speed-ups: each resample draws every
    cell's requests again (each server's on its own, with replacement) and refits c over the level's cells.
    A resample in which some cell yields no (E, S) is dropped; ``None`` when over half are."""
    rng = random.Random(seed)
    oks = [(spec.ok, baseline.ok) for spec, baseline in pairs]
    costs: list[float] = []
    for _ in range(resamples):
        points = []
        for spec, baseline in oks:
            point = paired_point([rng.choice(spec) for _ in spec], [rng.choice(baseline) for _ in baseline])
            if point is None:
                break
            points.append(point)
        else:
            c = fit_draft_cost(points, k)
            if c is not None:
                costs.append(c)
    if not pairs or len(costs) < resamples // 2:
        return None
    tail = (1.0 - confidence) / 2
    return sample_quantile(tail, costs), sample_quantile(1.0 - tail, costs)  # type: ignore[return-value]


def _held(cost: float, interval: tuple[float, float]) -> tuple[float, float, float, float]:
    """(c, low, high, break-even) as written: c held at 0 from below, the interval widened to contain it."""
    held = max(0.0, cost)
    return held, max(0.0, min(interval[0], cost)), max(0.0, interval[1], cost), break_even_of(held)


def calibrate(
    fit: BreakEvenFit,
    cells: Mapping[tuple[str, float, int], Cell],
    *,
    model: str,
    method: str,
    vllm_version: str | None,
    measured_at: str,
    resamples: int,
    seed: int,
) -> tuple[ModelCalibration | None, list[str]]:
    """The fit as one model's calibration, and why any level was left out.

    A cost below 0 (the speculative server measured faster than E alone explains) is written as 0: a draft
    token cannot cost less than nothing. The interval is widened to contain the fitted cost when the
    percentile bootstrap of a small cell leaves it outside, and held at 0 from below like the cost. Each
    level also carries each temperature's own cost (its cell alone, with its own interval) where one could be
    fitted: the sidecar judges a temperature bucket by those.
    """
    levels: list[Level] = []
    skipped: list[str] = []
    for index, lv in enumerate(fit.levels):
        if lv.draft_cost is None or lv.suggested_num_speculative_tokens is None:
            skipped.append(f"concurrency {lv.concurrency}: no cost could be fitted")
            continue
        pairs = [(cells[(SPEC, e.temperature, lv.concurrency)], cells[(BASELINE, e.temperature, lv.concurrency)])
                 for e in lv.per_temperature]
        interval = draft_cost_interval(pairs, fit.k, resamples, seed + 104729 * index)
        if interval is None:
            skipped.append(f"concurrency {lv.concurrency}: too few requests with a TPOT for an interval")
            continue
        by_temperature = []
        for j, (entry, pair) in enumerate(zip(lv.per_temperature, pairs, strict=True)):
            own = draft_cost_interval([pair], fit.k, resamples, seed + 104729 * index + 7919 * (j + 1))
            if entry.draft_cost is not None and own is not None:
                by_temperature.append(TemperatureCost(entry.temperature, *_held(entry.draft_cost, own)))
        cost, low, high, break_even = _held(lv.draft_cost, interval)
        levels.append(Level(float(lv.concurrency), cost, low, high, break_even,
                            lv.suggested_num_speculative_tokens, tuple(by_temperature)))
    if not levels:
        return None, skipped
    return ModelCalibration(model, method, fit.k, tuple(levels), vllm_version, measured_at), skipped


# --- results.json ----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ResultThresholds:
    """What the verdicts in ``results.json`` were judged by."""

    break_even: float
    near_break_even_upper: float
    neutral_band: float
    confidence: float
    bootstrap_resamples: int


@dataclass(frozen=True, slots=True)
class MeasureResults:
    """``results.json``."""

    tool: str
    url: str
    baseline_url: str | None
    model: str
    prompts: str
    max_tokens: int
    ignore_eos: bool
    requests_per_cell: int
    warmup_per_cell: int
    rounds: int
    settle_seconds: float
    temperatures: list[float]
    concurrency: list[int]
    thresholds: ResultThresholds
    num_spec_tokens: int | None
    cells: tuple[CellSummary, ...]
    break_even_fit: BreakEvenFit | None

    def to_json(self) -> dict:
        return asdict(self)
