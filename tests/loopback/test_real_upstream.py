"""The scrape side against an upstream that behaves like production vLLM (tests/hostile.py), and pages from
other vLLM versions: whole pages however they arrive, gzip, API keys, gaps, credentials kept out of logs."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from fakes import HostileVllm, data_parallel_page, fixture_text, serve_loopback, wait_for
from sidecar.app import MODEL_NAMES, MONITOR, PROXY_PORT, create_app
from sidecar.config import build_settings
from sidecar.model_names import ModelNames, served_names
from sidecar.upstream.scrape import ScrapeError, Scraper
from sidecar.upstream.vllm_metrics import read_vllm_metrics

ONE_ENGINE = fixture_text("vllm-0.32-draft-t3.prom")


async def scrape_once(url: str, **session_kw) -> object:
    async with aiohttp.ClientSession(**session_kw) as session:
        return await Scraper(session, url, timeout=5.0).scrape()


@pytest.mark.parametrize("write_size", [7, 1000, 65536])
@pytest.mark.parametrize("gzip_ok", [True, False])
async def test_big_page_in_many_reads_is_read_whole(write_size, gzip_ok):
    server = HostileVllm(write_size=write_size, gzip_ok=gzip_ok)
    await server.start()
    try:
        assert len(server.page) > 300_000
        result = await scrape_once(server.url)
    finally:
        await server.stop()
    assert result.ok, result.detail
    expected = read_vllm_metrics(server.page)
    assert len(expected.engines) == 8
    assert result.snapshot == expected  # every line, every engine, the tail's cache_config_info included
    assert all(s.kv_capacity_tokens is not None for s in result.snapshot.engines.values())


async def test_sidecar_on_hostile_upstream_equals_the_page(hostile_vllm):
    """The running sidecar (own poll session) reads the 8-engine gzip page in many writes: KV capacity of all
    eight engines, every counter exact, while the upstream closes idle connections after 1 s."""
    registry = CollectorRegistry()
    settings = build_settings(upstream=hostile_vllm.url, scrape_interval="0.5s", windows="10s", verdict_window="10s",
                              min_drafts=1)
    app = create_app(settings, registry)
    runner, _ = await serve_loopback(app)
    try:
        monitor = app[MONITOR]
        await wait_for(lambda: monitor.state.scrapes >= 2, timeout=10)
        await asyncio.sleep(1.5)  # past the upstream's keep-alive: the next poll must still succeed
        await wait_for(lambda: monitor.state.scrapes >= 5, timeout=10)
        assert monitor.metrics.errors.labels("truncated")._value.get() == 0
        assert monitor.state.up
        page = read_vllm_metrics(hostile_vllm.page)
        one = page.engines[("tiny-target", "0")]
        get = registry.get_sample_value
        assert get("specdec_kv_cache_capacity_tokens", {"model": "tiny-target"}) == 8 * one.kv_capacity_tokens
        assert get("specdec_requests_running", {"model": "tiny-target"}) == 8 * one.running
        assert get("specdec_upstream_scrape_errors_total", {"reason": "parse"}) == 0
        assert hostile_vllm.hits["/metrics"] >= 5
    finally:
        await runner.cleanup()


async def _cut_server(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/metrics", handler)
    runner, port = await serve_loopback(app)
    return runner, f"http://127.0.0.1:{port}"


async def test_body_cut_mid_transfer_is_a_failed_poll():
    body = ONE_ENGINE.encode()

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(body)), "Content-Type": "text/plain"})
        await response.prepare(request)
        await response.write(body[: len(body) // 2])
        request.transport.close()  # the upstream died mid-body
        return response

    runner, url = await _cut_server(handler)
    try:
        result = await scrape_once(url)
    finally:
        await runner.cleanup()
    assert not result.ok and result.error is ScrapeError.TRUNCATED


async def test_body_without_a_final_newline_is_a_failed_poll():
    # The old failure: a page cut inside "...accepted_tokens_total 565.0" read as "5.0" and counted as success.
    cut = ONE_ENGINE[: ONE_ENGINE.index("vllm:spec_decode_num_accepted_tokens_total{") + 80]
    assert not cut.endswith("\n")

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=cut, content_type="text/plain")

    runner, url = await _cut_server(handler)
    try:
        result = await scrape_once(url)
    finally:
        await runner.cleanup()
    assert not result.ok and result.error is ScrapeError.TRUNCATED


async def test_gzip_page_through_a_session_that_does_not_decode_is_still_read(hostile_vllm):
    """The proxy's session has auto_decompress=False; the sidecar's poll must not depend on it."""
    registry = CollectorRegistry()
    settings = build_settings(upstream=hostile_vllm.url, scrape_interval="0.5s", windows="10s", verdict_window="10s")
    app = create_app(settings, registry)
    runner, _ = await serve_loopback(app)
    try:
        await wait_for(lambda: app[MONITOR].state.scrapes >= 2, timeout=10)
        assert app[MONITOR].state.up
        assert registry.get_sample_value("specdec_upstream_scrape_errors_total", {"reason": "parse"}) == 0
    finally:
        await runner.cleanup()


async def _through_proxy(upstream_url: str, tmp_path, *, key_file: bool, request_key: str | None) -> CollectorRegistry:
    registry = CollectorRegistry()
    extra = {}
    if key_file:
        path = tmp_path / "key"
        path.write_text("sk-hostile\n")
        extra["upstream_api_key_file"] = str(path)
    settings = build_settings(upstream=upstream_url, scrape_interval="0.2s", windows="10s", verdict_window="10s",
                              proxy_port=0, proxy_host="127.0.0.1", min_drafts=1, **extra)
    app = create_app(settings, registry)
    runner, _ = await serve_loopback(app)
    try:
        await wait_for(lambda: app[MONITOR].state.up, timeout=10)
        await wait_for(lambda: app[MODEL_NAMES].label("tiny-target") == "tiny-target", timeout=10,
                       what="model names learnt")
        headers = {"Authorization": f"Bearer {request_key}"} if request_key else {}
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{app[PROXY_PORT]}/v1/completions"
            for stream in (False, True):
                body = {"model": "tiny-target", "prompt": "x", "temperature": 0, "stream": stream}
                async with client.post(url, json=body, headers=headers) as response:
                    await response.read()
                    assert response.status == 200
    finally:
        await runner.cleanup()
    return registry


async def test_api_key_on_v1_still_gives_real_model_labels(hostile_vllm, tmp_path):
    """vLLM run with --api-key: /v1/models answers 401 to the sidecar, yet requests are labelled with the
    model vLLM's own series carry (learnt from /metrics), so the alerts' joins on model match."""
    registry = await _through_proxy(hostile_vllm.url, tmp_path, key_file=False, request_key="sk-hostile")
    assert hostile_vllm.unauthorized >= 1  # the sidecar's own /v1/models call was refused
    get = registry.get_sample_value
    assert get("specdec_requests_total", {"model": "tiny-target", "temperature_bucket": "0", "status_class": "2xx"}) == 2
    assert get("specdec_requests_total", {"model": "other", "temperature_bucket": "0", "status_class": "2xx"}) is None


async def test_api_key_file_lets_the_sidecar_read_the_model_list(tmp_path):
    server = HostileVllm(models=("tiny-target",), keepalive=1.0)
    await server.start()
    try:
        registry = await _through_proxy(server.url, tmp_path, key_file=True, request_key="sk-hostile")
        assert server.hits["/v1/models"] >= 1 and server.unauthorized == 0
        assert registry.get_sample_value(
            "specdec_requests_total", {"model": "tiny-target", "temperature_bucket": "0", "status_class": "2xx"}
        ) == 2
    finally:
        await server.stop()


def test_aliases_map_to_the_name_vllm_labels_its_series_with():
    listing = {"data": [
        {"id": "llama", "root": "/models/llama-3.1-8b", "parent": None},
        {"id": "llama-alias", "root": "/models/llama-3.1-8b", "parent": None},
        {"id": "sql-lora", "root": "/adapters/sql", "parent": "llama"},
        {"oops": 1}, "garbage",
    ]}
    ids, aliases = served_names(listing)
    assert ids == ["llama", "llama-alias", "sql-lora"]
    names = ModelNames()
    names.update_served(ids, aliases)
    assert names.label("llama-alias") == "llama"
    assert names.label("sql-lora") == "sql-lora"  # an adapter keeps its own label
    assert names.label("made-up") == "other"
    assert names.label(None) == "unknown"
    names.update_scraped(["from-metrics"])
    assert names.label("from-metrics") == "from-metrics"
    fixed = ModelNames(["only"])
    fixed.update_scraped(["from-metrics"])
    assert fixed.label("from-metrics") == "other"


async def test_credentials_in_upstream_never_reach_the_logs(capsys):
    from sidecar.logs import configure_logging

    configure_logging("json", "info")
    settings = build_settings(upstream="http://admin:s3cret@127.0.0.1:9", scrape_interval="0.1s",
                              windows="10s", verdict_window="10s", proxy_port=0, proxy_host="127.0.0.1")
    app = create_app(settings, CollectorRegistry())
    runner, _ = await serve_loopback(app)
    try:
        await wait_for(lambda: app[MONITOR].state.scrapes >= 3)
    finally:
        await runner.cleanup()
    err = capsys.readouterr().err
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any(e["event"] in ("upstream_unavailable", "upstream_lost") for e in events)
    assert "s3cret" not in err and "admin" not in err
    assert "***@127.0.0.1:9" in err


# --- pages from other vLLM versions ------------------------------------------------------------------------

V1_BASE = """# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="m"} 100.0
# HELP vllm:spec_decode_num_drafts_created Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_created gauge
vllm:spec_decode_num_drafts_created{engine="0",model_name="m"} 1.7955450921101124e+09
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="m"} 400.0
vllm:spec_decode_num_draft_tokens_created{engine="0",model_name="m"} 1.7955450921101124e+09
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="m"} 300.0
"""


def test_created_samples_typed_as_gauges_are_not_read_as_values():
    s = read_vllm_metrics(V1_BASE).engines[("m", "0")]
    assert (s.drafts, s.draft_tokens, s.accepted_tokens) == (100, 400, 300)


def test_pid_labelled_gauges_are_one_engine_reported_by_several_api_servers():
    page = V1_BASE + """vllm:num_requests_running{engine="0",model_name="m",pid="11"} 7
