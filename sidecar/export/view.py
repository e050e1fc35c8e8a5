"""The per-model and per-temperature-bucket view shared by the status page (HTML) and ``top`` (terminal).

Rows are built by the same functions from the same kind of input wherever they come from:

* the status page runs inside the sidecar and builds its view from the sources' snapshots and the
  assessment the collector renders (``view_from_snapshots``): no round trip through the registry;
* ``top`` reads a remote sidecar's page, so it must go by metric name: ``build_view`` turns the difference of
  two readings into the same ``BucketCounts`` the tap's windows produce, and reads the verdicts and
  thresholds the sidecar exported.

Either way a bucket row comes from ``bucket_row`` (acceptance through ``decision.window_acceptance``,
quantiles through ``decision.histogram_quantile``), and buckets are ordered by ``buckets.label_order``.
Pure functions; no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sidecar.buckets import label_order
from sidecar.config import format_duration, parse_duration
from sidecar.decision import DEFAULT_BREAK_EVEN, Judgement, Verdict, decide
from sidecar.tap.metrics import ACCEPTANCE_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS
from sidecar.tap.windows import BucketCounts, BucketKey, quantile
from sidecar.upstream.exposition import Sample

if TYPE_CHECKING:
    from sidecar.config import Settings
    from sidecar.export.assessment import Assessment, ScheduleAdvice
    from sidecar.tap.windows import TapHealth
    from sidecar.upstream.monitor import MonitorState

WANTED = frozenset(
    {
        "specdec_upstream_up",
        "specdec_acceptance_rate",
        "specdec_mean_acceptance_length",
        "specdec_kv_cache_usage_ratio",
        "specdec_requests_waiting",
        "specdec_requests_running",
        "specdec_verdict",
        "specdec_bucket_verdict",
        "specdec_modelled_speedup",
        "specdec_bucket_modelled_speedup",
        "specdec_break_even_acceptance_rate",
        "specdec_bucket_break_even_acceptance_rate",
        "specdec_calibration_info",
        "specdec_requests_total",
        "specdec_request_accepted_tokens_total",
        "specdec_request_draft_tokens_total",
        "specdec_request_spec_steps_total",
        "specdec_request_acceptance_rate_bucket",
        "specdec_request_ttft_seconds_bucket",
        "specdec_request_tpot_seconds_bucket",
    }
)
HISTOGRAM_EDGES = {
    "acceptance_rate": ACCEPTANCE_BUCKETS,
    "ttft_seconds": TTFT_BUCKETS,
    "tpot_seconds": TPOT_BUCKETS,
}


@dataclass
class Row:
    model: str
    bucket: str
    requests: float = 0.0
    acceptance: float | None = None
    p10: float | None = None
    p50: float | None = None
    p90: float | None = None
    mean_length: float | None = None
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    tpot_p50: float | None = None
    tpot_p99: float | None = None
    verdict: str = Verdict.INSUFFICIENT_DATA.value
    modelled_speedup: float | None = None
    break_even: float | None = None  # the bucket's own (calibrated temperatures); None: its model's applies


@dataclass
class ModelRow:
    model: str
    acceptance: float | None = None
    window: str = ""
    mean_length: float | None = None
    kv_usage: float | None = None
    running: float | None = None
    waiting: float | None = None
    verdict: str = Verdict.INSUFFICIENT_DATA.value
    source: str = "default"  # which thresholds the verdict used: measure (calibrated) or default
    break_even: float | None = None
    modelled_speedup: float | None = None


@dataclass
class View:
    up: bool
    models: list[ModelRow] = field(default_factory=list)
    buckets: list[Row] = field(default_factory=list)
    span: float = 0.0
    schedules: Mapping[str, ScheduleAdvice] = field(default_factory=dict)


def bucket_row(model: str, bucket: str, counts: BucketCounts, min_drafts: float, verdict: str,
               modelled_speedup: float | None = None, break_even: float | None = None) -> Row:
    """One bucket's row from its totals over the view's window."""

    def q(counts_of: tuple[float, ...], edges: tuple[float, ...], value: float) -> float | None:
        return quantile(value, edges, counts_of) if counts_of else None

    return Row(
        model=model,
        bucket=bucket,
        requests=counts.requests,
        acceptance=counts.acceptance_rate(min_drafts),
        p10=q(counts.acceptance, ACCEPTANCE_BUCKETS, 0.1),
        p50=q(counts.acceptance, ACCEPTANCE_BUCKETS, 0.5),
        p90=q(counts.acceptance, ACCEPTANCE_BUCKETS, 0.9),
        mean_length=counts.mean_acceptance_length,
        ttft_p50=q(counts.ttft, TTFT_BUCKETS, 0.5),
        ttft_p99=q(counts.ttft, TTFT_BUCKETS, 0.99),
        tpot_p50=q(counts.tpot, TPOT_BUCKETS, 0.5),
        tpot_p99=q(counts.tpot, TPOT_BUCKETS, 0.99),
        verdict=verdict,
        modelled_speedup=modelled_speedup,
        break_even=break_even,
    )


def _sorted_rows(rows: Mapping[BucketKey, Row]) -> list[Row]:
    return [rows[key] for key in sorted(rows, key=lambda k: (k[0], label_order(k[1])))]


def view_from_snapshots(
    state: MonitorState, tap: TapHealth | None, assessment: Assessment, settings: Settings
) -> View:
    """The status page's view: the verdict window of both sources, judged as the collector judges them."""
    window = settings.verdict_window
    view = View(up=state.up, span=tap.spans.get(window, 0.0) if tap is not None else 0.0,
                schedules=dict(assessment.schedules))
    health = state.health if state.up else None
    if health is not None:
        for model, group in sorted(health.models.items()):
            stats = group.windows.get(window)
            judgement = assessment.models.get(model)
            thresholds = assessment.thresholds.get(model)
            view.models.append(ModelRow(
                model=model,
                acceptance=judgement.acceptance if judgement else None,
                window=format_duration(window),
                mean_length=stats.mean_acceptance_length if stats else None,
                kv_usage=group.pressure.kv_usage,
                running=group.pressure.running,
                waiting=group.pressure.waiting,
                verdict=(judgement.verdict if judgement else Verdict.INSUFFICIENT_DATA).value,
                source=thresholds.source if thresholds else "default",
                break_even=thresholds.break_even if thresholds else None,
                modelled_speedup=judgement.modelled_speedup if judgement else None,
            ))
    counts = tap.windows.get(window, {}) if tap is not None else {}
    rows = {}
    for key, c in counts.items():
        judgement: Judgement | None = assessment.buckets.get(key)
        verdict = (judgement.verdict if judgement else Verdict.INSUFFICIENT_DATA).value
        own = assessment.bucket_thresholds.get(key)
        rows[key] = bucket_row(*key, c, settings.min_drafts, verdict, judgement.modelled_speedup if judgement else None,
                               own.break_even if own else None)
    view.buckets = _sorted_rows(rows)
    return view


