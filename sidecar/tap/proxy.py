"""A thin, byte-exact reverse proxy in front of vLLM that taps each request as it streams through.

Every method, target, header and body is forwarded; the response's status, headers and body come back
unchanged, streamed as they arrive (no whole bodies held), except hop-by-hop headers (RFC 9110 §7.6.1) and
the body's framing on each hop (a chunked or close-delimited body reaches an HTTP/1.1 client chunked).
Bodies are neither decompressed nor re-encoded, in either direction: a gzip-encoded request reaches vLLM
as the client sent it. A client that goes away cancels its exchange, which closes the upstream connection,
so vLLM aborts the request. If vLLM cannot be reached the client gets a 502 with an OpenAI-style JSON
error; a request target that is not a path (absolute-form, ``OPTIONS *``) gets a 400. Observation
(``observe.py``) reads the bytes the proxy forwards and can never fail the request.

Both hops are asyncio protocols with llhttp (``httptools``) parsing: a response event is written to the
client from the upstream socket's read callback (``upstream.py``), with no task wake-up per event, and
back-pressure is the transports' own in both directions (a full client write buffer pauses reading from
vLLM; a full upstream write buffer pauses reading the client's body).

Failures are classified where they happen: reading from vLLM is the upstream's failure
(``upstream_unreachable`` before the response, ``upstream_reset`` during it), the client's connection
closing or its body breaking off is the client's (``client_disconnected``). Every observed request is
recorded exactly once, whatever path it took.

If a pooled upstream connection turns out closed before any byte of the response came back, a request
whose body was fully buffered is sent once more on a new connection (vLLM never saw the first attempt).
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections import deque
from typing import Protocol
from urllib.parse import unquote, urlsplit

import httptools
import structlog

from sidecar.logs import RateLimited
from sidecar.tap.observe import (
    OBSERVED_PATHS,
    BodyObserver,
    Budget,
    Outcome,
    RequestInfo,
    SseObserver,
    decoded_body,
    read_request,
)
from sidecar.tap.upstream import ConnectFailed, Head, ReadBuffer, UpstreamConnection, UpstreamError, UpstreamPool

log = structlog.get_logger("sidecar.tap.proxy")

HOP_BY_HOP = frozenset(
    h.lower().encode()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Proxy-Connection",
    )
)  # fmt: skip
# The status recorded for a request whose client went away before the response started (nginx's 499).
CLIENT_CLOSED = 499
# All in-flight observations together hold at most this many times --max-observed-body.
BUDGET_FACTOR = 4
# A request head (request line and headers) larger than this is refused with a 431.
MAX_HEAD = 64 * 1024
# A client connection idle this long between requests is closed (aiohttp's and nginx's default is 75 s).
CLIENT_KEEPALIVE = 75.0


class Recorder(Protocol):
    def request_done(self, info: RequestInfo | None, outcome: Outcome, started: float, ended: float) -> None: ...


def end_to_end(headers: list[tuple[bytes, bytes]], also_drop: frozenset[bytes] = frozenset()) -> list[bytes]:
    """Raw ``Name: value`` lines of *headers* less the hop-by-hop ones (the fixed list, those named by
    ``Connection``, and *also_drop*, lower case), names, values and order exactly as received. The same
    rule for both directions, so requests and responses lose exactly the same kinds."""
    drop = HOP_BY_HOP | also_drop
    for name, value in headers:
        if name.lower() == b"connection":
            drop = drop | {token.strip().lower() for token in value.split(b",")}
    return [name + b": " + value for name, value in headers if name.lower() not in drop]


# Host is set for the upstream hop; Content-Length is recomputed from the buffered body (the same value) or
# kept for a streamed one; Expect was already answered to the client (the proxy sends its 100 Continue), so
# repeating it upstream could stall the body.
REQUEST_ONLY_DROP = frozenset({b"host", b"content-length", b"expect"})
_RESPONSE_DROP = frozenset({b"content-length"})

_REASONS = {400: b"Bad Request", 417: b"Expectation Failed", 431: b"Request Header Fields Too Large",
            502: b"Bad Gateway"}


def openai_error(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


class Request:
    """One request as the client sent it, its body arriving through the client connection."""

    __slots__ = ("method", "target", "version", "headers", "keep_alive", "chunked", "length", "body", "size",
                 "body_done", "body_broken", "stream_to", "waiter", "expect", "owner", "_chunks_out")

    def __init__(self, method: bytes, target: bytes, version: str, headers: list[tuple[bytes, bytes]],
                 keep_alive: bool, owner: ClientConnection) -> None:
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
        self.body_broken = False
        # Once streaming: the upstream connection the rest of the body goes to as it arrives.
        self.stream_to: UpstreamConnection | None = None
        self.waiter: asyncio.Future[None] | None = None
        self._chunks_out = False

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.length)

    def feed(self, data: bytes) -> None:
        if self.stream_to is not None:
            self.stream_to.write_body(b"%x\r\n%b\r\n" % (len(data), data) if self._chunks_out else data)
        else:
            self.body.append(data)
            self.size += len(data)
            if self.size > self.owner.proxy.max_held_body:
                self.owner.pause_body(True, "body")  # until it streams through (or the exchange ends)
            self._wake()

    def take(self) -> bytes:
        body, self.body, self.size = b"".join(self.body), [], 0
        return body

    def finish(self) -> None:
        self.body_done = True
        if self.stream_to is not None and self._chunks_out:
            self.stream_to.write_body(b"0\r\n\r\n")
        self._wake()

    def broken(self) -> None:
        self.body_broken = True
        self._wake()

    def stream(self, conn: UpstreamConnection, chunks: bool) -> None:
        """Send what arrived so far, then the rest as it arrives, to *conn*."""
        self._chunks_out = chunks
        head = self.take()
        if head:
            conn.write_body(b"%x\r\n%b\r\n" % (len(head), head) if chunks else head)
        self.stream_to = conn
        if self.body_done and chunks:
            conn.write_body(b"0\r\n\r\n")
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


class _Exchange:
    """One proxied request's record: what was asked, what came of it, and whether it was recorded."""

    __slots__ = ("endpoint", "info", "outcome", "started", "upstream_failed")

    def __init__(self, started: float) -> None:
        self.endpoint: str | None = None  # set for the observed endpoints: those are recorded
        self.info: RequestInfo | None = None
        self.outcome = Outcome()
        self.started = started
        self.upstream_failed = False

    def client_gone(self) -> None:
        if self.outcome.status == 0:
            self.outcome.status = CLIENT_CLOSED
        if not self.upstream_failed:
            self.outcome.unattributed = "client_disconnected"


