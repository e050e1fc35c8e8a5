"""The running sidecar against a local upstream replaying real vLLM 0.32 expositions over time."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from fakes import FakeVllm, fixture_text, wait_for
from sidecar.app import MONITOR, create_app
from sidecar.config import build_settings
from sidecar.upstream.vllm_metrics import read_vllm_metrics

SERIES = ["vllm-0.32-draft-t0.prom", "vllm-0.32-draft-t1.prom", "vllm-0.32-draft-t2.prom", "vllm-0.32-draft-t3.prom"]


def counters(name: str) -> dict:
    sample = read_vllm_metrics(fixture_text(name)).engines[("tiny-target", "0")]
    return {
        "drafts": sample.drafts,
        "draft_tokens": sample.draft_tokens,
        "accepted": sample.accepted_tokens,
        "generated": sample.generation_tokens,
        "pos": dict(sample.accepted_per_position),
    }


@pytest.fixture
async def sidecar(aiohttp_client, fake_vllm: FakeVllm):
    registry = CollectorRegistry()
    settings = build_settings(
        upstream=fake_vllm.url,
        scrape_interval="0.1s",
        scrape_timeout="0.1s",
        windows="10m,1h",
        verdict_window="10m",
        min_drafts=1,
    )
    client = await aiohttp_client(create_app(settings, registry))
    client.registry = registry
    client.monitor = client.app[MONITOR]
    return client


def two_engines(text: str) -> str:
    """A data-parallel server's page: every engine-0 sample again as engine 1 (same values)."""
    out = []
    for line in text.splitlines():
        out.append(line)
        if 'engine="0"' in line and not line.startswith("#"):
            out.append(line.replace('engine="0"', 'engine="1"'))
    return "\n".join(out) + "\n"


async def scrape_count(client, n: int) -> None:
    start = client.monitor.state.scrapes
    await wait_for(lambda: client.monitor.state.scrapes >= start + n, what=f"{n} more polls")


async def test_per_engine_series_where_a_model_runs_on_several_engines(sidecar, fake_vllm):
    fake_vllm.text = two_engines(fixture_text(SERIES[0]))
    await scrape_count(sidecar, 2)
    fake_vllm.text = two_engines(fixture_text(SERIES[3]))
    await scrape_count(sidecar, 2)
    a, b = counters(SERIES[0]), counters(SERIES[3])
    get = sidecar.registry.get_sample_value
    expected = (b["accepted"] - a["accepted"]) / (b["draft_tokens"] - a["draft_tokens"])
    labels = {"model": "tiny-target", "window": "10m"}
    assert get("specdec_acceptance_rate", labels) == pytest.approx(expected)  # summed over both: same ratio
    for engine in ("0", "1"):
        assert get("specdec_engine_acceptance_rate", {**labels, "engine": engine}) == pytest.approx(expected)
        assert get("specdec_engine_kv_cache_capacity_tokens", {"model": "tiny-target", "engine": engine}) > 0


async def test_windowed_acceptance_equals_vllm_counter_deltas(sidecar, fake_vllm):
    fake_vllm.text = fixture_text(SERIES[0])
    await scrape_count(sidecar, 2)
    fake_vllm.text = fixture_text(SERIES[3])
    await scrape_count(sidecar, 2)
    a, b = counters(SERIES[0]), counters(SERIES[3])
    get = sidecar.registry.get_sample_value
    labels = {"model": "tiny-target", "window": "10m"}
    expected = (b["accepted"] - a["accepted"]) / (b["draft_tokens"] - a["draft_tokens"])
    assert get("specdec_acceptance_rate", labels) == pytest.approx(expected)
    assert get("specdec_spec_decode_draft_acceptance_rate", {"model": "tiny-target"}) == pytest.approx(expected)
    assert get("specdec_mean_acceptance_length", labels) == pytest.approx(
        1 + (b["accepted"] - a["accepted"]) / (b["drafts"] - a["drafts"])
    )
    for pos in b["pos"]:
        assert get("specdec_position_acceptance_rate", {**labels, "position": str(pos)}) == pytest.approx(
            (b["pos"][pos] - a["pos"].get(pos, 0)) / (b["drafts"] - a["drafts"])
        )
    assert get("specdec_accepted_token_ratio", labels) == pytest.approx(
        (b["accepted"] - a["accepted"]) / (b["generated"] - a["generated"])
    )
    # one engine: its specdec_engine_* series would repeat the model's, so there are none
    assert get("specdec_engine_acceptance_rate", {**labels, "engine": "0"}) is None
    assert get("specdec_upstream_up") == 1.0
    assert get("specdec_kv_cache_capacity_tokens", {"model": "tiny-target"}) > 0
    verdicts = {
        v: get("specdec_verdict", {"model": "tiny-target", "verdict": v})
        for v in ("use", "near_break_even", "disable", "insufficient_data")
    }
    assert sum(verdicts.values()) == 1.0
    want = "use" if expected >= 0.65 else "near_break_even" if expected >= 0.5 else "disable"
    assert verdicts[want] == 1.0