# --- top: a remote page, read by metric name -----------------------------------------------------------------


def _index(samples: list[Sample]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, s.labels): s.value for s in samples}


def _delta(now: dict, base: dict) -> dict:
    out = {}
    for key, value in now.items():
        before = base.get(key, 0.0)
        out[key] = value - before if value >= before else value  # a sidecar restart resets its counters
    return out


def _at(cumulative: Mapping[float, float], le: float) -> float | None:
    """The cumulative count at *le*: the page's own, or, for a sidecar whose edges differ (another version),
    interpolated linearly between its neighbouring edges as ``histogram_quantile`` does; None above its last
    finite edge."""
    if le in cumulative:
        return cumulative[le]
    lower, upper = (0.0, 0.0), None
    for edge in sorted(cumulative):
        if edge < le:
            lower = (edge, cumulative[edge])
        elif edge != float("inf"):
            upper = (edge, cumulative[edge])
            break
    if upper is None:
        return None
    return lower[1] + (upper[1] - lower[1]) * (le - lower[0]) / (upper[0] - lower[0])


def _per_edge(cumulative: Mapping[float, float], edges: tuple[float, ...]) -> tuple[float, ...]:
    """Prometheus' cumulative ``le`` counts as per-edge counts aligned with *edges* (+Inf last)."""
    out, previous = [], 0.0
    for le in (*edges, float("inf")):
        value = _at(cumulative, le)
        value = previous if value is None else value
        out.append(max(0.0, value - previous))
        previous = max(previous, value)
    return tuple(out)


