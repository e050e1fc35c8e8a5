"""Per-request metrics from the tap: counters and histograms only, so they add up across pods.

Labels come from bounded sets: ``model`` from the allowlist or vLLM's ``/v1/models`` (anything else is
``other``), ``temperature_bucket`` from ``buckets.py``, ``source`` ``vllm``/``stream_steps``,
``status_class`` ``2xx``..``5xx``, ``stream`` ``true``/``false``, ``reason`` from a fixed list. No request
ids, prompts, users or headers ever reach a label or a log line.

The per-bucket verdict needs windows: at every poll tick the monitor calls ``checkpoint()``, which keeps a
bounded history of the cumulative per-bucket totals, and ``bucket_windows()`` differences them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram

from sidecar.buckets import TemperatureBuckets
from sidecar.upstream.derive import base_point, trim_history
from sidecar.tap.observe import Outcome, RequestInfo

OTHER_MODEL = "other"
UNKNOWN_MODEL = "unknown"
UNATTRIBUTED_REASONS = (
    "body_too_large", "unparsable_request", "n_not_1", "no_spec_metrics", "no_usage", "no_content",
    "response_too_large", "unparsable_response", "upstream_unreachable", "upstream_reset", "client_disconnected",
    "error_status", "observer_error",
)  # fmt: skip

# 0 has its own bucket: a request that accepted nothing must read back as 0, not as an interpolated 2.5%.
ACCEPTANCE_BUCKETS = tuple(round(i * 0.05, 2) for i in range(0, 21))
LENGTH_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0, 6.0, 7.0, 8.0, 9.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


@dataclass(frozen=True, slots=True)
class BucketTotals:
    accepted: float
    drafted: float
    steps: float


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Cumulative per-(model, bucket) totals at one poll tick."""

    t: float
    totals: dict[tuple[str, str], BucketTotals]


class ModelNames:
    """The bounded set of model labels: a fixed allowlist, or what vLLM's /v1/models last said."""

    def __init__(self, allowlist: Iterable[str] = ()) -> None:
        self._fixed = frozenset(allowlist)
        self._served: frozenset[str] = frozenset()

    def update_served(self, names: Iterable[str]) -> None:
        if not self._fixed:
            self._served = frozenset(list(names)[:64])

    def label(self, model: str | None) -> str:
        if model is None:
            return UNKNOWN_MODEL
        allowed = self._fixed or self._served
        return model if model in allowed else OTHER_MODEL


