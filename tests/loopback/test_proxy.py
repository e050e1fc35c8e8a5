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

from fakes import FIXTURES, RawUpstream, Recorder, wait_for
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
    from fakes import free_port

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
    from sidecar.tap.http1 import end_to_end
    from sidecar.tap.upstream import REQUEST_ONLY_DROP

    headers = [(b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"), (b"Keep-Alive", b"timeout=5"),
               (b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"3"), (b"X-Keep", b"a"),
               (b"X-Keep", b"b"), (b"Authorization", b"Bearer t")]
    assert end_to_end(headers) == [b"Content-Length: 3", b"X-Keep: a", b"X-Keep: b", b"Authorization: Bearer t"]
    assert b"Content-Length: 3" not in end_to_end(headers, REQUEST_ONLY_DROP)


async def start_proxy(upstream_url: str, recorder, keepalive: float = 4.0, max_observed_body: int = 1 << 20,
                      budget: int | None = None):
    """The proxy alone, in this loop, in front of *upstream_url*; returns (proxy, base URL)."""
    from sidecar.tap.observe import Budget
    from sidecar.tap.proxy import Proxy

    proxy = Proxy(upstream_url, recorder, max_observed_body=max_observed_body, connect_timeout=2.0,
                  keepalive=keepalive, budget=Budget(budget) if budget is not None else None)
    port = await proxy.start("127.0.0.1", 0)
    return proxy, f"http://127.0.0.1:{port}"


@pytest.fixture
async def raw_upstream():
    server = RawUpstream()
    await server.start()
    yield server
    await server.stop()


# --- issue: keep-alive race ------------------------------------------------------------------------------

async def _spaced_posts(base: str, spacing: float, count: int) -> list[int]:
    statuses = []
    async with aiohttp.ClientSession() as client:
        for _ in range(count):
            async with client.post(base + "/v1/completions", json={"model": "tiny-target"}) as r:
                await r.read()
                statuses.append(r.status)
            await asyncio.sleep(spacing)
    return statuses


async def test_idle_upstream_connections_retire_before_the_upstream_closes_them():
    upstream = RawUpstream(keepalive=0.4)
    await upstream.start()
    proxy, base = await start_proxy(upstream.url, Recorder(), keepalive=0.25)
    try:
        statuses = await _spaced_posts(base, 0.45, 5)
    finally:
        await proxy.close()
        await upstream.stop()
    assert statuses == [200] * 5
    assert upstream.stale == 0  # no request ever went out on a connection the upstream had closed
    assert upstream.connections == 5


async def test_on_a_pooled_connection_the_upstream_closed_a_post_gets_a_502_and_a_get_is_sent_again():
    """The keep-alive race forced (vLLM closes an idle connection as the next request arrives on it): the
    request was written, so vLLM may have read it. A POST is not sent twice, the client gets a 502 and the
    next request goes on a new connection; a GET is sent again, once, on a new connection."""
    upstream = RawUpstream(keepalive=0.2)  # shorter than the proxy's keep-alive: the race is forced
    await upstream.start()
    recorder = Recorder()
    proxy, base = await start_proxy(upstream.url, recorder, keepalive=4.0, max_observed_body=1024)
    try:
        statuses = await _spaced_posts(base, 0.3, 5)
        assert upstream.stale == 2 and upstream.answered == 3  # each reuse hit a closed connection
        gets = []
        async with aiohttp.ClientSession() as client:
            for _ in range(3):
                async with client.get(base + "/v1/models") as r:
                    await r.read()
                    gets.append(r.status)
                await asyncio.sleep(0.3)
            assert upstream.stale == 5 and upstream.answered == 6  # each GET: a stale reuse, then a new one
            # A body too large to buffer streams through: not sent twice either.
            async with client.post(base + "/v1/completions", data=b"x" * 5000) as r:
                streamed_status = r.status
    finally:
        await proxy.close()
        await upstream.stop()
    assert statuses == [200, 502, 200, 502, 200] and gets == [200] * 3
    assert streamed_status == 502 and upstream.stale == 6
    assert [(outcome.status, outcome.unattributed == "upstream_unreachable") for _, outcome in recorder.calls] == [
        (200, False), (502, True), (200, False), (502, True), (200, False), (502, True)]


async def test_spaced_requests_at_the_upstream_keepalive_never_fail():
    """aiohttp's own server with a short keep-alive (as uvicorn's 5 s, scaled down) and an API key, requests
    spaced right at it: the proxy retires its idle connections first, so none fails."""
    from fakes import HostileVllm

    hostile_vllm = HostileVllm(keepalive=0.3)
    await hostile_vllm.start()
    proxy, base = await start_proxy(hostile_vllm.url, Recorder(), keepalive=0.25)
    statuses = []
    try:
        async with aiohttp.ClientSession(headers={"Authorization": "Bearer sk-hostile"}) as client:
            for i in range(16):
                async with client.post(base + "/v1/completions", json={"model": "tiny-target"}) as r:
                    await r.read()
                    statuses.append(r.status)
                await asyncio.sleep(0.3 + (i % 5 - 2) * 0.004)
    finally:
        await proxy.close()
        await hostile_vllm.stop()
    assert statuses == [200] * 16


# --- issue: failure accounting ---------------------------------------------------------------------------

@pytest.fixture
async def counted(raw_upstream):
    """The proxy alone in front of RawUpstream, with a recorder that counts."""
    recorder = Recorder()
    proxy, base = await start_proxy(raw_upstream.url, recorder)
    counted = type("Counted", (), {"recorder": recorder, "base": base, "proxy": proxy, "upstream": raw_upstream})
    yield counted
    await proxy.close()


async def test_client_hanging_up_while_the_proxy_writes_is_client_disconnected(counted):
    async with aiohttp.ClientSession() as client:
        response = await client.post(counted.base + "/v1/completions", json={"model": "m", "stream": True},
                                     headers={"X-Mode": "big"})
        await response.content.readany()
        await asyncio.sleep(0.2)  # the proxy is now blocked writing to a client that reads nothing
        response.connection.transport.abort()
        response.close()
    await wait_for(lambda: len(counted.recorder.calls) == 1)
    await asyncio.sleep(0.2)
    assert len(counted.recorder.calls) == 1
    outcome = counted.recorder.calls[0][1]
    assert outcome.unattributed == "client_disconnected" and outcome.status == 200
    assert counted.proxy.budget.held == 0


@pytest.mark.parametrize("how", ["close", "abort", "half-close"])
async def test_client_leaving_mid_stream_is_client_disconnected(counted, how):
    """A client that closes, resets or half-closes its connection between two events: the proxy's next
    write fails, which is the client's side, whatever exception aiohttp raises for it."""
    port = int(counted.base.rsplit(":", 1)[1])
    for i in range(6):  # leave at different points between two events (50 ms apart)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Mode: slow\r\nContent-Length: 13\r\n\r\n"
                     b'{"model":"m"}')
        await reader.readuntil(b"\n\n")  # headers and the first event
        await asyncio.sleep(0.02 * i)
        if how == "abort":
            writer.transport.abort()
        else:
            if how == "half-close":  # the proxy then closes its side and abandons the exchange
                writer.write_eof()
                continue
            writer.close()
    await wait_for(lambda: len(counted.recorder.calls) == 6)
    await asyncio.sleep(0.2)
    assert [o.unattributed for _, o in counted.recorder.calls] == ["client_disconnected"] * 6


