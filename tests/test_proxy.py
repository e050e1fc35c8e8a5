"""The proxy against a local upstream replaying recorded vLLM responses byte for byte."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from yarl import URL

from conftest import FIXTURES, wait_for
from sidecar.app import PROXY_PORT, create_app
from sidecar.config import build_settings
from sidecar.logs import configure_logging


def value(registry, name, **labels):
    return registry.get_sample_value(name, labels) or 0.0


async def direct_and_proxied(proxy, upstream, path, payload, **kw):
    async with aiohttp.ClientSession(auto_decompress=False) as direct:
        async with direct.post(upstream.url + path, json=payload, **kw) as r:
            want = (r.status, await r.read(), r.headers.get("Content-Type"))
    async with proxy.post(proxy.base + path, json=payload, **kw) as r:
        got = (r.status, await r.read(), r.headers.get("Content-Type"))
    return want, got


@pytest.mark.parametrize(
    ("path", "stream", "fixture"),
    [("/v1/completions", False, "completion-nonstream.json"), ("/v1/completions", True, "completion-stream.sse"),
     ("/v1/chat/completions", False, "chat-nonstream.json"), ("/v1/chat/completions", True, "chat-stream.sse")],
)
async def test_byte_exact_and_counted(proxy, upstream, path, stream, fixture):
    payload = {"model": "tiny-target", "temperature": 0.2, "stream": stream, "max_tokens": 24}
    if path.endswith("chat/completions"):
        payload["messages"] = [{"role": "user", "content": "hi"}]
    want, got = await direct_and_proxied(proxy, upstream, path, payload)
    assert got == want
    assert got[1] == (FIXTURES / fixture).read_bytes()
    text = (FIXTURES / fixture).read_text()
    last = json.loads(text if not stream else [l[6:] for l in text.splitlines() if l.startswith("data: {")][-1])
    spec = last["metrics"]["speculative_decoding"]
    labels = dict(model="tiny-target", temperature_bucket="0-0.3", source="vllm")
    r = proxy.registry
    assert value(r, "specdec_request_accepted_tokens_total", **labels) == spec["num_accepted_draft_tokens"]
    assert value(r, "specdec_request_draft_tokens_total", **labels) == spec["num_draft_tokens"]
    assert value(r, "specdec_request_spec_steps_total", **labels) == spec["num_spec_steps"]
    hist = dict(model="tiny-target", temperature_bucket="0-0.3")
    assert value(r, "specdec_request_acceptance_rate_count", **hist) == 1
    # TTFT and TPOT describe streamed requests only; end-to-end latency is per model and stream mode
    assert value(r, "specdec_request_ttft_seconds_count", **hist, stream="true") == int(stream)
    assert value(r, "specdec_request_tpot_seconds_count", **hist, stream="true") == int(stream)
    assert value(r, "specdec_request_e2e_seconds_count", model="tiny-target", stream=str(stream).lower()) == 1
    assert value(r, "specdec_requests_total", **hist, status_class="2xx") == 1
    assert value(r, "specdec_request_output_tokens_total", **hist) == last["usage"]["completion_tokens"]


async def test_stream_steps_source(proxy, upstream):
    payload = {"model": "tiny-target", "prompt": "x", "stream": True}
    async with proxy.post(proxy.base + "/v1/completions", json=payload, headers={"X-Fake": "no-spec"}) as r:
        body = await r.read()
    assert body == (FIXTURES / "completion-stream-no-spec-metrics.sse").read_bytes()
    events = [json.loads(l[6:]) for l in body.decode().splitlines() if l.startswith("data: {")]
    chunks = sum(1 for e in events if e["choices"] and e["choices"][0].get("text"))
    tokens = events[-1]["usage"]["completion_tokens"]
    labels = dict(model="tiny-target", temperature_bucket="default", source="stream_steps")
    assert value(proxy.registry, "specdec_request_accepted_tokens_total", **labels) == tokens - chunks
    assert value(proxy.registry, "specdec_request_draft_tokens_total", **labels) == 0


async def test_methods_paths_queries_headers_and_auth_forwarded_untouched(proxy, upstream, capsys):
    configure_logging("json", "debug")
    async with proxy.request("PUT", URL(proxy.base + "/any/where%2Fx?q=a+b&q=%2F&e=", encoded=True), data=b"abc",
                             headers={"Authorization": "Bearer sk-secret-123", "X-Custom": "1"}) as r:
        assert r.status == 201
        assert r.headers["X-Upstream"] == "yes"
        got = await r.json()
    assert got == {"method": "PUT", "raw_path": "/any/where%2Fx?q=a+b&q=%2F&e=", "len": 3}
    async with proxy.post(proxy.base + "/v1/completions", data=b'{"model":"tiny-target"}',
                          headers={"X-Fake": "echo", "Authorization": "Bearer sk-secret-123"}) as r:
        assert (await r.json())["auth"] == "Bearer sk-secret-123"
    assert "sk-secret-123" not in capsys.readouterr().err
    assert upstream.seen[-1]["headers"]["X-Fake"] == "echo"


async def test_ten_megabyte_non_json_body(proxy, upstream):
    blob = os.urandom(10 * 1024 * 1024)
    async with proxy.post(proxy.base + "/v1/completions", data=blob, headers={"X-Fake": "echo"}) as r:
        got = await r.json()
    assert got["len"] == len(blob) and got["sha256"] == hashlib.sha256(blob).hexdigest()
    assert value(proxy.registry, "specdec_requests_unattributed_total", reason="body_too_large") == 1


async def test_unparsable_json_is_forwarded_and_counted(proxy, upstream):
    async with proxy.post(proxy.base + "/v1/completions", data=b"{not json", headers={"X-Fake": "echo"}) as r:
        got = await r.json()
    assert got["sha256"] == hashlib.sha256(b"{not json").hexdigest()
    assert value(proxy.registry, "specdec_requests_unattributed_total", reason="unparsable_request") == 1


async def test_upstream_500_passes_through(proxy, upstream):
    payload = {"model": "tiny-target", "temperature": 1.5}
    want, got = await direct_and_proxied(proxy, upstream, "/v1/completions", payload, headers={"X-Fake": "error"})
    assert got == want and got[0] == 500
    assert value(proxy.registry, "specdec_requests_total", model="tiny-target", temperature_bucket="gt1.0",
                 status_class="5xx") == 1
    assert value(proxy.registry, "specdec_requests_unattributed_total", reason="error_status") == 1


async def test_upstream_reset_mid_stream_reaches_the_client_as_an_error(proxy, upstream):
    payload = {"model": "tiny-target", "stream": True}
    with pytest.raises(aiohttp.ClientPayloadError):
        async with proxy.post(proxy.base + "/v1/completions", json=payload, headers={"X-Fake": "reset"}) as r:
            assert r.status == 200
            await r.read()
    await wait_for(lambda: value(proxy.registry, "specdec_requests_unattributed_total", reason="upstream_reset") == 1)
    # the sidecar is still fine
    async with proxy.post(proxy.base + "/v1/completions", json={"model": "tiny-target"}) as r:
        assert r.status == 200


async def test_client_disconnect_closes_upstream(proxy, upstream):
    payload = {"model": "tiny-target", "stream": True}
    response = await proxy.post(proxy.base + "/v1/completions", json=payload, headers={"X-Fake": "slow"})
    await response.content.readany()
    response.close()  # drop the connection mid-stream
    await asyncio.wait_for(upstream.disconnected.wait(), timeout=5)
    await wait_for(
        lambda: value(proxy.registry, "specdec_requests_unattributed_total", reason="client_disconnected") == 1
    )


async def test_upstream_unreachable_is_a_502_with_openai_error(aiohttp_client):
    from devstack.vllm_server import free_port

    settings = build_settings(upstream=f"http://127.0.0.1:{free_port()}", proxy_port=0, proxy_host="127.0.0.1",
                              scrape_interval="1s", scrape_timeout="1s", windows="1m", verdict_window="1m")
    client = await aiohttp_client(create_app(settings, CollectorRegistry()))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{client.app[PROXY_PORT]}/v1/completions", json={"model": "m"},
                          timeout=aiohttp.ClientTimeout(total=10)) as r:
            assert r.status == 502
            body = await r.json()
    assert body["error"]["type"] == "upstream_unavailable" and body["error"]["code"] == 502


async def test_unknown_model_is_other_and_invalid_temperature_is_invalid(proxy, upstream):
    for payload in ({"model": "someone-elses", "temperature": 0}, {"model": "tiny-target", "temperature": "hot"}):
        async with proxy.post(proxy.base + "/v1/completions", json=payload) as r:
            assert r.status == 200
    assert value(proxy.registry, "specdec_requests_total", model="other", temperature_bucket="0",
                 status_class="2xx") == 1
    assert value(proxy.registry, "specdec_requests_total", model="tiny-target", temperature_bucket="invalid",
                 status_class="2xx") == 1


async def test_two_hundred_concurrent_streams(proxy, upstream):
    expected = (FIXTURES / "chat-stream.sse").read_bytes()
    payload = {"model": "tiny-target", "messages": [{"role": "user", "content": "x"}], "stream": True,
               "temperature": 0}

    async def one() -> bytes:
        async with proxy.post(proxy.base + "/v1/chat/completions", json=payload) as r:
            return await r.read()

    bodies = await asyncio.gather(*(one() for _ in range(200)))
    assert all(b == expected for b in bodies)
    spec = json.loads([l[6:] for l in expected.decode().splitlines() if l.startswith("data: {")][-1])
    accepted = spec["metrics"]["speculative_decoding"]["num_accepted_draft_tokens"]
    assert value(proxy.registry, "specdec_request_accepted_tokens_total", model="tiny-target",
                 temperature_bucket="0", source="vllm") == 200 * accepted


async def test_bucket_verdict_exported(proxy, upstream):
    payload = {"model": "tiny-target", "prompt": "x", "temperature": 0.9}
    for _ in range(3):
        async with proxy.post(proxy.base + "/v1/completions", json=payload) as r:
            await r.read()
    get = proxy.registry.get_sample_value
    await wait_for(lambda: get("specdec_bucket_acceptance_rate",
                               {"model": "tiny-target", "temperature_bucket": "0.7-1.0", "window": "10m"}) is not None)
    spec = json.loads((FIXTURES / "completion-nonstream.json").read_bytes())["metrics"]["speculative_decoding"]
    rate = spec["num_accepted_draft_tokens"] / spec["num_draft_tokens"]
    assert get("specdec_bucket_acceptance_rate",
               {"model": "tiny-target", "temperature_bucket": "0.7-1.0", "window": "10m"}) == pytest.approx(rate)
    want = "use" if rate >= 0.65 else "near_break_even" if rate >= 0.5 else "disable"
    assert get("specdec_bucket_verdict", {"model": "tiny-target", "temperature_bucket": "0.7-1.0",
                                          "verdict": want}) == 1.0


async def test_model_labels_follow_v1_models_when_no_allowlist(aiohttp_client, upstream):
    registry = CollectorRegistry()
    settings = build_settings(upstream=upstream.url, scrape_interval="0.1s", scrape_timeout="0.1s",
                              windows="10m", verdict_window="10m", proxy_port=0, proxy_host="127.0.0.1")
    client = await aiohttp_client(create_app(settings, registry))
    port = client.app[PROXY_PORT]
    from sidecar.app import MODEL_NAMES

    await wait_for(lambda: client.app[MODEL_NAMES].label("tiny-target") == "tiny-target", what="/v1/models")
    async with aiohttp.ClientSession() as s:
        for model in ("tiny-target", "not-served"):
            async with s.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": model}) as r:
                await r.read()
    assert value(registry, "specdec_requests_total", model="tiny-target", temperature_bucket="default",
                 status_class="2xx") == 1
    assert value(registry, "specdec_requests_total", model="other", temperature_bucket="default",
                 status_class="2xx") == 1


async def test_expect_100_continue_is_answered_and_not_repeated_upstream(proxy, upstream):
    body = b'{"model":"tiny-target"}'
    async with proxy.post(proxy.base + "/v1/completions", data=body, expect100=True,
                          headers={"X-Fake": "echo"}) as r:
        got = await r.json()
    assert got["sha256"] == hashlib.sha256(body).hexdigest()
    assert "Expect" not in upstream.seen[-1]["headers"]


def test_end_to_end_drops_hop_by_hop_and_connection_listed_headers():
    from multidict import CIMultiDict

    from sidecar.tap.proxy import REQUEST_ONLY_DROP, end_to_end

    headers = CIMultiDict([("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "timeout=5"),
                           ("Transfer-Encoding", "chunked"), ("Content-Length", "3"), ("X-Keep", "a"),
                           ("X-Keep", "b"), ("Authorization", "Bearer t")])
    assert list(end_to_end(headers).items()) == [("Content-Length", "3"), ("X-Keep", "a"), ("X-Keep", "b"),
                                                 ("Authorization", "Bearer t")]
    assert "Content-Length" not in end_to_end(headers, REQUEST_ONLY_DROP)