async def test_upstream_vanishes_then_returns_with_reset_counters(sidecar, fake_vllm):
    get = sidecar.registry.get_sample_value
    labels = {"model": "tiny-target", "window": "10m"}
    fake_vllm.text = fixture_text(SERIES[2])
    await scrape_count(sidecar, 2)
    fake_vllm.text = fixture_text(SERIES[3])
    await scrape_count(sidecar, 2)
    before = get("specdec_acceptance_rate", labels)
    assert before is not None

    await fake_vllm.stop()
    await wait_for(lambda: get("specdec_upstream_up") == 0.0, what="up to drop")
    assert get("specdec_acceptance_rate", labels) is None  # vanished, not frozen
    assert get("specdec_verdict", {"model": "tiny-target", "verdict": "use"}) is None
    assert get("specdec_upstream_scrape_errors_total", {"reason": "connect"}) >= 1
    resp = await sidecar.get("/readyz")
    assert resp.status == 503
    assert (await sidecar.get("/healthz")).status == 200

    fake_vllm.text = fixture_text("vllm-0.32-draft-restarted.prom")
    await fake_vllm.start()  # same port
    await wait_for(lambda: get("specdec_upstream_up") == 1.0, what="up to return")
    await scrape_count(sidecar, 1)
    assert get("specdec_upstream_restarts_total") == 1.0
    t2, t3, restarted = counters(SERIES[2]), counters(SERIES[3]), counters("vllm-0.32-draft-restarted.prom")
    accepted = (t3["accepted"] - t2["accepted"]) + restarted["accepted"]
    drafted = (t3["draft_tokens"] - t2["draft_tokens"]) + restarted["draft_tokens"]
    after = get("specdec_acceptance_rate", labels)
    assert after == pytest.approx(accepted / drafted)
    # The re-exported counters carried on across the restart (counted from the first poll) instead of dropping.
    assert get("specdec_accepted_tokens_total", {"model": "tiny-target"}) == accepted
    assert get("specdec_draft_tokens_total", {"model": "tiny-target"}) == drafted
    assert 0.0 <= after <= 1.0
    assert get("specdec_draft_tokens_per_second", labels) >= 0.0
    assert (await sidecar.get("/readyz")).status == 200


async def test_last_success_tells_a_vllm_not_up_yet_from_one_that_is_gone(sidecar, fake_vllm):
    """What the upstream alerts tell apart (alerts.yaml): before vLLM has answered once the time of the last good
    poll is 0 (SpecDecodeSidecarUpstreamStarting, info); once it has, it keeps that time while vLLM is gone
    (SpecDecodeSidecarUpstreamDown pages)."""
    get = sidecar.registry.get_sample_value
    await fake_vllm.stop()  # vLLM still loading: nothing listens yet
    await scrape_count(sidecar, 2)
    assert get("specdec_upstream_up") == 0.0
    assert get("specdec_upstream_last_success_timestamp_seconds") == 0.0  # exported, at 0, before any success
    fake_vllm.text = fixture_text(SERIES[0])
    await fake_vllm.start()
    await wait_for(lambda: get("specdec_upstream_up") == 1.0, what="vLLM up")
    first_seen = get("specdec_upstream_last_success_timestamp_seconds")
    assert first_seen > 1.7e9
    await fake_vllm.stop()
    await wait_for(lambda: get("specdec_upstream_up") == 0.0, what="vLLM gone")
    await scrape_count(sidecar, 2)
    assert get("specdec_upstream_last_success_timestamp_seconds") >= first_seen > 0


