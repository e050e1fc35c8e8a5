"""The per-model and per-temperature-bucket view of a sidecar's samples, shared by ``top`` (terminal) and the
status page (HTML): acceptance, P10/P50/P90 of per-request acceptance, mean acceptance length, TTFT and TPOT
of streamed requests and verdicts, from the difference of two readings of the sidecar's counters and
histogram buckets. Pure functions over parsed samples; no I/O.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sidecar.decision import histogram_quantile
from sidecar.upstream.exposition import Sample

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
        "specdec_requests_total",
        "specdec_request_accepted_tokens_total",
        "specdec_request_draft_tokens_total",
        "specdec_request_spec_steps_total",
        "specdec_request_acceptance_rate_bucket",
        "specdec_request_ttft_seconds_bucket",
        "specdec_request_tpot_seconds_bucket",
    }
)


Key = tuple[str, str]  # (model, temperature bucket)


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
    verdict: str = "insufficient_data"


@dataclass
class ModelRow:
    model: str
    acceptance: float | None = None
    window: str = ""
    mean_length: float | None = None
    kv_usage: float | None = None
    running: float | None = None
    waiting: float | None = None
    verdict: str = "insufficient_data"


@dataclass
class View:
    up: bool
    models: list[ModelRow] = field(default_factory=list)
    buckets: list[Row] = field(default_factory=list)
    span: float = 0.0


def _index(samples: list[Sample]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, s.labels): s.value for s in samples}


def _delta(now: dict, base: dict) -> dict:
    out = {}
    for key, value in now.items():
        before = base.get(key, 0.0)
        out[key] = value - before if value >= before else value  # a sidecar restart resets its counters
    return out


def build_view(now: list[Sample], base: list[Sample] | None, span: float) -> View:
    """Pure: the table contents from the latest scrape and an older one (``None`` = since start)."""
    current = _index(now)
    counters = _delta(current, _index(base)) if base is not None else current
    view = View(up=current.get(("specdec_upstream_up", ()), 0.0) == 1.0, span=span)

    models: dict[str, ModelRow] = {}
    smallest_window: dict[str, float] = {}
    for (name, labels), value in current.items():
        lab = dict(labels)
        model = lab.get("model")
        if model is None:
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
    for (name, labels), value in current.items():
        lab = dict(labels)
        if name == "specdec_mean_acceptance_length" and lab.get("window") == models.get(lab["model"], ModelRow("")).window:
            models[lab["model"]].mean_length = value
    view.models = [models[m] for m in sorted(models)]

    totals: dict[Key, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    hist: dict[tuple[Key, str], dict[float, float]] = defaultdict(lambda: defaultdict(float))
    verdicts: dict[Key, str] = {}
    for (name, labels), value in counters.items():
        lab = dict(labels)
        if "temperature_bucket" not in lab:
            continue
        key = (lab["model"], lab["temperature_bucket"])
        if name == "specdec_requests_total":
            totals[key]["requests"] += value
        elif name == "specdec_request_accepted_tokens_total":
            totals[key]["accepted_all"] += value
            if lab.get("source") == "vllm":
                totals[key]["accepted"] += value
        elif name == "specdec_request_draft_tokens_total":
            totals[key]["drafted"] += value
        elif name == "specdec_request_spec_steps_total":
            totals[key]["steps"] += value
        elif name.endswith("_bucket"):
            if lab.get("stream", "true") != "true":
                continue  # TTFT/TPOT of streamed requests only, as the recording rules: a body is not a token
            kind = name.removeprefix("specdec_request_").removesuffix("_bucket")
            hist[(key, kind)][float(lab["le"])] += value
    for (name, labels), value in current.items():
        if name == "specdec_bucket_verdict" and value == 1.0:
            lab = dict(labels)
            verdicts[(lab["model"], lab["temperature_bucket"])] = lab["verdict"]

    for key in sorted(set(totals) | set(verdicts), key=_bucket_order):
        t = totals.get(key, {})
        row = Row(model=key[0], bucket=key[1], requests=t.get("requests", 0.0), verdict=verdicts.get(key, "insufficient_data"))
        if t.get("drafted"):
            row.acceptance = t["accepted"] / t["drafted"]
        if t.get("steps"):
            row.mean_length = 1.0 + t["accepted_all"] / t["steps"]

        def q(kind: str, quantile: float) -> float | None:
            buckets = hist.get((key, kind))
            return histogram_quantile(quantile, list(buckets.items())) if buckets else None

        row.p10, row.p50, row.p90 = (q("acceptance_rate", x) for x in (0.1, 0.5, 0.9))
        row.ttft_p50, row.ttft_p99 = q("ttft_seconds", 0.5), q("ttft_seconds", 0.99)
        row.tpot_p50, row.tpot_p99 = q("tpot_seconds", 0.5), q("tpot_seconds", 0.99)
        view.buckets.append(row)
    return view


BUCKET_ORDER = ["0", "0-0.3", "0.3-0.5", "0.5-0.7", "0.7-1.0", "gt1.0", "default", "invalid"]


def _bucket_order(key: Key) -> tuple[str, int, str]:
    model, bucket = key
    return (model, BUCKET_ORDER.index(bucket) if bucket in BUCKET_ORDER else len(BUCKET_ORDER), bucket)


def _window_seconds(label: str) -> float:
    from sidecar.config import parse_duration

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
