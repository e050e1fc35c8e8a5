"""Per-request metrics from the tap: counters and histograms only, so they add up across pods.

Labels come from bounded sets: ``model`` from the allowlist or vLLM's ``/v1/models`` (anything else is
``other``, no model field ``unknown``), ``temperature_bucket`` from ``buckets.py`` plus ``unread`` (the
request body was not read: too large or not JSON), ``source`` ``vllm``/``stream_steps``, ``status_class``
``1xx``..``5xx``/``other``, ``stream`` ``true``/``false``, ``reason`` from a fixed list. No request ids,
prompts, users or headers ever reach a label or a log line.

Every series is paid for by the fleet's Prometheus, so the families are cut to what the rules, ``top`` and
the dashboards read (the budget per family is in ``docs/scaling.md`` and ``tests/loopback/test_series_budget.py``):

* per temperature bucket: the acceptance histogram (edges at the 0.5 and 0.65 thresholds), and TTFT/TPOT
  for streamed requests only (a non-streamed request has no first token of its own: its latency is the
  end-to-end histogram's ``stream="false"``);
* per model only: end-to-end latency by ``stream``, and the mean-acceptance-length histogram by ``source``
  (never mixed: ``vllm`` is exact, ``stream_steps`` is the stream-derived estimate).

Example output::

    specdec_requests_total{model="tiny-target",status_class="2xx",temperature_bucket="0"} 12.0
    specdec_request_acceptance_rate_bucket{le="0.65",model="tiny-target",temperature_bucket="0"} 9.0
    specdec_request_ttft_seconds_bucket{le="0.1",model="tiny-target",stream="true",temperature_bucket="0"} 5.0
    specdec_request_e2e_seconds_count{model="tiny-target",stream="false"} 7.0
    specdec_request_mean_acceptance_length_sum{model="tiny-target",source="vllm"} 13.4

The per-bucket verdict and the status page need windows: ``totals()`` returns the cumulative per-(model,
bucket) totals (and histogram counts per edge) that ``tap/windows.py`` checkpoints on the tap's own clock.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from sidecar.buckets import UNREAD, TemperatureBuckets
from sidecar.model_names import OTHER_MODEL, UNKNOWN_MODEL, ModelNames  # noqa: F401 (re-exported)
from sidecar.tap.observe import Outcome, RequestInfo
from sidecar.tap.windows import BucketCounts, BucketKey

UNREAD_BUCKET = UNREAD
UNATTRIBUTED_REASONS = (
    "body_too_large", "unparsable_request", "n_not_1", "no_spec_metrics", "no_usage", "no_content",
    "response_too_large", "unparsable_response", "upstream_unreachable", "upstream_reset", "client_disconnected",
    "error_status", "stream_error", "observer_error",
)  # fmt: skip

# Bucket edges, chosen for the series budget (docs/scaling.md, with the quantile errors they give). Each
# edge costs one series per temperature bucket (8 with the default edges) for the first three.
#
# Per-request acceptance: edges at the break-even (0.5) and near-break-even (0.65) thresholds, so a
# quantile never lands on the wrong side of either; 0 alone, so a request that accepted nothing reads back
# as 0, not as an interpolated 5%; 1.0 because perfect requests are common (n-gram on repetitive text).
ACCEPTANCE_BUCKETS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.65, 0.7, 0.8, 0.9, 1.0)
# Streamed requests' time to first token and time per output token: roughly doubling steps over the range
# vLLM serves in (TTFT tens of milliseconds to seconds, a P99 beyond 5 s reads as 5 s). TPOT in steps of
# about 1.8x from 2.5 ms to 300 ms (a P99 beyond reads as 300 ms): the baseline comparison divides one
# arm's TPOT quantile by the other's, and with doubling steps both arms' medians often fell in one bucket,
# which reads as a ratio of 1 whatever the truth (errors per range in docs/scaling.md).
TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
TPOT_BUCKETS = (0.0025, 0.0045, 0.008, 0.015, 0.025, 0.045, 0.08, 0.15, 0.3)
# Per model only (labels model, stream / model, source): a few series whatever the temperature buckets.
E2E_BUCKETS = (0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 90.0)
LENGTH_BUCKETS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class _Running:
    """Mutable cumulative totals of one (model, bucket); ``RequestMetrics.totals()`` freezes them."""

    __slots__ = ("requests", "attributed", "accepted", "drafted", "steps", "accepted_all", "steps_all", "output",
                 "acceptance", "ttft", "tpot")

    def __init__(self) -> None:
        self.requests = 0.0
        self.attributed = 0.0
        self.accepted = 0.0
        self.drafted = 0.0
        self.steps = 0.0
        self.accepted_all = 0.0
        self.steps_all = 0.0
        self.output = 0.0
        self.acceptance = [0.0] * (len(ACCEPTANCE_BUCKETS) + 1)
        self.ttft = [0.0] * (len(TTFT_BUCKETS) + 1)
        self.tpot = [0.0] * (len(TPOT_BUCKETS) + 1)

    def frozen(self) -> BucketCounts:
        return BucketCounts(self.requests, self.attributed, self.accepted, self.drafted, self.steps, self.accepted_all,
                            self.steps_all, self.output, tuple(self.acceptance), tuple(self.ttft), tuple(self.tpot))


class RequestMetrics:
    def __init__(
        self,
        registry: CollectorRegistry,
        buckets: TemperatureBuckets,
        models: ModelNames,
        speculating: Callable[[str], bool | None] = lambda model: None,
    ) -> None:
        """*speculating*: whether vLLM drafts for a model label (None = not known yet). Where it does not (a
        baseline replica), no acceptance is estimated from the stream: every step emits one token there, and
        a step whose text detokenises to nothing would read as an accepted draft."""
        self.buckets = buckets
        self.models = models
        self._speculating = speculating
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
            "Per-request mean acceptance length (1 + accepted per verify step), per model, sources kept "
            "apart: vllm (exact, vLLM's per-request metrics) and stream_steps (completion tokens per "
            "streamed step).",
            ["model", "source"], buckets=LENGTH_BUCKETS, registry=registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "specdec_request_ttft_seconds",
            "Time to first token of a streamed request as the client sees it (first content chunk). Streamed "
            "requests only (stream=true): a non-streamed one has no first token of its own, see "
            "specdec_request_e2e_seconds{stream=\"false\"}.",
            [*labels, "stream"], buckets=TTFT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.tpot = Histogram(
            "specdec_request_tpot_seconds",
            "Time per output token after the first of a streamed request: (last - first content chunk) / "
            "(completion tokens - 1). Streamed requests only (stream=true).",
            [*labels, "stream"], buckets=TPOT_BUCKETS, registry=registry,
        )  # fmt: skip
        self.e2e = Histogram(
            "specdec_request_e2e_seconds",
            "End-to-end request latency through the proxy, per model and stream mode (for stream=false it is "
            "also the time to the first token).",
            ["model", "stream"], buckets=E2E_BUCKETS, registry=registry,
        )  # fmt: skip
        self.unattributed = Counter(
            "specdec_requests_unattributed",
            "Observed-endpoint requests whose acceptance could not be attributed, by reason.",
            ["reason"], registry=registry,
        )  # fmt: skip
        for reason in UNATTRIBUTED_REASONS:
            self.unattributed.labels(reason)
        self._totals: dict[BucketKey, _Running] = {}
        # Each metric's child per label values, looked up once: prometheus_client's labels() validates and
        # locks on every call. Bounded as the label sets are (models, buckets, fixed words).
        self._children: dict[tuple, Any] = {}

    def request_done(self, info: RequestInfo | None, outcome: Outcome, started: float, ended: float) -> None:
        if info is None:
            return
        model = self.models.label(info.model)
        read = info.parse_error is None
        bucket = self.buckets.bucket(info.temperature, info.temperature_present) if read else UNREAD_BUCKET
        self._child(self.requests, model, bucket, status_class(outcome.status)).inc()
        running = self._running(model, bucket)
        running.requests += 1
        reason = info.parse_error or outcome.unattributed
        if reason is None and outcome.status >= 400:
            reason = "error_status"
        if reason is None and info.n != 1:
            reason = "n_not_1"
        # An unread request's stream mode is unknown too: counted, but kept out of the latency histograms.
        if read and outcome.status < 400 and outcome.finished:
            self._latency(model, bucket, info.stream, outcome, started, ended, running)
        spec = outcome.spec
        if reason is None and spec is not None and spec.source == "stream_steps" and self._speculating(model) is False:
            spec = None  # no drafts on this replica: nothing to estimate (latency is recorded above all the same)
        if reason is not None or spec is None:
            self._child(self.unattributed, reason or "no_spec_metrics").inc()
            return
        self._child(self.accepted, model, bucket, spec.source).inc(spec.accepted)
        self._child(self.steps, model, bucket, spec.source).inc(spec.steps)
        if spec.drafted is not None:
            self._child(self.drafted, model, bucket, spec.source).inc(spec.drafted)
        running.accepted_all += spec.accepted
        running.steps_all += spec.steps
        if spec.source == "vllm":
            running.attributed += 1
            running.output += outcome.completion_tokens or 0
            running.accepted += spec.accepted
            running.drafted += spec.drafted or 0
            running.steps += spec.steps
            if (rate := spec.acceptance_rate) is not None:
                self._child(self.acceptance, model, bucket).observe(rate)
                running.acceptance[bisect_left(ACCEPTANCE_BUCKETS, rate)] += 1
        if (length := spec.mean_acceptance_length) is not None:
            self._child(self.length, model, spec.source).observe(length)

    def _latency(
        self, model: str, bucket: str, stream: bool, outcome: Outcome, started: float, ended: float, running: _Running
    ) -> None:
        self._child(self.e2e, model, "true" if stream else "false").observe(max(0.0, ended - started))
        tokens = outcome.completion_tokens
        if tokens is not None:
            self._child(self.output_tokens, model, bucket).inc(tokens)
        # TTFT and TPOT are stream-only: a non-streamed body arrives at once, so its "first token" is the
        # end-to-end time (already above) and e2e / tokens mixes prefill into a per-token figure.
        if not stream or outcome.first_token_at is None:
            return
        ttft = max(0.0, outcome.first_token_at - started)
        self._child(self.ttft, model, bucket, "true").observe(ttft)
        running.ttft[bisect_left(TTFT_BUCKETS, ttft)] += 1
        if tokens and tokens > 1 and outcome.last_token_at is not None:
            tpot = max(0.0, (outcome.last_token_at - outcome.first_token_at) / (tokens - 1))
            self._child(self.tpot, model, bucket, "true").observe(tpot)
            running.tpot[bisect_left(TPOT_BUCKETS, tpot)] += 1

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def _running(self, model: str, bucket: str) -> _Running:
        running = self._totals.get((model, bucket))
        if running is None:
            running = self._totals[(model, bucket)] = _Running()
        return running

    def totals(self) -> Mapping[BucketKey, BucketCounts]:
        """Cumulative totals per (model, bucket) since start, frozen: what ``tap/windows.py`` checkpoints."""
        return {key: running.frozen() for key, running in self._totals.items()}