@pytest.mark.parametrize(
    ("setup", "reason"),
    [
        (lambda f: setattr(f, "status", 500), "http_status"),
        (lambda f: setattr(f, "body", b"<html>not metrics</html>\n"), "parse"),
        (lambda f: setattr(f, "body", fixture_text("vllm-0.32-draft-t1.prom").encode()[:-40]), "truncated"),
        (lambda f: setattr(f, "body", b"\xff\xfe\x00garbage"), "parse"),
        (lambda f: setattr(f, "delay", 0.5), "timeout"),
    ],
)
async def test_scrape_errors_by_reason_and_no_derived_series(sidecar, fake_vllm, setup, reason):
    fake_vllm.text = fixture_text(SERIES[1])
    setup(fake_vllm)
    get = sidecar.registry.get_sample_value
    await wait_for(lambda: (get("specdec_upstream_scrape_errors_total", {"reason": reason}) or 0) >= 2, what=reason)
    assert get("specdec_upstream_up") == 0.0
    assert get("specdec_window_span_seconds", {"window": "10m"}) is None
    assert get("specdec_upstream_scrape_duration_seconds_count") >= 2


async def test_partial_garbage_keeps_good_lines(sidecar, fake_vllm):
    text = fixture_text(SERIES[1])
    fake_vllm.text = text.replace(
        "vllm:num_requests_running{", 'vllm:num_requests_running{engine="0" broken\nvllm:num_requests_running{', 1
    )
    get = sidecar.registry.get_sample_value
    await scrape_count(sidecar, 2)
    assert get("specdec_upstream_up") == 1.0
    assert get("specdec_upstream_invalid_lines_total") >= 1
    assert get("specdec_kv_cache_capacity_tokens", {"model": "tiny-target"}) > 0


async def test_metrics_endpoint_text_and_openmetrics(sidecar, fake_vllm):
    fake_vllm.text = fixture_text(SERIES[0])
    await scrape_count(sidecar, 2)
    resp = await sidecar.get("/metrics")
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    families = {f.name for f in text_string_to_metric_families(await resp.text())}
    assert {"specdec_upstream_up", "specdec_verdict", "specdec_build_info"} <= families
    resp = await sidecar.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
    assert (await resp.text()).rstrip().endswith("# EOF")


async def test_too_few_drafts_is_insufficient_data(aiohttp_client, fake_vllm):
    registry = CollectorRegistry()
    settings = build_settings(
        upstream=fake_vllm.url, scrape_interval="0.1s", scrape_timeout="0.1s", windows="10m", verdict_window="10m",
        min_drafts=10**9,
    )
    client = await aiohttp_client(create_app(settings, registry))
    fake_vllm.text = fixture_text(SERIES[0])
    await wait_for(lambda: client.app[MONITOR].state.scrapes >= 2)
    fake_vllm.text = fixture_text(SERIES[3])
    await wait_for(lambda: client.app[MONITOR].state.scrapes >= 4)
    get = registry.get_sample_value
    assert get("specdec_acceptance_rate", {"model": "tiny-target", "window": "10m"}) is None
    assert get("specdec_verdict", {"model": "tiny-target", "verdict": "insufficient_data"}) == 1.0
    assert get("specdec_draft_tokens_per_second", {"model": "tiny-target", "window": "10m"}) > 0


async def test_state_change_logs_once_not_per_scrape(aiohttp_client, fake_vllm, capsys):
    import json

    from sidecar.logs import configure_logging

    configure_logging("json", "info")
    fake_vllm.status = 503
    settings = build_settings(upstream=fake_vllm.url, scrape_interval="0.1s", scrape_timeout="0.1s", windows="10m",
                              verdict_window="10m")
    client = await aiohttp_client(create_app(settings, CollectorRegistry()))
    monitor = client.app[MONITOR]
    await wait_for(lambda: monitor.state.scrapes >= 5)
    fake_vllm.status = 200
    fake_vllm.text = fixture_text(SERIES[0])
    await wait_for(lambda: monitor.state.up and monitor.state.scrapes >= 10)
    events = [json.loads(line)["event"] for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert events.count("upstream_unavailable") == 1
    assert events.count("upstream_back") == 1
    assert events.count("model_list_unavailable") <= 1  # this fake has no /v1/models: said once, not per try
    assert all(e in ("upstream_unavailable", "upstream_back", "model_list_unavailable") for e in events), events
