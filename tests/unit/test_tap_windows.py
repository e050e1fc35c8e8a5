"""The tap's windows: its own clock, differences of its own totals, quantiles as PromQL computes them."""

from prometheus_client import CollectorRegistry

import pytest

from sidecar.buckets import TemperatureBuckets
from sidecar.decision import histogram_quantile
from sidecar.model_names import ModelNames
from sidecar.tap.metrics import ACCEPTANCE_BUCKETS, TTFT_BUCKETS, RequestMetrics
from sidecar.tap.observe import Outcome, RequestInfo, SpecStats
from sidecar.tap.windows import BucketCounts, TapMonitor, quantile


def fed_metrics(registry=None):
    return RequestMetrics(registry or CollectorRegistry(), TemperatureBuckets(), ModelNames(["m"]))


def request(metrics, temperature, accepted, drafted, steps, ttft=0.05):
    info = RequestInfo("/v1/completions", model="m", temperature=temperature, temperature_present=True, stream=True)
    outcome = Outcome(status=200, finished=True, completion_tokens=accepted + steps, first_token_at=ttft,
                      last_token_at=ttft + 0.5, spec=SpecStats(accepted, drafted, steps, "vllm"))
    metrics.request_done(info, outcome, 0.0, 1.0)


def test_windows_move_on_the_taps_own_clock():
    metrics = fed_metrics()
    clock = [0.0]
    tap = TapMonitor(metrics.totals, windows=[10.0, 30.0], interval=5.0, clock=lambda: clock[0])
    tap.tick()
    for t in range(5, 45, 5):
        request(metrics, 0.0, accepted=30, drafted=40, steps=10)
        clock[0] = float(t)
        state = tap.tick()
    ten = state.windows[10.0][("m", "0")]
    assert (ten.requests, ten.accepted, ten.drafted, ten.steps) == (2, 60, 80, 20)
    assert state.spans == {10.0: 10.0, 30.0: 30.0}
    assert state.windows[30.0][("m", "0")].requests == 6
    assert state.ticks == 9


def test_a_window_holds_only_what_happened_in_it():
    metrics = fed_metrics()
    clock = [0.0]
    tap = TapMonitor(metrics.totals, windows=[10.0], interval=5.0, clock=lambda: clock[0])
    request(metrics, 1.0, accepted=0, drafted=40, steps=10)
    tap.tick()
    clock[0] = 20.0
    tap.tick()
    clock[0] = 30.0
    state = tap.tick()
    assert state.windows[10.0][("m", "0.7-1.0")] == BucketCounts(
        acceptance=(0.0,) * (len(ACCEPTANCE_BUCKETS) + 1), ttft=(0.0,) * (len(TTFT_BUCKETS) + 1),
        tpot=state.windows[10.0][("m", "0.7-1.0")].tpot,
    )


def test_quantile_of_per_edge_counts_is_promqls():
    edges = (0.1, 0.5, 1.0)
    counts = (2.0, 3.0, 5.0, 0.0)
    cumulative = [(0.1, 2.0), (0.5, 5.0), (1.0, 10.0), (float("inf"), 10.0)]
    for q in (0.1, 0.5, 0.9, 0.99):
        assert quantile(q, edges, counts) == pytest.approx(histogram_quantile(q, cumulative))
    assert quantile(0.5, edges, (0.0, 0.0, 0.0, 0.0)) is None


def test_totals_follow_the_exported_histograms():
    registry = CollectorRegistry()
    metrics = fed_metrics(registry)
    for accepted in (0, 10, 20, 40):
        request(metrics, 0.0, accepted=accepted, drafted=40, steps=10, ttft=0.15)
    totals = metrics.totals()[("m", "0")]
    assert sum(totals.acceptance) == 4
    labels = {"model": "m", "temperature_bucket": "0"}
    for i, le in enumerate(ACCEPTANCE_BUCKETS):
        exported = registry.get_sample_value("specdec_request_acceptance_rate_bucket", {**labels, "le": str(le)})
        assert exported == sum(totals.acceptance[: i + 1])
    assert totals.acceptance[ACCEPTANCE_BUCKETS.index(0.0)] == 1
    assert totals.acceptance[ACCEPTANCE_BUCKETS.index(0.3)] == 1  # 0.25 <= 0.3
    assert totals.ttft[TTFT_BUCKETS.index(0.2)] == 4
