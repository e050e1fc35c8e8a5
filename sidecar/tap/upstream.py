"""The proxy's HTTP/1.1 client of vLLM: a keep-alive pool of protocol-level connections.

A response is parsed by llhttp (``httptools``) as it arrives; its body is handed to a *sink* from the
socket's read callback, so relaying an event costs one read, one parse and one write, with no task to wake
and no stream buffer in between. Back-pressure is the transports' own: the sink pauses this connection's
reading while the client's write buffer is full.

Idle connections retire after ``keepalive`` seconds, below uvicorn's 5 s (vLLM's
``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``), so a request is not sent on a connection vLLM is closing.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import Protocol

import httptools


class UpstreamError(Exception):
    """The upstream connection failed. ``before_response``: no byte of the response had arrived."""

    def __init__(self, message: str, before_response: bool) -> None:
        super().__init__(message)
        self.before_response = before_response


class ConnectFailed(UpstreamError):
    def __init__(self, message: str) -> None:
        super().__init__(message, before_response=True)


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


# Reads go into one buffer shared by all connections of a loop (asyncio's BufferedProtocol): everything read
# is parsed, and the pieces kept copied out, before the next read. A plain Protocol would get a new bytes
# object per read, which asyncio allocates at 256 KiB and shrinks: 27 us per small read on this machine
# against 4.5 us for a read into a buffer that exists (a send and a read each, socketpair, 1.3 KB).
READ_BUFFER = 64 * 1024


class ReadBuffer:
    __slots__ = ("view",)

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_BUFFER))


class UpstreamConnection(asyncio.BufferedProtocol):
    """One connection to vLLM, carrying one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.reused = False
        self.closed = False
        self._idle_timer: asyncio.TimerHandle | None = None
        self._reset_exchange()
        # Told when the request body's write buffer fills and drains (the proxy then pauses reading the client).
        self.on_write_paused: Callable[[bool], None] | None = None

    def _reset_exchange(self) -> None:
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
        self.got_bytes = False
        self.complete = False

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
        self._pool._forget(self)
        if self.complete:
            return
        head, done = self._head_waiter, self._done
        if self._head is None:
            if head is not None and not head.done():
                head.set_exception(UpstreamError(f"closed before the response: {exc!r}", not self.got_bytes))
            return
        if done is None or done.done():
            return
        if exc is None and not self._head.framed:  # a body delimited by the connection's close: it ended
            self.complete = True
            done.set_result(None)
            return
        done.set_exception(UpstreamError(f"closed mid-response: {exc!r}", False))

    def data_received(self, data: bytes | memoryview) -> None:
        if self._head_waiter is None:  # bytes while idle: the connection is not in a state to reuse
            self.transport.close()  # type: ignore[union-attr]
            return
        self.got_bytes = True
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
        error = UpstreamError(why, not self.got_bytes)
        if self._head is None:
            if self._head_waiter is not None and not self._head_waiter.done():
                self._head_waiter.set_exception(error)
        elif self._done is not None and not self._done.done():
            self._done.set_exception(error)
        self.transport.close()  # type: ignore[union-attr]

    def begin(self, request_head: bytes, body: bytes | None, no_body: bool) -> asyncio.Future[Head]:
        """Send a request (head and, when buffered, its body) and return the future response head."""
        loop = self._pool.loop
        self._head_waiter = loop.create_future()
        self._done = loop.create_future()
        self._no_body = no_body
        self._keep = False
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        transport = self.transport
        if transport is None or transport.is_closing() or self.closed:
            self._head_waiter.set_exception(UpstreamError("connection closed before the request", True))
            return self._head_waiter
        transport.write(request_head + body if body else request_head)
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

    def close(self) -> None:
        """Drop the connection (vLLM sees the disconnect and aborts a request it is generating)."""
        self.closed = True
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
            if not conn.closed:
                conn._reset_exchange()
                conn.reused = True
                return conn
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: UpstreamConnection(self), self.host, self.port, ssl=self.tls),
                self.connect_timeout,
            )
        except (OSError, asyncio.TimeoutError) as error:
            raise ConnectFailed(f"{type(error).__name__}: {error}") from error
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the pool if the exchange ended cleanly and both sides keep the connection alive."""
        if not conn.reusable:
            conn.close()
            return
        conn.on_write_paused = None
        conn._head_waiter = None
        conn._idle_timer = self.loop.call_later(self.keepalive, conn._retire)
        self._idle.append(conn)

    def _forget(self, conn: UpstreamConnection) -> None:
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