async def test_write_to_a_closing_client_is_the_clients_failure(counted, monkeypatch):
    """The exact failure of the issue, made deterministic: the client's connection is closing when the
    proxy writes the next event. Where it happened decides: writing to the client, so it is the client's
    side (never ``upstream_reset``), and the upstream connection is dropped."""
    from sidecar.tap.http1 import ResponseWriter

    writes = 0
    real_body = ResponseWriter.body

    def body(self, data):
        nonlocal writes
        writes += 1
        if writes == 3:
            self.client.transport.close()
        return real_body(self, data)

    monkeypatch.setattr(ResponseWriter, "body", body)
    async with aiohttp.ClientSession() as client:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with client.post(counted.base + "/v1/completions", json={"model": "m"},
                                   headers={"X-Mode": "slow"}) as r:
                await r.read()
    await wait_for(lambda: len(counted.recorder.calls) == 1)
    assert counted.recorder.calls[0][1].unattributed == "client_disconnected"


async def test_client_gone_before_response_headers_is_recorded(counted):
    async with aiohttp.ClientSession() as client:
        with pytest.raises(asyncio.TimeoutError):
            await client.post(counted.base + "/v1/completions", json={"model": "m", "temperature": 0},
                              headers={"X-Mode": "hold"}, timeout=aiohttp.ClientTimeout(total=0.3))
    await wait_for(lambda: len(counted.recorder.calls) == 1)
    info, outcome = counted.recorder.calls[0]
    assert outcome.status == 499 and outcome.unattributed == "client_disconnected"
    assert info.model == "m" and info.temperature == 0


async def test_client_gone_while_sending_its_body_is_recorded(counted):
    port = int(counted.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"model\":")
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()
    await wait_for(lambda: len(counted.recorder.calls) == 1)
    assert counted.recorder.calls[0][1].unattributed == "client_disconnected"
    assert counted.proxy.budget.held == 0


async def test_every_observed_request_is_recorded_exactly_once(counted):
    async with aiohttp.ClientSession() as client:
        for headers in ({}, {"X-Mode": "stream-error"}, {"X-Mode": "echo"}):
            async with client.post(counted.base + "/v1/completions", json={"model": "m"}, headers=headers) as r:
                await r.read()
        async with client.post(counted.base + "/not/observed", data=b"x") as r:
            await r.read()
        async with client.get(counted.base + "/v1/completions") as r:  # not a POST: not observed
            await r.read()
    await asyncio.sleep(0.1)
    assert len(counted.recorder.calls) == 3
    assert counted.proxy.budget.held == 0


