"""What the proxy must not do, on loopback: send vLLM a generation twice, use a pooled connection vLLM has
closed, or hold unbounded memory for clients that stop reading."""

from __future__ import annotations

import asyncio
import errno
import socket
import threading
import time

import pytest

from prometheus_client import CollectorRegistry

from fakes import Recorder, wait_for
from sidecar.tap.proxy import Proxy
from sidecar.tap.proxy_metrics import ProxyMetrics
from sidecar.tap.upstream import UpstreamPool

pytestmark = pytest.mark.timeout(60)

COMPLETION = b'{"id":"c","object":"text_completion","choices":[{"index":0,"text":"x"}]}'


def answer(body: bytes = COMPLETION) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body


class DiesAfterReading:
    """An upstream that answers requests on a keep-alive connection until told to die: the next request it
    reads whole, counts, and then drops the connection unanswered (vLLM killed mid-generation). Every
    request it read is kept in ``seen``, so a test can tell how often vLLM received one."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.die_on_next = False
        self.server: asyncio.base_events.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.seen.append(head.split(b"\r\n")[0] + b" " + body)
                if self.die_on_next:
                    self.die_on_next = False
                    writer.transport.abort()
                    return
                writer.write(answer())
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> DiesAfterReading:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.close()


async def post(port: int, body: bytes, path: bytes = b"/v1/completions") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (path, len(body), body))
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    finally:
        writer.close()


async def test_a_post_vllm_read_before_it_died_is_not_sent_again():
    """vLLM reads the request on a pooled connection and dies: it may have started generating, so the request
    is not sent a second time (that would run the generation twice); the client gets the 502."""
    async with DiesAfterReading() as upstream:
        recorder = Recorder()
        registry = CollectorRegistry()
        proxy = Proxy(f"http://127.0.0.1:{upstream.port}", recorder, max_observed_body=1 << 20,
                      connect_timeout=2.0, keepalive=4.0, metrics=ProxyMetrics(registry))
        port = await proxy.start("127.0.0.1", 0)
        try:
            assert (await post(port, b'{"model":"m","prompt":"first"}')).startswith(b"HTTP/1.1 200")
            await wait_for(lambda: len(recorder.calls) == 1)  # the exchange ended: its connection is pooled
            upstream.die_on_next = True  # the proxy's pooled connection carries the next request
            head = await post(port, b'{"model":"m","prompt":"second"}')
            await wait_for(lambda: len(recorder.calls) == 2)
        finally:
            await proxy.close()
    assert head.startswith(b"HTTP/1.1 502")
    assert [line for line in upstream.seen if b'"second"' in line] == [
        b'POST /v1/completions HTTP/1.1 {"model":"m","prompt":"second"}']
    outcome = recorder.calls[1][1]
    assert outcome.status == 502 and outcome.unattributed == "upstream_unreachable"
    # the proxy's own count: one 502 it answered because vLLM closed before answering
    assert registry.get_sample_value("specdec_proxy_errors_total", {"reason": "upstream_closed"}) == 1
    assert registry.get_sample_value("specdec_proxy_requests_total", {"status_class": "5xx"}) == 1


class ThreadedKeepAlive:
    """A keep-alive upstream on a thread of its own, so it can close a connection while the test's event loop
    is not running: the close then reaches the proxy's socket before the loop has read it."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.close_now = threading.Event()
        self.closed = threading.Event()
        self.requests = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            conn.recv(65536)  # one request (a GET: its head is all of it)
            self.requests += 1
            conn.sendall(answer())
            self.close_now.wait(10)
        self.closed.set()  # the listener stays open: a new connection is taken by the kernel's backlog


async def test_a_pooled_connection_vllm_closed_while_idle_is_not_used():
    upstream = ThreadedKeepAlive()
    pool = UpstreamPool("127.0.0.1", upstream.port, keepalive=10.0, connect_timeout=2.0)

    class Sink:
        def body(self, data: bytes) -> None:
            pass

    conn = await pool.acquire()
    head = await conn.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", None, no_body=False)
    await conn.attach(Sink())
    assert head.status == 200 and conn.reusable
    pool.release(conn)
    upstream.close_now.set()
    assert upstream.closed.wait(5)
    time.sleep(0.05)  # the FIN is in the proxy's socket; the event loop has not run since
    again = await pool.acquire()
    try:
        assert again is not conn and not again.reused and conn.closed
    finally:
        again.close()
        pool.close()
        upstream.listener.close()


async def test_a_healthy_pooled_connection_is_used_again():
    async with DiesAfterReading() as upstream:
        pool = UpstreamPool("127.0.0.1", upstream.port, keepalive=10.0, connect_timeout=2.0)

        class Sink:
            def body(self, data: bytes) -> None:
                pass

        conn = await pool.acquire()
        await conn.send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", None, no_body=False)
        await conn.attach(Sink())
        pool.release(conn)
        again = await pool.acquire()
        assert again is conn and again.reused
        again.close()
        pool.close()


async def stalled_clients(port: int, count: int) -> list[socket.socket]:
    """*count* clients that each ask for a large event stream and then read nothing."""
    loop = asyncio.get_running_loop()
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        body = b'{"model":"m","stream":true}'
        await loop.sock_sendall(sock, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Mode: big\r\n"
                                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        socks.append(sock)
    return socks


def reset_by_peer(sock: socket.socket) -> bool:
    """The proxy reset this client's connection (a stalled one still has unread data waiting)."""
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET:
        return True
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


@pytest.mark.parametrize("cap", [200 * 1024, None])
async def test_clients_that_stop_reading_are_closed_at_the_global_cap(cap):
    """Four clients stop reading large streams. A stalled connection holds more than the write buffer's
    high-water mark (64 KiB) and at most that plus one read, so four pass a 200 KiB cap and one fits: the
    connections holding the most are closed until the rest fit, and their requests are recorded as the
    client's failure. Without a cap all four stay open, holding more than the cap."""
    from fakes import RawUpstream

    async with RawUpstream(big=64 * 1024 * 1024) as upstream:
        recorder = Recorder()
        proxy = Proxy(upstream.url, recorder, max_observed_body=1 << 20, connect_timeout=2.0, keepalive=4.0,
                      max_buffered_bytes=cap)
        port = await proxy.start("127.0.0.1", 0)
        socks = await stalled_clients(port, 4)
        try:
            if cap is not None:
                await wait_for(lambda: len(recorder.calls) >= 1, what="a stalled client closed at the cap")
                await asyncio.sleep(0.5)  # the rest stay stalled; nothing more closes
                assert proxy.server.buffered <= cap
                closed = len(recorder.calls)
                assert 1 <= closed <= 3
                assert all(o.unattributed == "client_disconnected" and o.status == 200 for _, o in recorder.calls)
                assert proxy.server.connections == 4 - closed
                assert sum(reset_by_peer(sock) for sock in socks) == closed
            else:
                await wait_for(lambda: proxy.server.buffered > 4 * 64 * 1024, what="four stalled clients")
                await asyncio.sleep(0.5)
                assert recorder.calls == [] and proxy.server.connections == 4
                assert not any(reset_by_peer(sock) for sock in socks)
        finally:
            for sock in socks:
                sock.close()
            await proxy.close()
        assert proxy.budget.held == 0