class _ClientGone(Exception):
    """The client's side ended the exchange (its body broke off, or its connection closed)."""


class Proxy:
    def __init__(
        self,
        upstream: str,
        recorder: Recorder,
        max_observed_body: int,
        connect_timeout: float,
        keepalive: float,
        budget: Budget | None = None,
    ) -> None:
        parts = urlsplit(upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the proxy forwards to http(s)://host[:port] only, not {upstream!r}")
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname  # IPv6 literal
        self._host_header = (host if parts.port is None else f"{host}:{port}").encode()
        self._prefix = parts.path.rstrip("/").encode()
        # Credentials in the upstream URL: sent as Basic auth when the client sends no Authorization.
        self._basic: bytes | None = None
        if parts.username is not None:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            self._basic = b"Basic " + base64.b64encode(token)
        self.pool = UpstreamPool(parts.hostname, port, keepalive, connect_timeout,
                                 ssl.create_default_context() if tls else None)
        self._recorder = recorder
        self._limit = max_observed_body
        # A body not yet sent is held up to this before the client's reading pauses.
        self.max_held_body = max(max_observed_body, 64 * 1024)
        self.budget = budget if budget is not None else Budget(BUDGET_FACTOR * max_observed_body)
        self._problems = RateLimited(log)
        self._server: asyncio.base_events.Server | None = None
        self.read_buffer = ReadBuffer()
        self._connections: set[ClientConnection] = set()

    # --- serving -------------------------------------------------------------------------------------------

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
        self.pool.close()
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)

    # --- one exchange --------------------------------------------------------------------------------------

    async def exchange(self, request: Request, client: ClientConnection) -> bool:
        """Proxy one request; returns whether the client connection may carry another."""
        ex = _Exchange(time.perf_counter())
        try:
            return await self._exchange(request, client, ex)
        except asyncio.CancelledError:
            ex.client_gone()
            raise
        except _ClientGone:
            ex.client_gone()
            return False
        finally:
            self._done(ex)

    async def _exchange(self, request: Request, client: ClientConnection, ex: _Exchange) -> bool:
        target = request.target
        if target[:1] != b"/":
            self._problems.warning("proxy_rejected_target", "not_a_path", method=request.method.decode("latin-1"))
            return client.reply(request, 400, openai_error(
                400, "This proxy forwards only origin-form targets (/path).", "invalid_request_error"))
        path = unquote(target.split(b"?", 1)[0].decode("latin-1"))
        endpoint = ex.endpoint = OBSERVED_PATHS.get(path) if request.method == b"POST" else None
        if request.expect is not None and request.version != "1.0":
            if request.expect.lower() != b"100-continue":
                return client.reply(request, 417, b"")
            if not request.body_done:  # the client waits for this before it sends the body
                client.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        held = 0
        try:
            body, held = await self._request_body(request, ex, endpoint)
            conn, head = await self._send(request, body)
        except UpstreamError as error:
            ex.outcome.status = 502
            ex.outcome.unattributed = "upstream_unreachable"
            ex.upstream_failed = True
            self._problems.warning("proxy_upstream_unreachable", type(error).__name__, detail=str(error)[:200])
            if request.stream_to is not None or not request.body_done:
                request.keep_alive = False  # the rest of its body is not going to be read
            return client.reply(request, 502, openai_error(
                502, "The model server behind this proxy could not be reached.", "upstream_unavailable"))
        finally:
            self.budget.give(held)
        try:
            return await self._relay(request, client, conn, head, ex)
        finally:
            if request.stream_to is not None and not request.body_done:
                conn.close()  # vLLM answered before the body ended: the rest must not reach another request
            self.pool.release(conn)  # back to the pool only if the exchange ended cleanly

    async def _request_body(
        self, request: Request, ex: _Exchange, endpoint: str | None
    ) -> tuple[bytes | None, int]:
        """(the whole body when it is buffered, else None: it streams through; bytes charged to the budget).
        The bytes parsed for observation are the bytes forwarded."""
        if not request.has_body:
            while not request.body_done:  # a body of Content-Length 0, or none: its end is already in
                await self._more(request)
            if endpoint is not None:
                ex.info = read_request(endpoint, b"")
            return (b"" if request.length == 0 else None), 0
        length = request.length
        if length is not None and length <= self._limit and self.budget.take(length):
            try:
                while not request.body_done:
                    await self._more(request)
            except BaseException:
                self.budget.give(length)
                raise
            body = request.take()
            if endpoint is not None:
                self._read_request(request, ex, endpoint, body)
            return body, length
        held = 0
        if length is None:  # chunked: keep reading while it fits, else stream the rest through
            try:
                while not request.body_done:
                    size = request.size
                    if size > self._limit or not self.budget.take(size - held):
                        break
                    held = size
                    await self._more(request)
            except BaseException:
                self.budget.give(held)
                raise
            if request.body_done:
                size = request.size
                if size <= self._limit and self.budget.take(size - held):
                    held = size
                    body = request.take()
                    if endpoint is not None:
                        self._read_request(request, ex, endpoint, body)
                    return body, held
        self.budget.give(held)  # what arrived so far is sent at once; it is not observation memory any more
        if endpoint is not None:
            ex.info = read_request(endpoint, None, "body_too_large")
        return None, 0

    async def _more(self, request: Request) -> None:
        await request.more()
        if request.body_broken:
            raise _ClientGone

    def _read_request(self, request: Request, ex: _Exchange, endpoint: str, body: bytes) -> None:
        try:
            encoding = None
            for name, value in request.headers:
                if name.lower() == b"content-encoding":
                    encoding = value.decode("latin-1")
            if encoding:  # forwarded as it came; a decoded copy (bounded) is read and dropped at once
                plain, reason = decoded_body(body, encoding, self._limit)
                ex.info = read_request(endpoint, plain, reason)
            else:
                ex.info = read_request(endpoint, body)
        except Exception:  # noqa: BLE001 — observation must never break the proxy
            ex.info = RequestInfo(endpoint=endpoint, parse_error="unparsable_request")

    def _request_head(self, request: Request, body: bytes | None) -> tuple[bytes, bool]:
        """The request line and headers for vLLM, and whether a streamed body goes chunked."""
        lines = [request.method + b" " + self._prefix + request.target + b" HTTP/1.1", b"Host: " + self._host_header]
        lines += end_to_end(request.headers, REQUEST_ONLY_DROP)
        if self._basic is not None and not any(name.lower() == b"authorization" for name, _ in request.headers):
            lines.append(b"Authorization: " + self._basic)
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

    async def _send(self, request: Request, body: bytes | None) -> tuple[UpstreamConnection, Head]:
        head_bytes, chunks = self._request_head(request, body)
        streamed = body is None and request.has_body
        no_body = request.method == b"HEAD"
        retried = False
        while True:
            conn = await self.pool.acquire(fresh=retried)
            try:
                waiter = conn.begin(head_bytes, body, no_body)
                if streamed:
                    # while the upstream's write buffer is full, the client's body is not read
                    conn.on_write_paused = request.owner.pause_body
                    request.stream(conn, chunks)
                return conn, await waiter
            except UpstreamError as error:
                conn.close()
                # A pooled connection the upstream had already closed: vLLM never read this request.
                # Only a buffered body can be sent again; a connect failure is not this case.
                if retried or not conn.reused or streamed or not error.before_response or isinstance(
                    error, ConnectFailed
                ):
                    raise
                retried = True
                log.debug("proxy_retry_on_new_connection", reason=str(error)[:100])
            except BaseException:
                conn.close()
                raise

    async def _relay(
        self, request: Request, client: ClientConnection, conn: UpstreamConnection, head: Head, ex: _Exchange
    ) -> bool:
        outcome = ex.outcome
        outcome.status = head.status
        observer: SseObserver | BodyObserver | None = None
        info = ex.info
        if info is not None and info.parse_error is None and head.status < 400:
            content_type = head.get(b"content-type") or b""
            if b"text/event-stream" in content_type:
                observer = SseObserver(self._limit, self.budget)
            else:
                observer = BodyObserver(self._limit, self.budget)
        if client.closed:
            raise _ClientGone
        sink = _Sink(client, head, request, observer, outcome)
        try:
            done = conn.attach(sink)  # what already arrived is written at once
            client.begin_response(conn)
            if not done.done():
                sink.flush_head()  # the head goes out now, not with the first event (TTFT stays honest)
            try:
                await done
            except UpstreamError as error:
                # Upstream broke mid-body: the client must see a broken response, not a clean short one.
                outcome.unattributed = "upstream_reset"
                ex.upstream_failed = True
                self._problems.warning("proxy_upstream_reset", type(error).__name__, detail=str(error)[:200])
                client.abort_response()
                return False
            if client.closed:
                raise _ClientGone
            sink.end()
            if sink.observer is not None:
                try:
                    sink.observer.finish(time.perf_counter(), outcome)
                except Exception:  # noqa: BLE001
                    outcome.unattributed = "observer_error"
            # The connection to the client goes on only if the request's body was read to its end.
            return sink.keep_alive and request.body_done and not request.body_broken
        finally:
            client.end_response()
            if sink.observer is not None:
                sink.observer.close()

    def _done(self, ex: _Exchange) -> None:
        """Record an observed request; called exactly once per request, from ``exchange``'s ``finally``."""
        if ex.endpoint is None:
            return
        # A request whose body never arrived whole (the client went away) is still recorded.
        info = ex.info if ex.info is not None else RequestInfo(endpoint=ex.endpoint)
        try:
            self._recorder.request_done(info, ex.outcome, ex.started, time.perf_counter())
        except Exception as error:  # noqa: BLE001 — a recorder bug must not fail the request or flood the log
            self._problems.warning("tap_record_failed", type(error).__name__, exc_info=True)


