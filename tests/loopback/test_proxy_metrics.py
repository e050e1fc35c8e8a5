"""The proxy's own RED families on loopback: every request on every path by status class, the failures it
answered itself by reason (with the status each gets), and the sidecar's own time per relayed request."""

from __future__ import annotations

import asyncio
import socket

import pytest
from prometheus_client import CollectorRegistry

from fakes import RawUpstream, Recorder, Scripted, free_port, wait_for
from sidecar.tap.proxy import Proxy
from sidecar.tap.proxy_metrics import ERROR_REASONS, ProxyMetrics

pytestmark = pytest.mark.timeout(60)

COMPLETION = b'{"id":"c","object":"text_completion","choices":[{"index":0,"text":"x"}]}'


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def classes(registry: CollectorRegistry) -> dict[str, float]:
    return {c: value(registry, "specdec_proxy_requests_total", status_class=c)
            for c in ("2xx", "3xx", "4xx", "5xx")}


def errors(registry: CollectorRegistry) -> dict[str, float]:
    return {r: v for r in ERROR_REASONS if (v := value(registry, "specdec_proxy_errors_total", reason=r))}


async def start(upstream_url: str, connect_timeout: float = 2.0, **kw) -> tuple[Proxy, int, CollectorRegistry]:
    registry = CollectorRegistry()
    proxy = Proxy(upstream_url, Recorder(), max_observed_body=1 << 20, connect_timeout=connect_timeout,
                  keepalive=4.0, metrics=ProxyMetrics(registry), **kw)
    return proxy, await proxy.start("127.0.0.1", 0), registry


