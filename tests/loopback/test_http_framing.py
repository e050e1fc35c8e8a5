"""HTTP/1.1 on both hops of the proxy, on raw sockets: what clients and servers other than the polite ones do.

Pipelined requests, HTTP/1.0 clients, HEAD, chunked request bodies too large to hold, oversized heads,
bodies delimited by the upstream closing its connection, informational responses, credentials in the
upstream URL, and both directions of back-pressure. The upstream here is scripted per test: it records each
request exactly as it arrived and answers with the bytes the test gives it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re

import pytest

from fakes import Recorder, Scripted, read_chunked, read_head
from sidecar.tap.proxy import Proxy

pytestmark = pytest.mark.timeout(60)


async def ok(line, headers, body, writer) -> bool:
    data = b'{"path":"' + line.split(b" ")[1] + b'","len":%d}' % len(body)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    return True


async def read_response(reader: asyncio.StreamReader, head_only: bool = False) -> tuple[bytes, dict, bytes]:
    """One response off a raw connection: (status line, headers, decoded body)."""
    status, headers = await read_head(reader)
    if head_only or status.split(b" ")[1] in (b"204", b"304"):
        return status, headers, b""
    if "content-length" in headers:
        return status, headers, await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding") == "chunked":
        return status, headers, await read_chunked(reader)
    return status, headers, await asyncio.wait_for(reader.read(), 10)  # to the close


@pytest.fixture
async def proxied():
    """``proxied(answer, **proxy_kwargs)`` -> (upstream, proxy, port, recorder); everything stopped after."""
    started = []

    async def start(answer=ok, upstream_url=None, **kw):
        upstream = await Scripted(answer).__aenter__()
        recorder = Recorder()
        proxy = Proxy(upstream_url or f"http://127.0.0.1:{upstream.port}", recorder,
                      max_observed_body=kw.pop("max_observed_body", 1 << 20), connect_timeout=2.0,
                      keepalive=kw.pop("keepalive", 4.0))
        port = await proxy.start("127.0.0.1", 0)
        started.append((upstream, proxy))
        return upstream, proxy, port, recorder

    yield start
    for upstream, proxy in started:
        await proxy.close()
        await upstream.__aexit__()


async def test_pipelined_requests_are_answered_in_order_on_one_connection(proxied):
    upstream, _, port, recorder = await proxied()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"model":"m"}'
    writer.write(b"".join(b"POST /v1/completions?i=%d HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                          % (i, len(body), body) for i in range(5)))
    for i in range(5):
        status, _, got = await read_response(reader)
        assert status == b"HTTP/1.1 200 OK"
        assert got == b'{"path":"/v1/completions?i=%d","len":13}' % i
    writer.close()
    assert len(recorder.calls) == 5 and upstream.connections == 1


async def test_http10_client_gets_a_stream_delimited_by_the_close(proxied):
    async def stream(line, headers, body, writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        for i in range(3):
            event = b'data: {"choices":[{"text":"%d"}]}\n\n' % i
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        writer.write(b"0\r\n\r\n")
        return True

    _, _, port, _ = await proxied(stream)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
    status, headers, body = await read_response(reader)
    assert status.startswith(b"HTTP/1.0 200")
    assert "transfer-encoding" not in headers and headers.get("connection") == "close"
    assert body == b"".join(b'data: {"choices":[{"text":"%d"}]}\n\n' % i for i in range(3))


async def test_head_keeps_the_length_sends_no_body_and_the_connection_goes_on(proxied):
    async def head_then_ok(line, headers, body, writer) -> bool:
        if line.startswith(b"HEAD"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1234\r\n\r\n")
            return True
        return await ok(line, headers, body, writer)

    _, _, port, _ = await proxied(head_then_ok)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await read_response(reader, head_only=True)
    assert status == b"HTTP/1.1 200 OK" and headers["content-length"] == "1234"
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # same connection: nothing stray before it
    status, _, body = await read_response(reader)
    assert status == b"HTTP/1.1 200 OK" and body == b'{"path":"/v1/models","len":0}'
    writer.close()


async def test_chunked_body_beyond_the_observed_limit_streams_through_exactly(proxied):
    async def echo(line, headers, body, writer) -> bool:
        data = hashlib.sha256(body).hexdigest().encode() + b" %d %s" % (len(body), headers.get(
            "transfer-encoding", "-").encode())
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
        return True

    upstream, _, port, recorder = await proxied(echo, max_observed_body=4096)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    parts = [bytes([65 + i % 26]) * 3000 for i in range(40)]  # 120 KB in 40 chunks
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
    for part in parts:
        writer.write(b"%x\r\n%s\r\n" % (len(part), part))
        await writer.drain()
        await asyncio.sleep(0.002)
    writer.write(b"0\r\n\r\n")
    _, _, body = await read_response(reader)
    whole = b"".join(parts)
    assert body == hashlib.sha256(whole).hexdigest().encode() + b" %d chunked" % len(whole)
    assert recorder.calls[0][0].parse_error == "body_too_large"
    writer.close()


async def test_small_chunked_body_is_read_whole_observed_and_sent_with_its_length(proxied):
    upstream, _, port, recorder = await proxied()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = b'{"model":"m","temperature":0.7}'
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                 + b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 5]), body[i:i + 5]) for i in range(0, len(body), 5))
                 + b"0\r\n\r\n")
    status, _, _ = await read_response(reader)
    writer.close()
    assert status == b"HTTP/1.1 200 OK"
    _, headers, got = upstream.requests[0]
    assert got == body and headers["content-length"] == str(len(body)) and "transfer-encoding" not in headers
    assert recorder.calls[0][0].temperature == 0.7


async def test_oversized_head_gets_a_431_and_garbage_a_400(proxied):
    _, _, port, _ = await proxied()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n")
    status, _, _ = await read_response(reader)
    assert status.startswith(b"HTTP/1.1 431")
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n")  # a TLS hello, say
    status, _, _ = await read_response(reader)
    assert status.startswith(b"HTTP/1.1 400")
    writer.close()


async def test_body_delimited_by_the_upstream_close_reaches_the_client_whole(proxied):
    async def to_the_close(line, headers, body, writer) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for i in range(20):
            writer.write(b"line %d\n" % i)
            await writer.drain()
        return False

    _, _, port, _ = await proxied(to_the_close)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, body = await read_response(reader)
    assert status == b"HTTP/1.1 200 OK" and headers["transfer-encoding"] == "chunked"
    assert body == b"".join(b"line %d\n" % i for i in range(20))
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # the client's connection goes on
    status, _, _ = await read_response(reader)
    assert status == b"HTTP/1.1 200 OK"
    writer.close()


async def test_informational_responses_are_not_relayed_the_final_one_is(proxied):
    async def early_hints(line, headers, body, writer) -> bool:
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
        return await ok(line, headers, body, writer)

    _, _, port, _ = await proxied(early_hints)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = await read_response(reader)
    assert status == b"HTTP/1.1 200 OK" and body == b'{"path":"/v1/models","len":0}'
    writer.close()


async def test_credentials_in_the_upstream_url_become_basic_auth_unless_the_client_sends_its_own(proxied):
    started = await proxied()
    upstream = started[0]
    _, _, port, _ = await proxied(upstream_url=f"http://user:p%40ss@127.0.0.1:{upstream.port}/")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    await read_response(reader)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-1\r\n\r\n")
    await read_response(reader)
    writer.close()
    assert upstream.requests[0][1]["authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert upstream.requests[1][1]["authorization"] == "Bearer sk-1"
    assert upstream.requests[0][1]["host"] == f"127.0.0.1:{upstream.port}"


async def test_header_names_values_and_order_reach_vllm_as_sent(proxied):
    upstream, _, port, _ = await proxied()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions?a=%2F&b HTTP/1.1\r\nHost: x\r\nX-Trace-ID: AbC\r\nx-lower: 1\r\n"
                 b"Connection: keep-alive, X-Hop\r\nX-Hop: gone\r\nContent-Length: 2\r\n\r\n{}")
    await read_response(reader)
    writer.close()
    line, headers, _ = upstream.requests[0]
    assert line == b"POST /v1/completions?a=%2F&b HTTP/1.1"
    assert "x-hop" not in headers and "connection" not in headers
    assert headers["x-trace-id"] == "AbC" and headers["x-lower"] == "1"


async def test_a_slow_upstream_pauses_reading_the_clients_body(proxied):
    """Back-pressure towards the client: an upstream that reads the body slowly must not make the proxy
    hold what the client sends faster (it stops reading the client instead)."""
    gate = asyncio.Event()
    held: list[int] = []

    class Slow(Scripted):
        async def _handle(self, reader, writer):
            await reader.readuntil(b"\r\n\r\n")
            await gate.wait()  # reads nothing of the body until the test has measured
            got = 0
            while got < 64 * 1024 * 1024:
                chunk = await reader.read(1 << 20)
                if not chunk:
                    break
                got += len(chunk)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            writer.close()

    upstream = await Slow(ok).__aenter__()
    proxy = Proxy(f"http://127.0.0.1:{upstream.port}", Recorder(), max_observed_body=4096, connect_timeout=2.0,
                  keepalive=4.0)
    port = await proxy.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (64 * 1024 * 1024))
        sent = 0
        piece = b"z" * (1 << 20)

        async def send() -> None:
            nonlocal sent
            while sent < 64 * 1024 * 1024:
                writer.write(piece)
                await writer.drain()
                sent += len(piece)

        sender = asyncio.create_task(send())
        await asyncio.sleep(1.5)
        held.append(sent)
        await asyncio.sleep(1.0)
        held.append(sent)
        # The client's sends stall once the socket buffers on the way are full: far below 64 MB, and no growth.
        assert held[0] < 48 * 1024 * 1024 and held[1] == held[0], held
        gate.set()
        await asyncio.wait_for(sender, 30)
        status, _, body = await read_response(reader)
        assert status == b"HTTP/1.1 200 OK" and body == b"ok"
        writer.close()
    finally:
        await proxy.close()
        await upstream.__aexit__()


async def test_upstream_answer_without_a_valid_status_line_is_a_502(proxied):
    async def garbage(line, headers, body, writer) -> bool:
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
        return False

    _, _, port, recorder = await proxied(garbage)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
    status, _, body = await read_response(reader)
    writer.close()
    assert status.startswith(b"HTTP/1.1 502") and re.search(rb'"type": ?"upstream_unavailable"', body)
    assert recorder.calls[0][1].unattributed == "upstream_unreachable"


async def test_an_answer_before_the_body_ended_never_lets_the_rest_reach_another_request():
    """vLLM may answer (413, 401...) before it read a streamed body. The rest of that body must not go out
    on the pooled connection where the next request would be sent: that connection is dropped."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen.append(head.split(b"\r\n")[0])
                if head.startswith(b"POST"):  # answers at once, reads none of the body
                    writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
                else:
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    proxy = Proxy(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", Recorder(), max_observed_body=1024,
                  connect_timeout=2.0, keepalive=4.0)
    port = await proxy.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"a" * 5000)
        status, _, _ = await read_response(reader)
        assert status.startswith(b"HTTP/1.1 413")
        try:  # the body goes on after the answer (until the proxy, which will not read it, closes)
            for _ in range(10):
                writer.write(b"GET /v1/stray HTTP/1.1\r\n\r\n" * 20)
                await writer.drain()
        except ConnectionError:
            pass
        second_reader, second_writer = await asyncio.open_connection("127.0.0.1", port)
        second_writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
        status, _, body = await read_response(second_reader)
        assert status == b"HTTP/1.1 200 OK" and body == b"ok"
        second_writer.close()
        writer.close()
        await asyncio.sleep(0.1)
        assert not [line for line in seen if b"stray" in line], seen
    finally:
        await proxy.close()
        server.close()