class _Sink:
    """Writes the response to the client as the upstream delivers it, and feeds the observer."""

    __slots__ = ("client", "observer", "outcome", "chunked", "keep_alive", "_head", "_transport")

    def __init__(self, client: ClientConnection, head: Head, request: Request,
                 observer: SseObserver | BodyObserver | None, outcome: Outcome) -> None:
        self.client = client
        self.observer = observer
        self.outcome = outcome
        no_body = request.method == b"HEAD" or head.status in (204, 304)
        length = head.get(b"content-length")
        lines = [b"HTTP/%s %d %s" % (request.version.encode(), head.status, head.reason)]
        lines += end_to_end(head.headers, _RESPONSE_DROP)
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
        now = time.perf_counter()
        transport = self._transport
        if not transport.is_closing():
            out = b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data
            head, self._head = self._head, None
            transport.write(head + out if head is not None else out)
        observer = self.observer
        if observer is not None:
            try:
                observer.feed(data, now, self.outcome)
            except Exception:  # noqa: BLE001
                observer.close()
                self.observer = None
                self.outcome.unattributed = "observer_error"

    def flush_head(self) -> None:
        head, self._head = self._head, None
        if head is not None and not self._transport.is_closing():
            self._transport.write(head)

    def end(self) -> None:
        head, self._head = self._head, None
        out = (head or b"") + (b"0\r\n\r\n" if self.chunked else b"")
        if out and not self._transport.is_closing():
            self._transport.write(out)