async def exchange(port: int, raw: bytes, timeout: float = 10.0) -> bytes:
    """Send *raw* on a new connection and read until the proxy closes it (every request here says close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(), timeout)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


def post(path: bytes = b"/v1/completions", body: bytes = b'{"model":"m","prompt":"x"}', mode: bytes = b"") -> bytes:
    extra = b"X-Mode: " + mode + b"\r\n" if mode else b""
    return (b"POST %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%sContent-Length: %d\r\n\r\n%s"
            % (path, extra, len(body), body))


async def scripted(answer) -> Scripted:
    upstream = Scripted(answer)
    await upstream.start()
    return upstream


async def test_every_request_on_every_path_is_counted_once_by_status_class():
    async def answer(line: bytes, headers, body, writer) -> bool:
        status = b"500 Internal Server Error" if b"/fail" in line else b"200 OK"
        writer.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                     % (status, len(COMPLETION), COMPLETION))
        return True

    upstream = await scripted(answer)
    proxy, port, registry = await start(upstream.url)
    try:
        assert value(registry, "specdec_proxy_requests_total", status_class="5xx") == 0  # exported from the start
        assert errors(registry) == {} and all(
            registry.get_sample_value("specdec_proxy_errors_total", {"reason": r}) == 0 for r in ERROR_REASONS)
        answers = [
            await exchange(port, post()),                                               # observed endpoint
            await exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            await exchange(port, b"GET /health?x=1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),
            await exchange(port, post(b"/fail")),                                        # vLLM's own 500
            await exchange(port, b"GET http://elsewhere/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"),  # not a path: 400
            await exchange(port, b"GARBAGE\x01 / HTTP/1.1\r\n\r\n"),                     # malformed head: 400
            await exchange(port, post().replace(b"Host: x", b"Host: x\r\nExpect: bogus")),  # 417
        ]
        await wait_for(lambda: sum(classes(registry).values()) == 7, what="seven requests counted")
    finally:
        await proxy.close()
        await upstream.stop()
    assert [a[:12] for a in answers] == [b"HTTP/1.1 200", b"HTTP/1.1 200", b"HTTP/1.1 200", b"HTTP/1.1 500",
                                         b"HTTP/1.1 400", b"HTTP/1.1 400", b"HTTP/1.1 417"]
    assert classes(registry) == {"2xx": 3, "3xx": 0, "4xx": 3, "5xx": 1}
    assert errors(registry) == {}  # vLLM's 500 is vLLM's: not an error of the proxy
    # the sidecar's own time is observed once per relayed response (the four vLLM answered), not for its own
    assert value(registry, "specdec_proxy_overhead_seconds_count") == 4
    assert 0 < value(registry, "specdec_proxy_overhead_seconds_sum") < 4 * 0.25


async def test_the_overhead_excludes_the_time_vllm_takes():
    """vLLM holds the answer 0.4 s and sends its head 0.3 s before its body: neither is the sidecar's time,
    which stays in the lowest buckets, while the client waited at least 0.4 s."""
    async def answer(line, headers, body, writer) -> bool:
        await asyncio.sleep(0.4)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.3)
        event = b'data: {"choices":[{"index":0,"text":"x"}]}\n\n'
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(event), event))
        return True

    upstream = await scripted(answer)
    proxy, port, registry = await start(upstream.url)
    loop = asyncio.get_running_loop()
    try:
        began = loop.time()
        got = await exchange(port, post(body=b'{"model":"m","stream":true}'))
        waited = loop.time() - began
    finally:
        await proxy.close()
        await upstream.stop()
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"0\r\n\r\n") and waited >= 0.7
    assert value(registry, "specdec_proxy_overhead_seconds_count") == 1
    assert value(registry, "specdec_proxy_overhead_seconds_sum") < 0.1
    assert value(registry, "specdec_proxy_overhead_seconds_bucket", le="0.05") == 1


async def test_connect_refused_is_a_502_counted_by_reason():
    proxy, port, registry = await start(f"http://127.0.0.1:{free_port()}")
    try:
        got = [await exchange(port, post()), await exchange(port, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
                                                                  b"Connection: close\r\n\r\n")]
    finally:
        await proxy.close()
    assert all(g.startswith(b"HTTP/1.1 502 Bad Gateway") and b'"code": 502' in g for g in got)
    assert errors(registry) == {"connect_refused": 2}
    assert classes(registry)["5xx"] == 2 and value(registry, "specdec_proxy_overhead_seconds_count") == 0


async def test_a_connect_timeout_is_a_504_counted_by_reason():
    """A listener whose accept queue is full (vLLM's event loop stuck) drops new connection attempts: the
    proxy gives up after its connect timeout and answers 504, as nginx does."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=0)
    port_up = listener.getsockname()[1]
    fillers = []
    for _ in range(8):  # fill the accept queue; later attempts are not answered
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(("127.0.0.1", port_up))
        except BlockingIOError:
            pass
        fillers.append(sock)
    proxy, port, registry = await start(f"http://127.0.0.1:{port_up}", connect_timeout=0.3)
    try:
        got = await exchange(port, post())
    finally:
        await proxy.close()
        for sock in fillers:
            sock.close()
        listener.close()
    assert got.startswith(b"HTTP/1.1 504 Gateway Timeout") and b'"code": 504' in got
    assert errors(registry) == {"connect_timeout": 1} and classes(registry)["5xx"] == 1


async def test_vllm_closing_before_its_answer_is_upstream_closed_and_mid_answer_upstream_reset():
    async def answer(line, headers, body, writer) -> bool:
        if b"/closed" in line:
            writer.transport.abort()  # read the request, answered nothing
            return False
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\ndata:\r\n")
        await writer.drain()
        writer.transport.abort()  # broke off mid-body
        return False

    upstream = await scripted(answer)
    proxy, port, registry = await start(upstream.url)
    try:
        closed = await exchange(port, post(b"/v1/completions/closed"))
        reset = await exchange(port, post())
        await wait_for(lambda: sum(classes(registry).values()) == 2)
    finally:
        await proxy.close()
        await upstream.stop()
    assert closed.startswith(b"HTTP/1.1 502")
    assert reset.startswith(b"HTTP/1.1 200") and not reset.endswith(b"0\r\n\r\n")  # a broken response
    assert len(upstream.requests) == 2  # nothing was sent twice
    assert errors(registry) == {"upstream_closed": 1, "upstream_reset": 1}
    # by the status the client got: the 502, and the 200 whose body broke off
    assert classes(registry)["5xx"] == 1 and classes(registry)["2xx"] == 1


async def test_clients_closed_at_the_buffer_cap_are_counted():
    from test_proxy_limits import reset_by_peer, stalled_clients

    async with RawUpstream(big=64 * 1024 * 1024) as upstream:
        proxy, port, registry = await start(upstream.url, max_buffered_bytes=200 * 1024)
        socks = await stalled_clients(port, 4)
        try:
            await wait_for(lambda: value(registry, "specdec_proxy_errors_total", reason="buffered_bytes_cap") >= 1,
                           what="a stalled client closed at the cap")
            await asyncio.sleep(0.5)
            closed = sum(reset_by_peer(sock) for sock in socks)
            assert errors(registry) == {"buffered_bytes_cap": closed}
            # each closed client's request ended; it had its 200 head already
            assert classes(registry)["2xx"] == closed
        finally:
            for sock in socks:
                sock.close()
            await proxy.close()
