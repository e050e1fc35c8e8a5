"""The proxy's HTTP/1.1 server side: client connections, their requests, framing, keep-alive and idle timers.

Each client connection is an asyncio protocol with llhttp (``httptools``) parsing. Requests are taken one at
a time per connection (pipelined ones wait, unread) and handed to a ``Handler`` (the exchange policy,
``exchange.py``), which answers through the connection's public methods: ``reply`` for a response of the
proxy's own, ``ResponseWriter`` for a relayed one. Nothing here decides what is observed or how a failure
is counted.

What this layer does on its own:

* hop-by-hop headers (RFC 9110 §7.6.1) are dropped by one rule for both directions (``end_to_end``);
* a response is framed for its client: its Content-Length kept, otherwise chunked for an HTTP/1.1 client
  and delimited by the close for an HTTP/1.0 one;
* a request head over ``MAX_HEAD`` gets a 431, a malformed one a 400; an idle connection closes after
  ``CLIENT_KEEPALIVE`` (and a connection that never sends a whole head is idle);
* back-pressure: a request body held beyond ``max_held_body`` pauses reading the client until it streams
  on, and a full client write buffer pauses reading from vLLM (``begin_response``);
* a cap on the response bytes held for clients that stopped reading, all connections together
  (``max_buffered``): past it, the connection holding the most is closed (``Http1Server.backlogged``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections import deque
from time import perf_counter
from typing import Protocol

import httptools
import structlog

from sidecar.logs import RateLimited

log = structlog.get_logger("sidecar.tap.http1")

HOP_BY_HOP = frozenset(
    h.lower().encode()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Proxy-Connection",
    )
)  # fmt: skip
# A request head (request line and headers) larger than this is refused with a 431.
MAX_HEAD = 64 * 1024
# A client connection idle this long between requests is closed (aiohttp's and nginx's default is 75 s).
CLIENT_KEEPALIVE = 75.0
REASONS = {400: b"Bad Request", 417: b"Expectation Failed", 431: b"Request Header Fields Too Large",
           502: b"Bad Gateway", 504: b"Gateway Timeout"}
# The response's own Content-Length is written by ``ResponseWriter`` itself (kept as vLLM sent it).
_RESPONSE_DROP = frozenset({b"content-length"})


def end_to_end(headers: list[tuple[bytes, bytes]], also_drop: frozenset[bytes] = frozenset()) -> list[bytes]:
    """Raw ``Name: value`` lines of *headers* less the hop-by-hop ones (the fixed list, those named by
    ``Connection``, and *also_drop*, lower case), names, values and order exactly as received. The same
    rule for both directions, so requests and responses lose exactly the same kinds."""
    drop = HOP_BY_HOP | also_drop
    for name, value in headers:
        if name.lower() == b"connection":
            drop = drop | {token.strip().lower() for token in value.split(b",")}
    return [name + b": " + value for name, value in headers if name.lower() not in drop]


# Reads go into one buffer shared by all connections of a loop (asyncio's BufferedProtocol): everything read
# is parsed, and the pieces kept copied out, before the next read. A plain Protocol would get a new bytes
# object per read, which asyncio allocates at 256 KiB and shrinks: 27 us per small read on this machine
# against 4.5 us for a read into a buffer that exists (a send and a read each, socketpair, 1.3 KB).
READ_BUFFER = 64 * 1024


class ReadBuffer:
    __slots__ = ("view",)

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_BUFFER))


class BodySink(Protocol):
    """Where a streamed request body goes (an upstream connection)."""

    def write_body(self, data: bytes) -> None: ...


class Readable(Protocol):
    """A response source whose reading follows the client's write buffer (an upstream connection)."""

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class Handler(Protocol):
    async def exchange(self, request: Request, client: ClientConnection) -> bool:
        """Answer *request*; returns whether the client connection may carry another."""
        ...


class Counts(Protocol):
    """Where this layer counts what it does on its own (``ProxyMetrics``): the responses it gives without
    an exchange (400 and 431 for heads it cannot take), and the connections it closes at the buffer cap."""

    def response(self, status: int) -> None: ...
    def error(self, reason: str) -> None: ...