vllm:num_requests_running{engine="0",model_name="m",pid="12"} 7
vllm:kv_cache_usage_perc{engine="0",model_name="m",pid="11"} 0.4
vllm:kv_cache_usage_perc{engine="0",model_name="m",pid="12"} 0.5
vllm:generation_tokens_total{engine="0",model_name="m",pid="11"} 600
vllm:generation_tokens_total{engine="0",model_name="m",pid="12"} 400
"""
    s = read_vllm_metrics(page).engines[("m", "0")]
    assert s.running == 7  # not 14
    assert s.kv_usage == 0.5
    assert s.generation_tokens == 1000  # counters: each process counts its own share


def test_early_v1_page_without_engine_label_and_old_kv_name():
    page = """vllm:spec_decode_num_drafts_total{model_name="m"} 10
vllm:spec_decode_num_draft_tokens_total{model_name="m"} 40
vllm:spec_decode_num_accepted_tokens_total{model_name="m"} 30
vllm:gpu_cache_usage_perc{model_name="m"} 0.25
"""
    s = read_vllm_metrics(page).engines[("m", "0")]
    assert s.drafts == 10 and s.kv_usage_ratio == 0.25


def test_ray_serve_prefixed_names():
    page = V1_BASE.replace("vllm:", "ray_vllm:") + 'ray_vllm:kv_cache_usage_perc{engine="0",model_name="m",ReplicaId="a"} 0.3\n'
    s = read_vllm_metrics(page).engines[("m", "0")]
    assert (s.drafts, s.draft_tokens, s.accepted_tokens, s.kv_usage) == (100, 400, 300, 0.3)


def test_family_with_no_samples_is_absent_not_zero():
    page = V1_BASE + """# HELP vllm:spec_decode_num_accepted_tokens_per_pos_total Accepted tokens per draft position.
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
# HELP vllm:num_preemptions_total Preemptions.
# TYPE vllm:num_preemptions_total counter
# HELP vllm:kv_cache_usage_perc KV usage.
# TYPE vllm:kv_cache_usage_perc gauge
"""
    s = read_vllm_metrics(page).engines[("m", "0")]
    assert s.preemptions is None and s.kv_usage is None and dict(s.accepted_per_position) == {}


@pytest.mark.parametrize("value", ["-0.02", "1.7", "-1"])
def test_kv_usage_out_of_range_is_dropped_and_counted(value):
    snap = read_vllm_metrics(V1_BASE + f'vllm:kv_cache_usage_perc{{engine="0",model_name="m"}} {value}\n')
    assert snap.engines[("m", "0")].kv_usage is None
    assert snap.invalid_lines == 1


def test_data_parallel_page_helper_multiplies_engines():
    snap = read_vllm_metrics(data_parallel_page(ONE_ENGINE, 3))
    assert sorted(e for _, e in snap.engines) == ["0", "1", "2"]