def counts_from_samples(counters: Mapping[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict[BucketKey, BucketCounts]:
    """The tap's per-bucket totals read back from its exported counters and histograms (stream="true" only
    for TTFT/TPOT, as the recording rules)."""
    sums: dict[BucketKey, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    hist: dict[tuple[BucketKey, str], dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for (name, labels), value in counters.items():
        lab = dict(labels)
        if "temperature_bucket" not in lab or "model" not in lab:
            continue
        key = (lab["model"], lab["temperature_bucket"])
        vllm = lab.get("source") == "vllm"
        if name == "specdec_requests_total":
            sums[key]["requests"] += value
        elif name == "specdec_request_accepted_tokens_total":
            sums[key]["accepted_all"] += value
            if vllm:
                sums[key]["accepted"] += value
        elif name == "specdec_request_draft_tokens_total" and vllm:
            sums[key]["drafted"] += value
        elif name == "specdec_request_spec_steps_total":
            sums[key]["steps_all"] += value
            if vllm:
                sums[key]["steps"] += value
        elif name.endswith("_bucket") and lab.get("stream", "true") == "true":
            kind = name.removeprefix("specdec_request_").removesuffix("_bucket")
            if kind in HISTOGRAM_EDGES:
                hist[(key, kind)][float(lab["le"])] += value
    out = {}
    for key in set(sums) | {k for k, _ in hist}:
        s = sums.get(key, {})
        per_kind = {kind: _per_edge(hist[(key, kind)], edges) if (key, kind) in hist else ()
                    for kind, edges in HISTOGRAM_EDGES.items()}
        out[key] = BucketCounts(
            s.get("requests", 0.0), 0.0, s.get("accepted", 0.0), s.get("drafted", 0.0), s.get("steps", 0.0),
            s.get("accepted_all", 0.0), s.get("steps_all", 0.0), 0.0,
            per_kind["acceptance_rate"], per_kind["ttft_seconds"], per_kind["tpot_seconds"],
        )  # fmt: skip
    return out


def build_view(now: list[Sample], base: list[Sample] | None, span: float, min_drafts: float = 1) -> View:
    """``top``'s view from the latest reading of a sidecar's page and an older one (``None`` = since start).

    The verdicts, thresholds and modelled speed-ups are the sidecar's own (its exported series); the bucket
    rows' numbers are the difference of the two readings, built by ``bucket_row``.
    """
    current = _index(now)
    counters = _delta(current, _index(base)) if base is not None else current
    view = View(up=current.get(("specdec_upstream_up", ()), 0.0) == 1.0, span=span)

    models: dict[str, ModelRow] = {}
    smallest_window: dict[str, float] = {}
    lengths: dict[tuple[str, str], float] = {}
    for (name, labels), value in current.items():
        lab = dict(labels)
        model = lab.get("model")
        if model is None or "temperature_bucket" in lab:
            continue
        if name == "specdec_mean_acceptance_length":
            lengths[(model, lab.get("window", ""))] = value
            continue
        row = models.setdefault(model, ModelRow(model))
        if name == "specdec_acceptance_rate":
            seconds = _window_seconds(lab["window"])
            if model not in smallest_window or seconds < smallest_window[model]:
                smallest_window[model] = seconds
                row.acceptance, row.window = value, lab["window"]
        elif name == "specdec_kv_cache_usage_ratio":
            row.kv_usage = value
        elif name == "specdec_requests_waiting":
            row.waiting = value
        elif name == "specdec_requests_running":
            row.running = value
        elif name == "specdec_verdict" and value == 1.0:
            row.verdict = lab["verdict"]
        elif name == "specdec_calibration_info":
            row.source = lab.get("source", "default")
        elif name == "specdec_break_even_acceptance_rate":
            row.break_even = value
        elif name == "specdec_modelled_speedup":
            row.modelled_speedup = value
    for row in models.values():
        row.mean_length = lengths.get((row.model, row.window))
    view.models = [models[m] for m in sorted(models)]

    verdicts: dict[BucketKey, str] = {}
    speedups: dict[BucketKey, float] = {}
    break_evens: dict[BucketKey, float] = {}
    for (name, labels), value in current.items():
        lab = dict(labels)
        if name == "specdec_bucket_verdict" and value == 1.0:
            verdicts[(lab["model"], lab["temperature_bucket"])] = lab["verdict"]
        elif name == "specdec_bucket_modelled_speedup":
            speedups[(lab["model"], lab["temperature_bucket"])] = value
        elif name == "specdec_bucket_break_even_acceptance_rate":
            break_evens[(lab["model"], lab["temperature_bucket"])] = value
    counts = counts_from_samples(counters)
    rows = {
        key: bucket_row(*key, counts.get(key, BucketCounts()), min_drafts,
                        verdicts.get(key, Verdict.INSUFFICIENT_DATA.value), speedups.get(key), break_evens.get(key))
        for key in set(counts) | set(verdicts)
    }
    view.buckets = _sorted_rows(rows)
    return view


def _window_seconds(label: str) -> float:
    try:
        return parse_duration(label)
    except ValueError:
        return float("inf")


def percent(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value * 100:.{digits}f}%"


def millis(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f} ms"


def number(value: float | None, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


def speedup(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def calibration_notes(view: View) -> list[str]:
    """One line per model or bucket whose calibrated verdict differs from what the fixed rule of thumb
    (``decision.DEFAULT_BREAK_EVEN`` / ``DEFAULT_NEAR_UPPER``) would say about the same acceptance, and for a
    calibrated model where none differs, one line saying so (with what it was judged by)."""
    calibrated = {m.model: m for m in view.models if m.source == "measure"}
    notes = []
    changed: set[str] = set()
    rows: list[ModelRow | Row] = [*calibrated.values(), *(r for r in view.buckets if r.model in calibrated)]
    for row in rows:
        if row.acceptance is None or row.modelled_speedup is None:
            continue
        plain = decide(row.acceptance)
        if plain.value == row.verdict:
            continue
        model = calibrated[row.model]
        where = row.model if isinstance(row, ModelRow) else f"{row.model} {row.bucket}"
        break_even = row.break_even if row.break_even is not None else model.break_even
        changed.add(row.model)
        notes.append(
            f"{where}: {row.verdict} by calibration (break-even {percent(break_even)} at its load, modelled "
            f"{speedup(row.modelled_speedup)}) where the fixed {percent(DEFAULT_BREAK_EVEN)} rule says "
            f"{plain.value} at {percent(row.acceptance)} acceptance"
        )
    for name, model in sorted(calibrated.items()):
        judged = [r for r in rows if r.model == name and r.acceptance is not None and r.modelled_speedup is not None]
        if name in changed or not judged:
            continue
        own = sorted(f"{r.bucket} {percent(r.break_even)}" for r in judged
                     if isinstance(r, Row) and r.break_even is not None)
        notes.append(
            f"{name}: calibrated (break-even {percent(model.break_even)} at its load"
            f"{'; by temperature ' + ', '.join(own) if own else ''}): every verdict agrees with the fixed "
            f"{percent(DEFAULT_BREAK_EVEN)} rule here"
        )
    return notes