class Request:
    """One request as the client sent it, its body arriving through the client connection."""

    __slots__ = ("method", "target", "version", "headers", "keep_alive", "chunked", "length", "body", "size",
                 "body_done", "done_at", "body_broken", "stream_to", "waiter", "expect", "owner", "_max_held",
                 "_chunks_out")

    def __init__(self, method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]],
                 keep_alive: bool, owner: ClientConnection, max_held: int) -> None:
        self.owner = owner
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.chunked = False
        self.length: int | None = None
        self.expect: bytes | None = None
        for name, value in headers:
            lower = name.lower()
            if lower == b"content-length":
                try:
                    self.length = int(value)
                except ValueError:
                    self.length = None
            elif lower == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            elif lower == b"expect":
                self.expect = value
        self.body: list[bytes] = []
        self.size = 0  # bytes in ``body``
        self.body_done = False
        self.done_at = 0.0  # perf_counter() when the request's last byte arrived
        self.body_broken = False
        # Once streaming: the upstream connection the rest of the body goes to as it arrives.
        self.stream_to: BodySink | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._max_held = max_held  # held beyond this, the client's reading pauses
        self._chunks_out = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)

    def header(self, name: bytes) -> bytes | None:
        """The last value of header *name* (lower case), or None."""
        found = None
        for key, value in self.headers:
            if key.lower() == name:
                found = value
        return found

    def feed(self, data: bytes) -> None:
        if self.stream_to is not None:
            self.stream_to.write_body(b"%x\r\n%b\r\n" % (len(data), data) if self._chunks_out else data)
        else:
            self.body.append(data)
            self.size += len(data)
            if self.size > self._max_held:
                self.owner.pause_body(True, "body")  # until it streams through (or the exchange ends)
            self._wake()

    def take(self) -> bytes:
        body, self.body, self.size = b"".join(self.body), [], 0
        return body

    def finish(self) -> None:
        self.body_done = True
        self.done_at = perf_counter()
        if self.stream_to is not None and self._chunks_out:
            self.stream_to.write_body(b"0\r\n\r\n")
        self._wake()

    def broken(self) -> None:
        self.body_broken = True
        self._wake()

    def stream(self, sink: BodySink, chunks: bool) -> None:
        """Send what arrived so far, then the rest as it arrives, to *sink* (re-chunked when *chunks*)."""
        self._chunks_out = chunks
        head = self.take()
        if head:
            sink.write_body(b"%x\r\n%b\r\n" % (len(head), head) if chunks else head)
        self.stream_to = sink
        if self.body_done and chunks:
            sink.write_body(b"0\r\n\r\n")
        self.owner.pause_body(False, "body")

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def more(self) -> None:
        """Wait for more of the body (or its end, or its breaking off)."""
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None


class ResponseWriter:
    """Writes one relayed response to its client: the head framed for the client's HTTP version (written with
    the first body piece, or at once by ``flush_head``), then the body as it comes."""

    __slots__ = ("client", "chunked", "keep_alive", "_head", "_transport")

    def __init__(self, client: ClientConnection, request: Request, status: int, reason: bytes,
                 headers: list[tuple[bytes, bytes]]) -> None:
        self.client = client
        no_body = request.method == b"HEAD" or status in (204, 304)
        length = None
        for name, value in headers:
            if name.lower() == b"content-length":
                length = value
                break
        lines = [b"HTTP/%s %d %s" % (request.version.encode(), status, reason)]
        lines += end_to_end(headers, _RESPONSE_DROP)
        self.keep_alive = request.keep_alive and not client.closing
        self.chunked = False
        if length is not None:
            lines.append(b"Content-Length: " + length)
        elif not no_body:
            if request.version == "1.1":
                lines.append(b"Transfer-Encoding: chunked")
                self.chunked = True
            else:
                self.keep_alive = False  # an HTTP/1.0 client reads to the close
        if not self.keep_alive:
            lines.append(b"Connection: close")
        elif request.version == "1.0":
            lines.append(b"Connection: keep-alive")
        self._head: bytes | None = b"\r\n".join(lines) + b"\r\n\r\n"
        self._transport = client.transport

    def body(self, data: bytes) -> None:
        if not data:
            return
        transport = self._transport
        if not transport.is_closing():
            out = b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data
            head, self._head = self._head, None
            transport.write(head + out if head is not None else out)

    def flush_head(self) -> None:
        head, self._head = self._head, None
        if head is not None and not self._transport.is_closing():
            self._transport.write(head)

    def end(self) -> None:
        head, self._head = self._head, None
        out = (head or b"") + (b"0\r\n\r\n" if self.chunked else b"")
        if out and not self._transport.is_closing():
            self._transport.write(out)


