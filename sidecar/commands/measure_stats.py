"""``measure``'s arithmetic: requests -> cells -> speed-ups with uncertainty -> the break-even fit.

Pure functions over plain records, so the figures in ``results.json`` can be recomputed from the
per-request JSONL. Acceptance is token-weighted (sum of accepted / sum of drafted, never a mean of
ratios). A speed-up is baseline / speculative for TPOT and speculative / baseline for throughput, so above
1 always means speculation helps; its 95% interval comes from a seeded bootstrap over requests. The
break-even model and thresholds come from :mod:`sidecar.decision`.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from sidecar.buckets import TemperatureBuckets
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
    sample_quantile,
    speculative_speedup,
)

SPEC, BASELINE = "spec", "baseline"
HELPS, NEUTRAL, HURTS = "helps", "neutral", "hurts"
VLLM_CONFIG_KEY = "num_speculative_tokens_per_batch_size"  # vLLM 0.32 SpeculativeConfig field


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


@dataclass
class Interval:
    value: float | None
    ci_low: float | None
    ci_high: float | None

    def to_json(self) -> dict:
        return {"value": self.value, "ci_low": self.ci_low, "ci_high": self.ci_high}


def bootstrap_ratio(
    numerator: Sequence[RequestRecord],
    denominator: Sequence[RequestRecord],
    statistic: Callable[[Sequence[RequestRecord]], float | None],
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """statistic(numerator) / statistic(denominator) with a percentile bootstrap interval.

    Each side is resampled with replacement on its own (the two servers ran separate requests).
    """
    point_num, point_den = statistic(numerator), statistic(denominator)
    if not point_num or not point_den:
        return Interval(None, None, None)
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
    """helps: the whole interval above 1 and the point at least ``band`` above; hurts: the mirror; else neutral."""
    if interval.value is None or interval.ci_low is None or interval.ci_high is None:
        return NEUTRAL
    if interval.ci_low > 1.0 and interval.value >= 1.0 + band:
        return HELPS
    if interval.ci_high < 1.0 and interval.value <= 1.0 - band:
        return HURTS
    return NEUTRAL


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


def summarise(
    cell: Cell,
    buckets: TemperatureBuckets,
    break_even: float = DEFAULT_BREAK_EVEN,
    near_upper: float = DEFAULT_NEAR_UPPER,
) -> dict:
    """A cell's row of ``results.json`` (without the speed-up, which needs the other server's cell)."""
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
    row: dict = {
        "server": cell.server,
        "temperature": cell.temperature,
        "temperature_bucket": buckets.bucket(cell.temperature),
        "concurrency": cell.concurrency,
        "requests": len(ok),
        "errors": len(cell.records) - len(ok),
        "output_tokens": tokens,
        "wall_seconds": cell.wall_seconds,
        "output_tokens_per_second": tokens / cell.wall_seconds if cell.wall_seconds > 0 else None,
        "accepted_tokens": accepted,
        "draft_tokens": drafted,
        "spec_steps": steps,
        "acceptance_source": "+".join(sources) if sources else None,
        "acceptance_rate": acceptance,
        "mean_acceptance_length": 1.0 + accepted / steps if steps else None,
        "acceptance_verdict": decide(acceptance, break_even, near_upper).value if cell.server == SPEC else None,
    }
    row.update({f"acceptance_{k}": v for k, v in _quantiles(rates, (0.1, 0.5, 0.9)).items()})
    for name, attr in (("ttft", "ttft_s"), ("tpot", "tpot_s"), ("e2e", "e2e_s")):
        values = [getattr(r, attr) for r in ok if getattr(r, attr) is not None]
        row.update({f"{name}_{k}_s": v for k, v in _quantiles(values, (0.5, 0.95, 0.99)).items()})
    k_values = {r.num_spec_tokens for r in vllm if r.num_spec_tokens}
    row["num_spec_tokens"] = k_values.pop() if len(k_values) == 1 else None
    row["speedup"] = None
    return row


def compare(spec: Cell, baseline: Cell, band: float, resamples: int = 1000, seed: int = 0) -> dict:
    """Speed-ups of a speculative cell over its baseline cell, with 95% bootstrap intervals and a verdict."""
    spec_ok, base_ok = spec.ok, baseline.ok
    if not spec_ok or not base_ok:
        return {"tpot": Interval(None, None, None).to_json(), "throughput": Interval(None, None, None).to_json(),
                "verdict": NEUTRAL, "basis": "throughput"}
    tpot = bootstrap_ratio(spec_ok, base_ok, inverse(median_tpot), resamples, seed=seed)
    throughput = bootstrap_ratio(spec_ok, base_ok, tokens_per_request_second, resamples, seed=seed + 1)
    return {
        "tpot": tpot.to_json(),
        "throughput": throughput.to_json(),
        "verdict": speedup_verdict(throughput, band),
        "basis": "throughput",
    }


def tokens_per_pass(output_tokens: int, accepted_tokens: int) -> float | None:
    """Output tokens per target forward pass: every pass yields one token plus the drafts it accepted, so
    passes = output - accepted. Counts passes where the drafter proposed nothing (n-gram) too."""
    passes = output_tokens - accepted_tokens
    return output_tokens / passes if passes > 0 and output_tokens > 0 else None


def fit_model(rows: Sequence[dict], k: int | None) -> dict | None:
    """Fit the draft cost c and alpha per concurrency level (Leviathan et al.) from the paired cells.

    Per spec cell: E = output tokens per target pass (measured), alpha the value with E(alpha, k) = E (an
    effective alpha over every pass), S = the cell's TPOT speed-up (decode time per token is what the model
    describes). Per level: c by least squares over the level's cells (on time per token), the break-even
    alpha and acceptance rate for that c, and for the measured mix of temperatures (E pooled as all tokens /
    all passes, which is how their times add up) the modelled speed-up, whether it pays and the best k.
    """
    if not k:
        return None
    by_level: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        if row["server"] == SPEC and row.get("speedup") and row["speedup"]["tpot"]["value"]:
            if tokens_per_pass(row["output_tokens"], row["accepted_tokens"]):
                by_level[row["concurrency"]].append(row)
    if not by_level:
        return None
    levels = []
    for concurrency in sorted(by_level):
        cells = by_level[concurrency]
        pairs = [(tokens_per_pass(r["output_tokens"], r["accepted_tokens"]), r["speedup"]["tpot"]["value"])
                 for r in cells]
        c = fit_draft_cost(pairs, k)  # type: ignore[arg-type]
        mix = tokens_per_pass(sum(r["output_tokens"] for r in cells), sum(r["accepted_tokens"] for r in cells))
        alpha = alpha_from_mean_acceptance_length(mix, k) if mix else None
        level: dict = {"concurrency": concurrency, "cells": len(cells), "draft_cost": c, "alpha": alpha,
                       "tokens_per_pass": mix, "break_even_alpha": None, "break_even_acceptance_rate": None,
                       "predicted_speedup": None, "pays": None, "suggested_num_speculative_tokens": None,
                       "per_temperature": []}
        if c is not None:
            level["break_even_alpha"] = break_even_alpha(c, k)
            level["break_even_acceptance_rate"] = break_even_acceptance_rate(c)
            if alpha is not None:
                level["predicted_speedup"] = speculative_speedup(alpha, k, c)
                level["pays"] = level["predicted_speedup"] > 1.0
                level["suggested_num_speculative_tokens"] = best_num_speculative_tokens(alpha, max(c, 0.0), k)
            for r, (e, s) in sorted(zip(cells, pairs), key=lambda item: item[0]["temperature"]):
                a = alpha_from_mean_acceptance_length(e, k)  # type: ignore[arg-type]
                level["per_temperature"].append({
                    "temperature": r["temperature"], "tokens_per_pass": e, "alpha": a,
                    "model_speedup": speculative_speedup(a, k, c), "measured_tpot_speedup": s,
                    "pays": speculative_speedup(a, k, c) > 1.0,
                })
        levels.append(level)
    stops = next((lv["concurrency"] for lv in levels if lv["pays"] is False), None)
    per_temperature_stops: dict[str, int | None] = {}
    for lv in levels:
        for entry in lv["per_temperature"]:
            key = f"{entry['temperature']:g}"
            per_temperature_stops.setdefault(key, None)
            if not entry["pays"] and per_temperature_stops[key] is None:
                per_temperature_stops[key] = lv["concurrency"]
    hurts_from: dict[str, int | None] = {}
    for row in sorted(rows, key=lambda r: r["concurrency"]):
        if row["server"] == SPEC and row.get("speedup"):
            key = f"{row['temperature']:g}"
            hurts_from.setdefault(key, None)
            if row["speedup"]["verdict"] == HURTS and hurts_from[key] is None:
                hurts_from[key] = row["concurrency"]
    return {
        "model": "Leviathan et al. 2023: tokens per step E = (1 - alpha^(k+1)) / (1 - alpha), speed-up = E / (k*c + 1)",
        "k": k,
        "levels": levels,
        "stops_paying_at_concurrency": stops,
        "stops_paying_at_concurrency_by_temperature": per_temperature_stops,
        "measured_hurts_from_concurrency_by_temperature": hurts_from,
        "schedule": schedule(levels),
    }


def schedule(levels: Sequence[dict]) -> dict | None:
    """The fitted best k per load level as vLLM's dynamic speculation schedule.

    Entries are ``[first batch size, last batch size, k]``, inclusive, the first starting at 1; each
    measured concurrency starts a range that runs up to the next one; vLLM carries the last entry on to
    ``max_num_seqs``. Neighbouring ranges with the same k are merged.
    """
    known = [lv for lv in levels if lv["suggested_num_speculative_tokens"] is not None]
    if not known:
        return None
    entries: list[list[int]] = []
    for i, level in enumerate(known):
        start = 1 if i == 0 else level["concurrency"]
        end = known[i + 1]["concurrency"] - 1 if i + 1 < len(known) else max(level["concurrency"], start)
        k = level["suggested_num_speculative_tokens"]
        if entries and entries[-1][2] == k:
            entries[-1][1] = end
        else:
            entries.append([start, end, k])
    return {"key": VLLM_CONFIG_KEY, "value": entries,
            "note": "batch sizes approximated by client concurrency; vLLM carries the last entry forward"}
