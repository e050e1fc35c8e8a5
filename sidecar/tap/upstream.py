"""The proxy's HTTP/1.1 client of vLLM: a keep-alive pool of protocol-level connections.

A response is parsed by llhttp (``httptools``) as it arrives; its body is handed to a *sink* from the
socket's read callback, so relaying an event costs one read, one parse and one write, with no task to wake
and no stream buffer in between. Back-pressure is the transports' own: the sink pauses this connection's
reading while the client's write buffer is full.

Idle connections retire after ``keepalive`` seconds, below uvicorn's 5 s (vLLM's
``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``), so a request is not sent on a connection vLLM is closing. A pooled
connection is checked once more when it is taken: one that vLLM closed (or sent anything on) while it was
idle is dropped, not used.

A failure is classified by the connection where it happens, as the ``stage`` of the ``UpstreamError``: no
connection (``connect``), the connection was found closed before any byte of the request was written
(``unsent``: vLLM provably never received the request), the request went out and nothing came back
(``no_response``: vLLM may have read it), or the response broke off or was malformed (``response``).
"""

from __future__ import annotations

import asyncio
import base64
import select
import ssl
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Protocol
from urllib.parse import unquote, urlsplit

import httptools

from sidecar.tap.http1 import ReadBuffer, end_to_end

if TYPE_CHECKING:
    from sidecar.tap.http1 import Request


CONNECT = "connect"
UNSENT = "unsent"
NO_RESPONSE = "no_response"
RESPONSE = "response"


# Why a connection could not be made, as the proxy's error counter names it (``ProxyMetrics``).
CONNECT_REFUSED = "connect_refused"  # refused, or any other error of the connect (unreachable, reset)
CONNECT_TIMEOUT = "connect_timeout"


class UpstreamError(Exception):
    """The upstream connection failed at ``stage``: ``connect``, ``unsent``, ``no_response`` or ``response``
    (the module's docstring says what each means); a ``connect`` failure also says why (``cause``:
    ``connect_timeout``, or ``connect_refused`` for any other)."""

    def __init__(self, message: str, stage: str, cause: str | None = None) -> None:
        super().__init__(message)
        self.stage = stage
        self.cause = cause


class Sink(Protocol):
    def body(self, data: bytes) -> None: ...