class RequestMetrics:
    def __init__(
        self, registry: CollectorRegistry, buckets: TemperatureBuckets, models: ModelNames, history: float
    ) -> None:
        self.buckets = buckets
        self.models = models
        self._history_seconds = history
        labels = ["model", "temperature_bucket"]
        self.requests = Counter(
            "specdec_requests", "Requests seen by the tap, by outcome status class.",
            [*labels, "status_class"], registry=registry,
        )  # fmt: skip
        self.accepted = Counter(
            "specdec_request_accepted_tokens",
            "Draft tokens accepted, summed over requests (source vllm: vLLM's per-request metrics; "
            "stream_steps: completion tokens minus streamed steps).",
            [*labels, "source"], registry=registry,
        )  # fmt: skip
        self.drafted = Counter(
            "specdec_request_draft_tokens",
            "Draft tokens proposed, summed over requests (only source vllm knows them).",
            [*labels, "source"], registry=registry,
        )  # fmt: skip
        self.steps = Counter(
            "specdec_request_spec_steps",
            "Target verify steps (draft steps), summed over requests.",
            [*labels, "source"], registry=registry,
        )  # fmt: skip
        self.output_tokens = Counter(
            "specdec_request_output_tokens", "Completion tokens returned, summed over requests.",
            labels, registry=registry,
        )  # fmt: skip
        self.acceptance = Histogram(
            "specdec_request_acceptance_rate",
            "Per-request draft acceptance rate (accepted / drafted), from vLLM's per-request metrics.",
            labels, buckets=ACCEPTANCE_BUCKETS, registry=registry,
        )  # fmt: skip
        self.length = Histogram(
            "specdec_request_mean_acceptance_length",
            "Per-request mean acceptance length (1 + accepted per verify step).",
            labels, buckets=LENGTH_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "specdec_request_ttft_seconds",
            "Time to first token as the client sees it: first content chunk of a stream; for a non-streamed "
            "request (stream=false) the whole body.",
            [*labels, "stream"], buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tpot = Histogram(
            "specdec_request_tpot_seconds",
            "Time per output token after the first: for streams (last - first content chunk) / "
            "(completion tokens - 1); for stream=false, end-to-end time / completion tokens.",
            [*labels, "stream"], buckets=TPOT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "specdec_request_e2e_seconds", "End-to-end request latency through the proxy.",
            [*labels, "stream"], buckets=E2E_BUCKETS, registry=registry,
        )  # fmt: skip
        self.unattributed = Counter(
            "specdec_requests_unattributed",
            "Observed-endpoint requests whose acceptance could not be attributed, by reason.",
            ["reason"], registry=registry,
        )  # fmt: skip
        for reason in UNATTRIBUTED_REASONS:
            self.unattributed.labels(reason)
        self._totals: dict[tuple[str, str], list[float]] = {}
        self._checkpoints: deque[Checkpoint] = deque()

    def request_done(self, info: RequestInfo | None, outcome: Outcome, started: float, ended: float) -> None:
        if info is None:
            return
        model = self.models.label(info.model)
        bucket = self.buckets.bucket(info.temperature, info.temperature_present) if info.parse_error is None \
            else "invalid"
        self.requests.labels(model, bucket, status_class(outcome.status)).inc()
        reason = info.parse_error or outcome.unattributed
        if reason is None and outcome.status >= 400:
            reason = "error_status"
        if reason is None and info.n != 1:
            reason = "n_not_1"
        if outcome.status < 400 and outcome.finished:
            self._latency(model, bucket, info.stream, outcome, started, ended)
        if reason is not None or outcome.spec is None:
            self.unattributed.labels(reason or "no_spec_metrics").inc()
            return
        spec = outcome.spec
        self.accepted.labels(model, bucket, spec.source).inc(spec.accepted)
        self.steps.labels(model, bucket, spec.source).inc(spec.steps)
        if spec.drafted is not None:
            self.drafted.labels(model, bucket, spec.source).inc(spec.drafted)
        if spec.source == "vllm":
            totals = self._totals.setdefault((model, bucket), [0.0, 0.0, 0.0])
            totals[0] += spec.accepted
            totals[1] += spec.drafted or 0
            totals[2] += spec.steps
            if (rate := spec.acceptance_rate) is not None:
                self.acceptance.labels(model, bucket).observe(rate)
        if (length := spec.mean_acceptance_length) is not None:
            self.length.labels(model, bucket).observe(length)

    def _latency(self, model: str, bucket: str, stream: bool, outcome: Outcome, started: float, ended: float) -> None:
        streamed = "true" if stream else "false"
        e2e = max(0.0, ended - started)
        self.e2e.labels(model, bucket, streamed).observe(e2e)
        tokens = outcome.completion_tokens
        if tokens is not None:
            self.output_tokens.labels(model, bucket).inc(tokens)
        if stream:
            if outcome.first_token_at is None:
                return
            self.ttft.labels(model, bucket, streamed).observe(max(0.0, outcome.first_token_at - started))
            if tokens and tokens > 1 and outcome.last_token_at is not None:
                tpot = (outcome.last_token_at - outcome.first_token_at) / (tokens - 1)
                self.tpot.labels(model, bucket, streamed).observe(max(0.0, tpot))
        elif tokens:
            self.ttft.labels(model, bucket, streamed).observe(e2e)
            self.tpot.labels(model, bucket, streamed).observe(e2e / tokens)

    # --- windows for the per-bucket verdict --------------------------------------------------------------

    def checkpoint(self, t: float) -> None:
        snapshot = {key: BucketTotals(*values) for key, values in self._totals.items()}
        self._checkpoints.append(Checkpoint(t, snapshot))
        trim_history(self._checkpoints, t, self._history_seconds)

    def bucket_deltas(self, window: float, tolerance: float) -> dict[tuple[str, str], BucketTotals]:
        """Per (model, bucket) totals accumulated over the window (source vllm only)."""
        base = base_point(self._checkpoints, window, tolerance)
        if base is None:
            return {}
        zero = BucketTotals(0.0, 0.0, 0.0)
        return {
            key: BucketTotals(
                now.accepted - base.totals.get(key, zero).accepted,
                now.drafted - base.totals.get(key, zero).drafted,
                now.steps - base.totals.get(key, zero).steps,
            )
            for key, now in self._checkpoints[-1].totals.items()
        }