class Http1Server:
    """Listens for clients and runs each connection's requests through *handler*, one at a time.

    *max_held_body*: a request body not yet sent is held up to this before the client's reading pauses.
    *max_buffered*: response bytes held for clients that stopped reading, all together (None: no cap). A
    client stopped reading when its connection's write buffer passed asyncio's high-water mark (64 KiB):
    reading from vLLM then pauses, so one such connection holds at most that mark plus one read (about
    0.12 MB). The cap is checked each time a connection stalls; past it, the stalled connections holding
    the most are closed until the rest fit (their exchanges end as the client's failure)."""

    def __init__(self, handler: Handler, max_held_body: int, max_buffered: int | None = None,
                 counts: Counts | None = None) -> None:
        self.handler = handler
        self.counts = counts
        self.max_held_body = max_held_body
        self.max_buffered = max_buffered
        self.read_buffer = ReadBuffer()
        self._connections: set[ClientConnection] = set()
        self._backlogged: set[ClientConnection] = set()  # writing paused: the client is not reading
        self._server: asyncio.base_events.Server | None = None
        self._problems = RateLimited(log)

    async def start(self, host: str, port: int, backlog: int = 1024) -> int:
        """Listen on *host*:*port* (0: any free port); returns the port."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self), host, port, backlog=backlog, reuse_address=True
        )
        return self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            conn.shutdown()
        if self._server is not None:
            await self._server.wait_closed()

    @property
    def connections(self) -> int:
        return len(self._connections)

    @property
    def buffered(self) -> int:
        """Response bytes held now for clients that stopped reading (what ``max_buffered`` caps)."""
        return sum(conn.buffered for conn in self._backlogged)

    def opened(self, conn: ClientConnection) -> None:
        self._connections.add(conn)

    def lost(self, conn: ClientConnection) -> None:
        self._connections.discard(conn)
        self._backlogged.discard(conn)

    def bad_request(self, reason: str, detail: str) -> None:
        self._problems.warning("proxy_bad_request", reason, detail=detail)

    def backlogged(self, conn: ClientConnection, on: bool) -> None:
        """*conn*'s client stopped reading (*on*) or caught up. Over the cap, the connections holding the most
        are closed until the rest fit: each such client is treated as gone (its exchange is cancelled)."""
        if not on:
            self._backlogged.discard(conn)
            return
        self._backlogged.add(conn)
        cap = self.max_buffered
        if cap is None:
            return
        held = {c: c.buffered for c in self._backlogged}
        total = sum(held.values())
        while total > cap and held:
            worst = max(held, key=held.__getitem__)
            size = held.pop(worst)
            self._problems.warning("proxy_buffered_bytes_cap", "client_not_reading", closed_holding=size,
                                   buffered=total, cap=cap)
            total -= size
            self._backlogged.discard(worst)
            if self.counts is not None:
                self.counts.error("buffered_bytes_cap")
            worst.abort()


class ClientConnection(asyncio.BufferedProtocol):
    """One client connection: parses its requests (llhttp) and runs them one after another."""

    def __init__(self, server: Http1Server) -> None:
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.closed = False
        self.closing = False  # no more requests: close when the current one is answered
        self._parser = httptools.HttpRequestParser(self)
        self._queue: deque[Request] = deque()
        self._reading: Request | None = None  # the request whose body is arriving
        self._url = bytearray()
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_size = 0
        self._task: asyncio.Task[None] | None = None
        self._upstream: Readable | None = None  # while a response is relayed
        self._paused_reading = False
        self._write_paused = False
        self._pauses: set[str] = set()
        self._idle: asyncio.TimerHandle | None = None

    # --- asyncio callbacks -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.opened(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.lost(self)
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._reading is not None and not self._reading.body_done:
            self._reading.broken()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the exchange closes its upstream connection: vLLM aborts the request
        self._queue.clear()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.server.read_buffer.view  # shared, as upstream.py's: parsed before the next read

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.server.read_buffer.view[:nbytes])

    def data_received(self, data: bytes | memoryview) -> None:
        if self.closing:
            return  # nothing more is read from a connection that is being closed
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        try:
            self._parser.feed_data(data)
            if self._task is None:  # still no whole head: the idle clock runs on (no slow-loris forever)
                self._arm_idle()
        except httptools.HttpParserUpgrade:
            # An Upgrade request (its header is hop-by-hop and not forwarded): answered as a plain request,
            # and the connection ends with it, since what follows is not HTTP/1.1 any more.
            self.closing = True
        except httptools.HttpParserError as error:
            too_large = isinstance(error.__context__, _HeadTooLarge)
            self.server.bad_request("head_too_large" if too_large else "malformed", str(error)[:120])
            self._bad_request(431 if too_large else 400)

    def eof_received(self) -> bool:
        # A client that half-closes gets no more responses on this connection: what is in flight is
        # abandoned (its writes would fail), as a full close would.
        if self._reading is not None and not self._reading.body_done:
            self._reading.broken()
        self.shutdown()
        return False

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._upstream is not None:
            self._upstream.pause_reading()
        self.server.backlogged(self, True)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._upstream is not None:
            self._upstream.resume_reading()
        self.server.backlogged(self, False)

    # --- llhttp callbacks --------------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = bytearray()
        self._headers = []
        self._head_size = 0

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)
        if self._head_size > MAX_HEAD:
            raise _HeadTooLarge

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_HEAD:
            raise _HeadTooLarge

    def on_headers_complete(self) -> None:
        parser = self._parser
        request = Request(parser.get_method(), bytes(self._url), parser.get_http_version(), self._headers,
                          parser.should_keep_alive(), self, self.server.max_held_body)
        self._reading = request
        self._queue.append(request)
        if self._task is None:
            self._next()
        elif len(self._queue) > 1:
            self._pause("pipelined")  # one exchange at a time; the next waits, unread

    def on_body(self, data: bytes) -> None:
        if self._reading is not None:
            self._reading.feed(data)

    def on_message_complete(self) -> None:
        if self._reading is not None:
            self._reading.finish()
            self._reading = None

    # --- exchanges ---------------------------------------------------------------------------------------

    def _next(self) -> None:
        if self._queue and not self.closed:
            request = self._queue[0]
            self._task = asyncio.get_running_loop().create_task(self._run(request))
        else:
            self._task = None
            self._arm_idle()

    async def _run(self, request: Request) -> None:
        keep = False
        try:
            keep = await self.server.handler.exchange(request, self)
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 — a proxy bug must not take the connection's task down silently
            log.exception("proxy_exchange_failed")
        finally:
            if self._queue and self._queue[0] is request:
                self._queue.popleft()
            self._task = None
            self._resume("body")
        if not keep or self.closed or self.closing:
            self.shutdown()
            return
        self._resume("pipelined")
        self._next()

    # --- what the handler uses -----------------------------------------------------------------------------

    @property
    def buffered(self) -> int:
        """Response bytes written to this connection that its client has not taken yet."""
        return 0 if self.closed else self.transport.get_write_buffer_size()

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def reply(self, request: Request, status: int, body: bytes) -> bool:
        """A response of the proxy's own; returns whether the connection may carry another request."""
        keep = request.keep_alive and request.body_done and not self.closing
        lines = [b"HTTP/%s %d %s" % (request.version.encode(), status, REASONS.get(status, b"")),
                 b"Content-Length: %d" % len(body)]
        if body:
            lines.append(b"Content-Type: application/json")
        lines.append(b"Connection: keep-alive" if keep and request.version == "1.0" else
                     b"" if keep else b"Connection: close")
        self.write(b"\r\n".join(line for line in lines if line) + b"\r\n\r\n" + body)
        return keep

    def begin_response(self, upstream: Readable) -> None:
        """*upstream*'s reading follows this connection's write buffer from now on."""
        self._upstream = upstream
        if self._write_paused:
            upstream.pause_reading()

    def end_response(self) -> None:
        self._upstream = None

    def abort_response(self) -> None:
        """The upstream broke mid-body: close the client's connection so it sees a broken response."""
        self.closing = True
        self.transport.close()

    def abort(self) -> None:
        """Reset the connection at once, dropping whatever it had not sent yet, the kernel's send queue
        included (SO_LINGER 0, as nginx's ``reset_timedout_connection``): the client is treated as gone."""
        self.closing = True
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def pause_body(self, on: bool, why: str = "upstream") -> None:
        """Stop (*on*) or go on reading the client's request body; reading resumes once no reason is left."""
        (self._pause if on else self._resume)(why)

    def _pause(self, why: str) -> None:
        self._pauses.add(why)
        if not self._paused_reading and not self.closed:
            self._paused_reading = True
            self.transport.pause_reading()

    def _resume(self, why: str) -> None:
        self._pauses.discard(why)
        if self._paused_reading and not self._pauses and not self.closed:
            self._paused_reading = False
            self.transport.resume_reading()

    def _bad_request(self, status: int) -> None:
        if self._task is None:
            self.write(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                       % (status, REASONS[status]))
            if self.server.counts is not None:
                self.server.counts.response(status)
            self.shutdown()
        else:  # a request is being answered: end the connection after it
            if self._reading is not None and not self._reading.body_done:
                self._reading.broken()
            self.closing = True

    def _arm_idle(self) -> None:
        if self._idle is None and not self.closed:
            self._idle = asyncio.get_running_loop().call_later(CLIENT_KEEPALIVE, self._idle_out)

    def _idle_out(self) -> None:
        self._idle = None
        self.shutdown()

    def shutdown(self) -> None:
        self.closing = True
        if self._task is None or self._task.done():
            self.transport.close()
        else:
            self._task.cancel()  # the exchange ends; its finally path closes the connection
            self.transport.close()


class _HeadTooLarge(Exception):
    pass