class Head:
    """A response's status line and headers as received (names and values raw bytes, order kept)."""

    __slots__ = ("status", "reason", "headers", "framed")

    def __init__(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        # Content-Length or chunked: the end of the body is in the stream, not the connection's close.
        self.framed = False
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length" or (lower == b"transfer-encoding" and b"chunked" in value.lower()):
                self.framed = True

    def get(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


# What a poll of an idle connection's socket reports when vLLM closed it, reset it or wrote to it.
_CLOSED_OR_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


# Host is set for the upstream hop; Content-Length is recomputed from the buffered body (the same value) or
# kept for a streamed one; Expect was already answered to the client (the proxy sends its 100 Continue), so
# repeating it upstream could stall the body.
REQUEST_ONLY_DROP = frozenset({b"host", b"content-length", b"expect"})


class Origin:
    """The upstream as its URL names it, and the request head each request gets for it."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the proxy forwards to http(s)://host[:port] only, not {url!r}")
        self.hostname = parts.hostname
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.port = parts.port or (443 if self.tls is not None else 80)
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6 literal
        self.host_header = (host if parts.port is None else f"{host}:{self.port}").encode()
        self.prefix = parts.path.rstrip("/").encode()
        # Credentials in the URL: sent as Basic auth when the client sends no Authorization.
        self.basic: bytes | None = None
        if parts.username is not None:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self.basic = b"Basic " + base64.b64encode(token)

    def request_head(self, request: Request, body: bytes | None) -> tuple[bytes, bool]:
        """The request line and headers for the upstream, and whether a streamed body goes chunked. *body*:
        the whole body when it was buffered, None when it streams through."""
        lines = [request.method + b" " + self.prefix + request.target + b" HTTP/1.1", b"Host: " + self.host_header]
        lines += end_to_end(request.headers, REQUEST_ONLY_DROP)
        if self.basic is not None and request.header(b"authorization") is None:
            lines.append(b"Authorization: " + self.basic)
        chunks = False
        if body is not None:
            if body or request.has_body or request.length == 0:
                lines.append(b"Content-Length: %d" % len(body))
        elif request.length is not None:
            lines.append(b"Content-Length: %d" % request.length)  # streamed through: same framing
        elif request.chunked:
            lines.append(b"Transfer-Encoding: chunked")
            chunks = True
        return b"\r\n".join(lines) + b"\r\n\r\n", chunks


class UpstreamConnection(asyncio.BufferedProtocol):
    """One connection to vLLM, carrying one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self.reset(reused=False)

    def reset(self, reused: bool) -> None:
        """Ready for a new exchange; *reused*: the connection carried one before (it came from the pool)."""
        self.reused = reused
        self._parser = httptools.HttpResponseParser(self)
        self._status_reason = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_waiter: asyncio.Future[Head] | None = None
        self._done: asyncio.Future[None] | None = None
        self._sink: Sink | None = None
        self._pending: list[bytes] = []
        self._batch: list[bytes] | None = None
        self._no_body = False
        self._head: Head | None = None
        self._keep = False  # vLLM keeps the connection alive after this response
        self.sent = False  # some byte of the request was handed to the socket
        self.got_bytes = False
        # perf_counter() when the request was handed to the socket, and when the response's first byte was
        # read: the ends of the sidecar's own time on this hop (``ProxyMetrics.overhead``).
        self.sent_at = 0.0
        self.first_byte_at = 0.0
        self.complete = False
        # Told when the request body's write buffer fills and drains (the proxy then pauses reading the client).
        self.on_write_paused: Callable[[bool], None] | None = None

    @property
    def stage(self) -> str:
        """Where this exchange stands, for a failure now: ``unsent``, ``no_response`` or ``response``."""
        return UNSENT if not self.sent else NO_RESPONSE if not self.got_bytes else RESPONSE

    # --- asyncio callbacks -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._pool.buffer.view

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._pool.buffer.view[:nbytes])

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._pool.forget(self)
        if self.complete:
            return
        head, done = self._head_waiter, self._done
        if self._head is None:
            if head is not None and not head.done():
                head.set_exception(UpstreamError(f"closed before the response: {exc!r}", self.stage))
            return
        if done is None or done.done():
            return
        if exc is None and not self._head.framed:  # a body delimited by the connection's close: it ended
            self.complete = True
            done.set_result(None)
            return
        done.set_exception(UpstreamError(f"closed mid-response: {exc!r}", RESPONSE))

    def data_received(self, data: bytes | memoryview) -> None:
        if self._head_waiter is None:  # bytes while idle: the connection is not in a state to reuse
            self.transport.close()  # type: ignore[union-attr]
            return
        if not self.got_bytes:
            self.got_bytes = True
            self.first_byte_at = perf_counter()
        # The body pieces of one read (a chunk per event with vLLM) go to the sink as one: one write to the
        # client and one pass of the observer per read, not per event.
        batch: list[bytes] = []
        self._batch = batch
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("upgrade answered without an upgrade request")
        except httptools.HttpParserError as error:
            self._fail(f"malformed response: {error}")
        finally:
            self._batch = None
            if batch:
                body = batch[0] if len(batch) == 1 else b"".join(batch)
                if self._sink is None:
                    self._pending.append(body)
                    if not self.closed:
                        self.transport.pause_reading()  # type: ignore[union-attr]
                else:
                    self._sink.body(body)

    def pause_writing(self) -> None:
        if self.on_write_paused is not None:
            self.on_write_paused(True)

    def resume_writing(self) -> None:
        if self.on_write_paused is not None:
            self.on_write_paused(False)

    # --- llhttp callbacks --------------------------------------------------------------------------------

    def on_status(self, status: bytes) -> None:
        self._status_reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.complete:  # bytes beyond the response: never reuse this connection
            self._keep = False
            return
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # informational (100 Continue, 103 Early Hints): not relayed
            self._status_reason = bytearray()
            self._headers = []
            return
        self._head = Head(status, bytes(self._status_reason), self._headers)
        if self._no_body:  # HEAD: llhttp cannot be told there is no body; the exchange ends here
            self.complete = True
            self._keep = False
        if self._head_waiter is not None and not self._head_waiter.done():
            self._head_waiter.set_result(self._head)
        if self._no_body and self._done is not None and not self._done.done():
            self._done.set_result(None)

    def on_body(self, data: bytes) -> None:
        if not self.complete:
            self._batch.append(data)  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        if self._head is None or self.complete:  # an informational response ended, or HEAD already done
            return
        self.complete = True
        self._keep = self._parser.should_keep_alive()
        if self._done is not None and not self._done.done():
            self._done.set_result(None)

    # --- the exchange ------------------------------------------------------------------------------------

    def _fail(self, why: str) -> None:
        self._keep = False
        error = UpstreamError(why, self.stage)
        if self._head is None:
            if self._head_waiter is not None and not self._head_waiter.done():
                self._head_waiter.set_exception(error)
        elif self._done is not None and not self._done.done():
            self._done.set_exception(error)
        self.transport.close()  # type: ignore[union-attr]

    def send(self, request_head: bytes, body: bytes | None, no_body: bool) -> asyncio.Future[Head]:
        """Send a request (head and, when buffered, its body) and return the future response head."""
        loop = self._pool.loop
        self._head_waiter = loop.create_future()
        self._done = loop.create_future()
        self._no_body = no_body
        transport = self.transport
        if transport is None or transport.is_closing() or self.closed:
            self._head_waiter.set_exception(UpstreamError("connection closed before the request", UNSENT))
            return self._head_waiter
        transport.write(request_head + body if body else request_head)
        self.sent_at = perf_counter()
        # A write the socket refused at once (the connection was reset while idle) closes the transport
        # before returning, with none of the request sent: its failure stays ``unsent``.
        self.sent = not transport.is_closing()
        return self._head_waiter

    def write_body(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def attach(self, sink: Sink) -> asyncio.Future[None]:
        """From now on the body goes to *sink*; returns the future that resolves when the response ended."""
        self._sink = sink
        pending, self._pending = self._pending, []
        for data in pending:
            sink.body(data)
        if not self.closed and self.transport is not None:
            self.transport.resume_reading()
        assert self._done is not None
        return self._done

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    @property
    def reusable(self) -> bool:
        return self.complete and self._keep and not self.closed and not self._pending

    def park(self, keepalive: float) -> None:
        """Idle in the pool after a clean exchange: closed after *keepalive* seconds unless taken first."""
        self.on_write_paused = None
        self._head_waiter = None
        self._idle_timer = self._pool.loop.call_later(keepalive, self._retire)

    def take(self) -> bool:
        """Out of the pool for a new exchange; False when vLLM closed it (or sent anything on it) while it was
        idle, even if the loop has not read that yet: such a connection is not used, so no request goes
        out on a connection that is already gone."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.closed or self.transport is None or self.transport.is_closing():
            return False
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            poll = select.poll()
            poll.register(sock.fileno(), _CLOSED_OR_READABLE)
            if poll.poll(0):  # readable while idle: a FIN, a reset, or stray bytes
                self.close()
                return False
        self.reset(reused=True)
        return True

    def close(self) -> None:
        """Drop the connection (vLLM sees the disconnect and aborts a request it is generating)."""
        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        if self.transport is not None:
            self.transport.close()

    def _retire(self) -> None:
        self._idle_timer = None
        self.close()


class UpstreamPool:
    """Keep-alive connections to one ``host:port``, most recently used first."""

    def __init__(self, host: str, port: int, keepalive: float, connect_timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.host = host
        self.tls = tls
        self.port = port
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self._idle: list[UpstreamConnection] = []
        self.buffer = ReadBuffer()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def acquire(self, fresh: bool = False) -> UpstreamConnection:
        """A pooled connection (``reused`` True) unless *fresh*, else a new one."""
        while self._idle and not fresh:
            conn = self._idle.pop()
            if conn.take():
                return conn
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port, ssl=self.tls),
                self.connect_timeout,
            )
        except TimeoutError as error:  # asyncio.TimeoutError is TimeoutError, an OSError: caught first
            raise UpstreamError(f"{type(error).__name__}: {error}", CONNECT, CONNECT_TIMEOUT) from error
        except OSError as error:
            raise UpstreamError(f"{type(error).__name__}: {error}", CONNECT, CONNECT_REFUSED) from error
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the pool if the exchange ended cleanly and both sides keep the connection alive."""
        if not conn.reusable:
            conn.close()
            return
        conn.park(self.keepalive)
        self._idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """*conn* closed: it is no longer offered."""
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