async def test_upstream_unreachable_is_recorded_once_and_logged_rate_limited(capsys):
    from fakes import free_port

    configure_logging("json", "info")
    recorder = Recorder()
    proxy, base = await start_proxy(f"http://127.0.0.1:{free_port()}", recorder)
    try:
        async with aiohttp.ClientSession() as client:
            for _ in range(20):
                async with client.post(base + "/v1/completions", json={"model": "m"}) as r:
                    assert r.status == 502
    finally:
        await proxy.close()
    assert [o.unattributed for _, o in recorder.calls] == ["upstream_unreachable"] * 20
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert [line["event"] for line in lines].count("proxy_upstream_unreachable") == 1


# --- issue: transparency ---------------------------------------------------------------------------------

async def test_gzip_request_body_is_forwarded_exactly_and_still_observed(counted):
    import gzip

    plain = json.dumps({"model": "tiny-target", "temperature": 0.2, "prompt": "y" * 5000}).encode()
    body = gzip.compress(plain)
    async with aiohttp.ClientSession() as client:
        async with client.post(counted.base + "/v1/completions", data=body,
                               headers={"Content-Encoding": "gzip", "Content-Type": "application/json",
                                        "X-Mode": "echo"}) as r:
            assert r.status == 200
            got = await r.json()
    assert got["sha256"] == hashlib.sha256(body).hexdigest() and got["len"] == len(body)
    assert got["headers"]["content-encoding"] == "gzip"
    info = counted.recorder.calls[0][0]
    assert info.parse_error is None and info.model == "tiny-target" and info.temperature == 0.2


async def test_gzip_bomb_is_forwarded_but_not_inflated_beyond_the_limit(counted):
    import gzip

    body = gzip.compress(b"{" + b" " * (8 << 20) + b"}")
    async with aiohttp.ClientSession() as client:
        async with client.post(counted.base + "/v1/completions", data=body,
                               headers={"Content-Encoding": "gzip", "X-Mode": "echo"}) as r:
            got = await r.json()
    assert got["sha256"] == hashlib.sha256(body).hexdigest()
    assert counted.recorder.calls[0][0].parse_error == "body_too_large"


@pytest.mark.parametrize("request_line", [b"POST http://example.com/v1/completions HTTP/1.1",
                                          b"OPTIONS * HTTP/1.1", b"GET example.com:80 HTTP/1.1"])
async def test_targets_that_are_not_paths_get_a_clean_400(counted, request_line, capsys):
    configure_logging("json", "info")
    port = int(counted.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request_line + b"\r\nHost: example.com\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert head.startswith((b"HTTP/1.1 400 ", b"HTTP/1.0 400 "))
    err = capsys.readouterr().err
    lines = [json.loads(line) for line in err.splitlines() if line.strip()]  # JSON, one object per line
    assert len(lines) == 1  # aiohttp's parser rejects authority-form itself: also one line
    assert counted.upstream.answered == 0


# --- issue: smaller ones ---------------------------------------------------------------------------------

async def test_error_event_after_a_200_is_counted_as_stream_error(aiohttp_client, raw_upstream):
    registry = CollectorRegistry()
    settings = build_settings(upstream=raw_upstream.url, scrape_interval="1s", windows="10m", verdict_window="10m",
                              proxy_port=0, proxy_host="127.0.0.1", models="tiny-target")
    client = await aiohttp_client(create_app(settings, registry))
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://127.0.0.1:{client.app[PROXY_PORT]}/v1/completions", headers={"X-Mode": "stream-error"},
                          json={"model": "tiny-target", "stream": True, "temperature": 0}) as r:
            assert r.status == 200
            assert b'"engine died"' in await r.read()
    await wait_for(lambda: value(registry, "specdec_requests_unattributed_total", reason="stream_error") == 1)
    assert value(registry, "specdec_requests_unattributed_total", reason="no_usage") == 0


async def test_request_bodies_beyond_the_shared_budget_pass_through_unobserved(raw_upstream):
    """Each observed body is held once, charged to one budget for all in-flight requests; beyond the budget
    a body streams through untouched and the request is counted as body_too_large."""
    recorder = Recorder()
    proxy, base = await start_proxy(raw_upstream.url, recorder, max_observed_body=4096,
                                                     budget=6000)
    body = json.dumps({"model": "m", "prompt": "z" * 3500}).encode()
    # two at once: the first (never answered) holds its body; the second does not fit beside it
    async with aiohttp.ClientSession() as client:
        first = asyncio.create_task(client.post(base + "/v1/completions", data=body, headers={"X-Mode": "hold"}))
        await wait_for(lambda: proxy.budget.held > 0)
        async with client.post(base + "/v1/completions", data=body, headers={"X-Mode": "echo"}) as r:
            got = await r.json()
        first.cancel()
    await wait_for(lambda: len(recorder.calls) == 2)
    await proxy.close()
    assert got["sha256"] == hashlib.sha256(body).hexdigest()
    assert [info.parse_error for info, _ in recorder.calls] == ["body_too_large", None]
    assert proxy.budget.held == 0
