"""A thin, byte-exact reverse proxy in front of vLLM that taps each request as it streams through.

Every method, path, query, header and body is forwarded; the response's status, headers and body come back
unchanged, streamed chunk by chunk (no whole bodies held), except hop-by-hop headers (RFC 9110 §7.6.1).
Bodies are neither decompressed nor re-encoded, in either direction: a gzip-encoded request reaches vLLM
as the client sent it. A client that goes away cancels the handler, which closes the upstream connection,
so vLLM aborts the request. If vLLM cannot be reached the client gets a 502 with an OpenAI-style JSON
error; a request target that is not a path (absolute-form, ``OPTIONS *``) gets a 400. Observation
(``observe.py``) reads the bytes the proxy forwards and can never fail the request.

Failures are classified where they happen: reading from vLLM is the upstream's failure
(``upstream_unreachable`` before the response, ``upstream_reset`` during it), writing to the client or the
handler being cancelled is the client's (``client_disconnected``). Every observed request is recorded
exactly once, whatever path it took.

Idle upstream connections are retired after ``keepalive`` seconds, below uvicorn's 5 s (vLLM's
``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``), so a request is not sent on a connection vLLM is closing. If a pooled
connection still turns out closed before any byte of the response came back, a request whose body was
fully buffered is sent once more on a new connection (vLLM never saw the first attempt).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any, Protocol

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

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

log = structlog.get_logger("sidecar.tap.proxy")

HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer",
        "Transfer-Encoding", "Upgrade", "Proxy-Connection",
    )
)  # fmt: skip
# Headers aiohttp's client would invent if the client did not send them: skip them to stay transparent.
CLIENT_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
# The status recorded for a request whose client went away before the response started (nginx's 499).
CLIENT_CLOSED = 499
# All in-flight observations together hold at most this many times --max-observed-body.
BUDGET_FACTOR = 4

# Set by UpstreamConnector in the task that asked for a connection: did it come from the pool?
_REUSED: ContextVar[bool] = ContextVar("specdec_upstream_reused", default=False)
# Set by the proxy for its one retry: take a new connection, not a pooled one.
_FRESH: ContextVar[bool] = ContextVar("specdec_upstream_fresh", default=False)


class UpstreamConnector(aiohttp.TCPConnector):
    """aiohttp's connector, telling the calling task whether its connection came from the pool, and able
    to skip the pool for one request. ``keepalive_timeout`` retires idle connections."""

    async def _get(self, *args: Any, **kwargs: Any) -> Any:
        if _FRESH.get():
            return None
        found = await super()._get(*args, **kwargs)  # type: ignore[misc]
        if found is not None:
            _REUSED.set(True)
        return found


def upstream_connector(keepalive: float) -> UpstreamConnector:
    return UpstreamConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=keepalive)


class Recorder(Protocol):
    def request_done(self, info: RequestInfo | None, outcome: Outcome, started: float, ended: float) -> None: ...


def end_to_end(headers: CIMultiDict[str] | object, also_drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """*headers* less the hop-by-hop ones: the fixed list, those named by ``Connection``, and *also_drop*
    (lower case). Used for both directions, so requests and responses lose exactly the same kinds."""
    out: CIMultiDict[str] = CIMultiDict()
    drop = HOP_BY_HOP | also_drop
    connection = headers.getall("Connection", None)  # type: ignore[attr-defined]
    if connection:
        drop = set(drop)
        for value in connection:
            drop |= {token.strip().lower() for token in value.split(",")}
    for key, value in headers.items():  # type: ignore[attr-defined]
        if key.lower() not in drop:
            out.add(key, value)
    return out


# Host is set for the upstream hop; Content-Length is recomputed from the buffered body (the same value) or
# kept for a streamed one; Expect was already answered to the client (aiohttp sends its 100 Continue), so
# repeating it upstream could stall the body.
REQUEST_ONLY_DROP = frozenset({"host", "content-length", "expect"})


def openai_error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}, status=status
    )


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


class Proxy:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream: str,
        recorder: Recorder,
        max_observed_body: int,
        connect_timeout: float,
        budget: Budget | None = None,
    ) -> None:
        self._session = session
        self._upstream = upstream.rstrip("/")
        self._recorder = recorder
        self._limit = max_observed_body
        self.budget = budget if budget is not None else Budget(BUDGET_FACTOR * max_observed_body)
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, connect=connect_timeout)
        self._problems = RateLimited(log)

    # --- request side ------------------------------------------------------------------------------------

    async def _request_body(
        self, request: web.BaseRequest, ex: _Exchange, endpoint: str | None
    ) -> tuple[bytes | AsyncIterator[bytes] | None, int]:
        """(what to send upstream, bytes charged to the budget). Reads the body once; the bytes parsed for
        observation are the bytes forwarded. Bodies over the limit or the shared budget stream through."""
        if not request.body_exists:
            if endpoint is not None:
                ex.info = read_request(endpoint, b"")
            return None, 0
        length = request.content_length
        content = request.content
        if length is not None and length <= self._limit and self.budget.take(length):
            try:
                body = await content.readexactly(length) if length else b""
            except BaseException:
                self.budget.give(length)
                raise
            if endpoint is not None:
                self._read_request(request, ex, endpoint, body)
            return body, length
        head: list[bytes] = []
        held = 0
        if length is None:  # chunked: keep reading while it fits, else stream the rest through
            try:
                while True:
                    chunk = await content.readany()
                    if not chunk:
                        body = b"".join(head)
                        if endpoint is not None:
                            self._read_request(request, ex, endpoint, body)
                        return body, held
                    if held + len(chunk) > self._limit or not self.budget.take(len(chunk)):
                        head.append(chunk)
                        break
                    held += len(chunk)
                    head.append(chunk)
            except BaseException:
                self.budget.give(held)
                raise
        self.budget.give(held)  # the head is sent at once; it is not observation memory any more
        if endpoint is not None:
            ex.info = read_request(endpoint, None, "body_too_large")

        async def rest() -> AsyncIterator[bytes]:
            for part in head:
                yield part
            head.clear()
            async for chunk in content.iter_any():
                yield chunk

        return rest(), 0

    def _read_request(self, request: web.BaseRequest, ex: _Exchange, endpoint: str, body: bytes) -> None:
        try:
            encoding = request.headers.get("Content-Encoding")
            if encoding:  # forwarded as it came; a decoded copy (bounded) is read and dropped at once
                plain, reason = decoded_body(body, encoding, self._limit)
                ex.info = read_request(endpoint, plain, reason)
            else:
                ex.info = read_request(endpoint, body)
        except Exception:  # noqa: BLE001 — observation must never break the proxy
            ex.info = RequestInfo(endpoint=endpoint, parse_error="unparsable_request")

    async def _send(
        self, request: web.BaseRequest, data: bytes | AsyncIterator[bytes] | None
    ) -> aiohttp.ClientResponse:
        headers = end_to_end(request.headers, REQUEST_ONLY_DROP)
        if not isinstance(data, bytes | None) and request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)  # streamed through: same framing
        skip = [h for h in CLIENT_AUTO_HEADERS if h not in request.headers]
        # raw_path is the path and query exactly as the client sent them: no re-encoding on the way.
        url = URL(self._upstream + request.raw_path, encoded=True)
        retried = False
        while True:
            _REUSED.set(False)
            _FRESH.set(retried)
            try:
                return await self._session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    auto_decompress=False,
                    skip_auto_headers=skip,
                    timeout=self._timeout,
                )
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
                # A pooled connection the upstream had already closed: vLLM never read this request.
                # Only a buffered body can be sent again; a connect failure is not this case.
                if retried or not _REUSED.get() or not isinstance(data, bytes | None) or isinstance(
                    error, aiohttp.ClientConnectorError
                ):
                    raise
                retried = True
                log.debug("proxy_retry_on_new_connection", reason=type(error).__name__)
            finally:
                _FRESH.set(False)

    # --- the handler ---------------------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        ex = _Exchange(time.perf_counter())
        try:
            return await self._proxy(request, ex)
        except asyncio.CancelledError:
            ex.client_gone()  # the server cancels a handler when its client disconnects
            raise
        finally:
            self._done(ex)

    async def _proxy(self, request: web.BaseRequest, ex: _Exchange) -> web.StreamResponse:
        if request.raw_path[:1] != "/":
            self._problems.warning("proxy_rejected_target", "not_a_path", method=request.method)
            return openai_error(400, "This proxy forwards only origin-form targets (/path).", "invalid_request_error")
        endpoint = ex.endpoint = OBSERVED_PATHS.get(request.path) if request.method == "POST" else None
        held = 0
        try:
            try:
                expect = request.headers.get("Expect")
                if expect is not None and request.version >= (1, 1):
                    if expect.lower() != "100-continue":
                        return web.Response(status=417)
                    # The client waits for this before it sends the body (aiohttp's router would send it).
                    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                    request.writer.output_size = 0
                data, held = await self._request_body(request, ex, endpoint)
            except (asyncio.IncompleteReadError, aiohttp.ClientPayloadError, ConnectionError, web.HTTPException):
                # The client broke off its body (or sent a malformed one): nothing complete to forward.
                ex.client_gone()
                return web.Response(status=400)
            try:
                upstream = await self._send(request, data)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
                ex.outcome.status = 502
                ex.outcome.unattributed = "upstream_unreachable"
                ex.upstream_failed = True
                self._problems.warning("proxy_upstream_unreachable", type(error).__name__)
                return openai_error(
                    502, "The model server behind this proxy could not be reached.", "upstream_unavailable"
                )
        finally:
            self.budget.give(held)
            data = None  # noqa: F841 — the body is sent: let it go before the response streams
        clean = False
        try:
            response, clean = await self._relay(request, upstream, ex)
            return response
        finally:
            if clean:
                upstream.release()  # keep-alive connection back to the pool
            else:
                upstream.close()  # drop the connection: vLLM sees the disconnect and aborts the request

    async def _relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, ex: _Exchange
    ) -> tuple[web.StreamResponse, bool]:
        outcome = ex.outcome
        outcome.status = upstream.status
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=end_to_end(upstream.headers)
        )
        observer: SseObserver | BodyObserver | None = None
        info = ex.info
        if info is not None and info.parse_error is None and upstream.status < 400:
            content_type = upstream.headers.get("Content-Type", "")
            if "text/event-stream" in content_type:
                observer = SseObserver(self._limit, self.budget)
            else:
                observer = BodyObserver(self._limit, self.budget)
        try:
            try:
                await response.prepare(request)
            except (ConnectionError, RuntimeError):
                return self._client_failed(request, ex, response)
            read = upstream.content.readany
            write = response.write
            while True:
                try:
                    chunk = await read()
                except asyncio.CancelledError:
                    raise
                except Exception as error:  # noqa: BLE001 — any failure reading vLLM is vLLM's side
                    # Upstream broke mid-body: the client must see a broken response, not a clean short one.
                    outcome.unattributed = "upstream_reset"
                    ex.upstream_failed = True
                    self._problems.warning("proxy_upstream_reset", type(error).__name__)
                    if request.transport is not None:
                        request.transport.close()
                    return response, False
                if not chunk:
                    break
                now = time.perf_counter()
                try:
                    await write(chunk)
                except (ConnectionError, RuntimeError):
                    return self._client_failed(request, ex, response)  # writing to the client failed
                if observer is not None:
                    try:
                        observer.feed(chunk, now, outcome)
                    except Exception:  # noqa: BLE001
                        observer.close()
                        observer = None
                        outcome.unattributed = "observer_error"
            try:
                await response.write_eof()
            except (ConnectionError, RuntimeError):
                return self._client_failed(request, ex, response)
            if observer is not None:
                try:
                    observer.finish(time.perf_counter(), outcome)
                except Exception:  # noqa: BLE001
                    outcome.unattributed = "observer_error"
            return response, True
        finally:
            if observer is not None:
                observer.close()

    @staticmethod
    def _client_failed(
        request: web.BaseRequest, ex: _Exchange, response: web.StreamResponse
    ) -> tuple[web.StreamResponse, bool]:
        """Writing to the client failed: its side. The half-written response is abandoned with its
        connection (nothing more is written to it) and the upstream connection is dropped."""
        ex.client_gone()
        if request.transport is not None:
            request.transport.close()
        return response, False

    def _done(self, ex: _Exchange) -> None:
        """Record an observed request; called exactly once per request, from ``handle``'s ``finally``."""
        if ex.endpoint is None:
            return
        # A request whose body never arrived whole (the client went away) is still recorded.
        info = ex.info if ex.info is not None else RequestInfo(endpoint=ex.endpoint)
        try:
            self._recorder.request_done(info, ex.outcome, ex.started, time.perf_counter())
        except Exception as error:  # noqa: BLE001 — a recorder bug must not fail the request or flood the log
            self._problems.warning("tap_record_failed", type(error).__name__, exc_info=True)


def proxy_runner(proxy: Proxy) -> web.ServerRunner:
    """A bare aiohttp server around ``proxy.handle``: no router or middlewares on the request path, so
    every target (including ``*`` and absolute-form) reaches the handler. Request bodies are not
    decompressed (they are forwarded as received). ``handler_cancellation``: a client that disconnects
    cancels its handler at once, which closes the upstream connection so vLLM aborts the request."""
    server = web.Server(proxy.handle, handler_cancellation=True, auto_decompress=False, access_log=None)
    return web.ServerRunner(server)
