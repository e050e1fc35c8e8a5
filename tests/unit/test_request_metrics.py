"""Per-request metrics (sidecar/tap/metrics.py): which bucket, which histogram, which source, bounded labels."""

from __future__ import annotations

import json
import math
import random

from prometheus_client import CollectorRegistry

from sidecar.buckets import TemperatureBuckets
from sidecar.tap.metrics import OTHER_MODEL, UNKNOWN_MODEL, UNREAD_BUCKET, ModelNames, RequestMetrics
from sidecar.tap.observe import Outcome, RequestInfo, SpecStats, read_request


def metrics() -> tuple[RequestMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return RequestMetrics(registry, TemperatureBuckets(), ModelNames(["tiny-target"])), registry


def done(m: RequestMetrics, info: RequestInfo, spec: SpecStats | None = None, stream: bool = False,
         status: int = 200, tokens: int = 12) -> None:
    outcome = Outcome(status=status, completion_tokens=tokens, spec=spec, finished=True)
    if stream:
        outcome.first_token_at, outcome.last_token_at = 0.05, 0.5
    m.request_done(info, outcome, 0.0, 0.6)


def label_values(registry: CollectorRegistry, family: str, label: str) -> set[str]:
    return {s.labels[label] for f in registry.collect() if f.name == family for s in f.samples if label in s.labels}


def test_unread_body_is_bucket_unread_not_invalid():
    m, registry = metrics()
    done(m, read_request("completions", None))  # larger than --max-observed-body
    done(m, read_request("completions", b"{not json"))
    done(m, read_request("completions", b"[1, 2]"))
    get = registry.get_sample_value
    labels = {"model": UNKNOWN_MODEL, "temperature_bucket": UNREAD_BUCKET, "status_class": "2xx"}
    assert get("specdec_requests_total", labels) == 3
    assert label_values(registry, "specdec_requests", "temperature_bucket") == {UNREAD_BUCKET}
    assert get("specdec_requests_unattributed_total", {"reason": "body_too_large"}) == 1
    assert get("specdec_requests_unattributed_total", {"reason": "unparsable_request"}) == 2
    # its stream mode is unknown too: kept out of the latency histograms
    assert not label_values(registry, "specdec_request_e2e_seconds", "stream")
    # a temperature that was read and is not a number is what `invalid` means
    done(m, read_request("completions", b'{"model": "tiny-target", "temperature": "hot"}'))
    assert get("specdec_requests_total", {"model": "tiny-target", "temperature_bucket": "invalid",
                                          "status_class": "2xx"}) == 1


def test_mean_acceptance_length_keeps_sources_apart():
    m, registry = metrics()
    info = read_request("completions", b'{"model": "tiny-target", "temperature": 0, "stream": true}')
    done(m, info, SpecStats(accepted=30, drafted=40, steps=10, source="vllm"), stream=True)
    done(m, info, SpecStats(accepted=5, drafted=None, steps=10, source="stream_steps"), stream=True)
    get = registry.get_sample_value
    assert get("specdec_request_mean_acceptance_length_count", {"model": "tiny-target", "source": "vllm"}) == 1
    assert get("specdec_request_mean_acceptance_length_sum", {"model": "tiny-target", "source": "vllm"}) == 4.0
    assert get("specdec_request_mean_acceptance_length_sum",
               {"model": "tiny-target", "source": "stream_steps"}) == 1.5
    # the acceptance-rate histogram takes only the exact source
    assert get("specdec_request_acceptance_rate_count", {"model": "tiny-target", "temperature_bucket": "0"}) == 1


def test_no_acceptance_is_estimated_where_vllm_does_not_draft():
    """A baseline replica: no spec-decode metrics, and the stream-step estimate (which a step whose text
    detokenises to nothing would turn into an 'accepted' token) is withheld; latency is recorded as anywhere."""
    arms = {"tiny-target": False}
    registry = CollectorRegistry()
    m = RequestMetrics(registry, TemperatureBuckets(), ModelNames(["tiny-target"]), lambda model: arms.get(model))
    info = read_request("completions", b'{"model": "tiny-target", "temperature": 0, "stream": true}')
    done(m, info, SpecStats(accepted=1, drafted=None, steps=11, source="stream_steps"), stream=True)
    get = registry.get_sample_value
    bucket = {"model": "tiny-target", "temperature_bucket": "0"}
    assert get("specdec_request_accepted_tokens_total", {**bucket, "source": "stream_steps"}) is None
    assert get("specdec_request_spec_steps_total", {**bucket, "source": "stream_steps"}) is None
    assert get("specdec_request_mean_acceptance_length_count", {"model": "tiny-target", "source": "stream_steps"}) is None
    assert get("specdec_requests_unattributed_total", {"reason": "no_spec_metrics"}) == 1
    assert get("specdec_request_tpot_seconds_count", {**bucket, "stream": "true"}) == 1
    assert get("specdec_request_ttft_seconds_count", {**bucket, "stream": "true"}) == 1
    assert get("specdec_request_e2e_seconds_count", {"model": "tiny-target", "stream": "true"}) == 1
    totals = m.totals()[("tiny-target", "0")]
    assert (totals.accepted_all, totals.steps_all, sum(totals.tpot)) == (0, 0, 1)
    # the same response where vLLM drafts (or before the arm is known) keeps the estimate
    arms["tiny-target"] = True
    done(m, info, SpecStats(accepted=1, drafted=None, steps=11, source="stream_steps"), stream=True)
    assert get("specdec_request_accepted_tokens_total", {**bucket, "source": "stream_steps"}) == 1
    del arms["tiny-target"]
    done(m, info, SpecStats(accepted=2, drafted=None, steps=10, source="stream_steps"), stream=True)
    assert get("specdec_request_accepted_tokens_total", {**bucket, "source": "stream_steps"}) == 3


def test_ttft_and_tpot_are_streamed_only_and_e2e_is_per_model_and_mode():
    m, registry = metrics()
    get = registry.get_sample_value
    hist = {"model": "tiny-target", "temperature_bucket": "0.3-0.5"}
    done(m, read_request("completions", b'{"model": "tiny-target", "temperature": 0.4}'))
    assert get("specdec_request_ttft_seconds_count", {**hist, "stream": "false"}) is None
    assert get("specdec_request_tpot_seconds_count", {**hist, "stream": "false"}) is None
    assert get("specdec_request_e2e_seconds_count", {"model": "tiny-target", "stream": "false"}) == 1
    done(m, read_request("completions", b'{"model": "tiny-target", "temperature": 0.4, "stream": true}'),
         stream=True)
    assert get("specdec_request_ttft_seconds_sum", {**hist, "stream": "true"}) == 0.05
    assert math.isclose(get("specdec_request_tpot_seconds_sum", {**hist, "stream": "true"}), 0.45 / 11)
    assert get("specdec_request_e2e_seconds_count", {"model": "tiny-target", "stream": "true"}) == 1
    assert label_values(registry, "specdec_request_ttft_seconds", "stream") == {"true"}


def test_label_values_stay_bounded_under_hostile_requests():
    m, registry = metrics()
    rng = random.Random(1)
    odd = [None, "hot", True, -1, math.nan, 1e308, 0, 0.3, 0.30000001, 7, [1], {"a": 1}]
    for i in range(2000):
        model = rng.choice([f"model-{i}", "tiny-target", None, 42, "x" * 5000])
        temperature = rng.choice(odd) if rng.random() < 0.5 else rng.uniform(-5, 5)
        body = {"model": model, "temperature": temperature, "stream": rng.random() < 0.5}
        raw = repr(body).encode() if rng.random() < 0.1 else json.dumps(body).encode()
        done(m, read_request("completions", raw), status=rng.choice([200, 400, 404, 500, 503, 600, 99]))
    assert label_values(registry, "specdec_requests", "model") <= {"tiny-target", OTHER_MODEL, UNKNOWN_MODEL}
    buckets = set(TemperatureBuckets().labels) | {UNREAD_BUCKET}
    assert label_values(registry, "specdec_requests", "temperature_bucket") <= buckets
    assert label_values(registry, "specdec_requests", "status_class") <= {"1xx", "2xx", "3xx", "4xx", "5xx", "other"}
    # 2000 requests with 2000 model names and random temperatures: at most 3 models x 9 buckets x 6 classes
    requests = sum(1 for f in registry.collect() if f.name == "specdec_requests" for s in f.samples
                   if s.name.endswith("_total"))
    assert requests <= 3 * 9 * 6