class ClientConnection(asyncio.BufferedProtocol):
    """One client connection: parses its requests (llhttp) and runs them one after another."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
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
        self._upstream: UpstreamConnection | None = None  # while a response is relayed
        self._paused_reading = False
        self._write_paused = False
        self._pauses: set[str] = set()
        self._idle: asyncio.TimerHandle | None = None

    # --- asyncio callbacks -------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy._connections.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy._connections.discard(self)
        if self._idle is not None:
            self._idle.cancel()
        if self._reading is not None and not self._reading.body_done:
            self._reading.broken()
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the exchange closes its upstream connection: vLLM aborts the request
        self._queue.clear()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.proxy.read_buffer.view  # shared, as upstream.py's: parsed before the next read

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self.proxy.read_buffer.view[:nbytes])

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
            self.proxy._problems.warning("proxy_bad_request", "head_too_large" if too_large else "malformed",
                                         detail=str(error)[:120])
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

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._upstream is not None:
            self._upstream.resume_reading()

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
                          parser.should_keep_alive(), self)
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
            keep = await self.proxy.exchange(request, self)
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

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def reply(self, request: Request, status: int, body: bytes) -> bool:
        """A response of the proxy's own; returns whether the connection may carry another request."""
        keep = request.keep_alive and request.body_done and not self.closing
        lines = [b"HTTP/%s %d %s" % (request.version.encode(), status, _REASONS.get(status, b"")),
                 b"Content-Length: %d" % len(body)]
        if body:
            lines.append(b"Content-Type: application/json")
        lines.append(b"Connection: keep-alive" if keep and request.version == "1.0" else
                     b"" if keep else b"Connection: close")
        self.write(b"\r\n".join(line for line in lines if line) + b"\r\n\r\n" + body)
        return keep

    def begin_response(self, upstream: UpstreamConnection) -> None:
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

    def pause_body(self, on: bool, why: str = "upstream") -> None:
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
                       % (status, _REASONS[status]))
            self.shutdown()
        else:  # a request is being answered: end the connection after it
            if self._reading is not None and not self._reading.body_done:
                self._reading.broken()
            self.closing = True

    def _arm_idle(self) -> None:
        if self._idle is None and not self.closed:
            self._idle = asyncio.get_running_loop().call_later(CLIENT_KEEPALIVE, self.shutdown)

    def shutdown(self) -> None:
        self.closing = True
        if self._task is None or self._task.done():
            self.transport.close()
        else:
            self._task.cancel()  # the exchange ends; its finally path closes the connection
            self.transport.close()


class _HeadTooLarge(Exception):
    pass
