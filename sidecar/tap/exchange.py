"""The exchange policy: what the proxy does with one request between the client's connection (``http1.py``)
and vLLM's (``upstream.py``) — what is observed, what memory observation may take, when a request is sent
again, and how each failure is counted.

* **Observed**: POSTs to ``OBSERVED_PATHS``. Their request body is read whole when it fits
  ``max_observed_body`` and the shared ``Budget`` (then sent with its length), else it streams through
  unobserved (``body_too_large``). A 2xx/3xx response to an observed request goes past an observer
  (``observe.py``) as it is written to the client; an observer that raises is dropped and the request
  counted as ``observer_error``: observation never fails the request.
* **Failures are counted on the side where they happen, when they happen**: no connection to vLLM, or
  vLLM closing before its response head, is ``upstream_unreachable`` (the client gets a 502 with an
  OpenAI-style JSON error); vLLM breaking off mid-body is ``upstream_reset`` (the client's connection is
  closed, so it sees a broken response, not a clean short one); the client's body breaking off or its
  connection closing is ``client_disconnected`` (status 499 when no response had started). A failure on
  one side never overwrites the other side's.
* **Sent again** once, on a new connection, only when vLLM cannot have acted on it: a buffered request
  whose connection was found closed before any byte of it was written (``UpstreamError.stage`` ``unsent``),
  or a request of a safe method (GET, HEAD, OPTIONS) on a *pooled* connection that vLLM closed before
  answering. A POST that was written is never sent twice: vLLM may have read it and started generating
  before it died, so the client gets the 502 (as nginx, which retries no non-idempotent request once it
  was sent). The pool does not hand out a connection vLLM closed while it was idle (``upstream.py``).
* Every observed request is recorded exactly once (``Recorder.request_done``), whatever path it took.
* Every request on any path is counted once by the status its client got, the failures the proxy answered
  itself by reason, and the sidecar's own time per relayed request is observed (``proxy_metrics.py``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Protocol
from urllib.parse import unquote

import structlog

from sidecar.logs import RateLimited
from sidecar.tap.http1 import ClientConnection, Request, ResponseWriter
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
from sidecar.tap.proxy_metrics import ERROR_STATUS, UPSTREAM_CLOSED, UPSTREAM_RESET, ProxyMetrics
from sidecar.tap.upstream import (
    CONNECT,
    NO_RESPONSE,
    UNSENT,
    Head,
    Origin,
    UpstreamConnection,
    UpstreamError,
    UpstreamPool,
)

log = structlog.get_logger("sidecar.tap.exchange")

# The status recorded for a request whose client went away before the response started (nginx's 499).
CLIENT_CLOSED = 499
# Methods a client may send twice on its own (RFC 9110 §9.2.1), so the proxy may too: resent after vLLM
# closed a pooled connection without answering, although the request was written.
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})


class Recorder(Protocol):
    def request_done(self, info: RequestInfo | None, outcome: Outcome, started: float, ended: float) -> None: ...


def openai_error(status: int, message: str, kind: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()


class Exchange:
    """One proxied request's record: what was asked, what came of it, and which side failed first."""

    __slots__ = ("endpoint", "info", "outcome", "started", "upstream_failed")

    def __init__(self, started: float, endpoint: str | None) -> None:
        self.endpoint = endpoint  # set for the observed endpoints: those are recorded
        self.info: RequestInfo | None = None
        self.outcome = Outcome()
        self.started = started
        self.upstream_failed = False

    def upstream_failure(self, reason: str, status: int | None = None) -> None:
        """vLLM's side failed: ``upstream_unreachable`` (with the 502 the client gets) or ``upstream_reset``."""
        if status is not None:
            self.outcome.status = status
        self.outcome.unattributed = reason
        self.upstream_failed = True

    def client_gone(self) -> None:
        """The client's side ended the exchange: its body broke off or its connection closed."""
        if self.outcome.status == 0:
            self.outcome.status = CLIENT_CLOSED
        if not self.upstream_failed:
            self.outcome.unattributed = "client_disconnected"

    def observer_failed(self) -> None:
        self.outcome.unattributed = "observer_error"


class _ClientGone(Exception):
    """Raised where the client's side is found gone (its body broke off, or its connection closed)."""


class ObservedResponse:
    """The upstream's sink for an observed response: each piece is written to the client, then read by the
    observer (timed when it arrived, before the write)."""

    __slots__ = ("writer", "observer", "exchange")

    def __init__(self, writer: ResponseWriter, observer: SseObserver | BodyObserver, exchange: Exchange) -> None:
        self.writer = writer
        self.observer: SseObserver | BodyObserver | None = observer
        self.exchange = exchange

    def body(self, data: bytes) -> None:
        if not data:
            return
        now = time.perf_counter()
        self.writer.body(data)
        observer = self.observer
        if observer is not None:
            try:
                observer.feed(data, now, self.exchange.outcome)
            except Exception:  # noqa: BLE001
                self.close()
                self.exchange.observer_failed()

    def finish(self) -> None:
        if self.observer is not None:
            try:
                self.observer.finish(time.perf_counter(), self.exchange.outcome)
            except Exception:  # noqa: BLE001
                self.exchange.observer_failed()

    def close(self) -> None:
        """Give the observer's memory back; safe to call more than once."""
        observer, self.observer = self.observer, None
        if observer is not None:
            observer.close()


class ExchangePolicy:
    """Runs each request the HTTP/1.1 layer hands over (``exchange``), against *pool*'s connections to *origin*.

    *max_observed_body*: the most one request's body or buffered response may hold for observation;
    *budget*: what all in-flight observations together may hold; *metrics*: the proxy's own RED families
    (None: not counted)."""

    def __init__(self, origin: Origin, pool: UpstreamPool, recorder: Recorder, max_observed_body: int,
                 budget: Budget, metrics: ProxyMetrics | None = None) -> None:
        self.origin = origin
        self.pool = pool
        self.budget = budget
        self._recorder = recorder
        self._metrics = metrics
        self._limit = max_observed_body
        self._problems = RateLimited(log)

    async def exchange(self, request: Request, client: ClientConnection) -> bool:
        """Proxy one request; returns whether the client connection may carry another."""
        endpoint = None
        if request.method == b"POST" and request.target[:1] == b"/":
            endpoint = OBSERVED_PATHS.get(unquote(request.target.split(b"?", 1)[0].decode("latin-1")))
        ex = Exchange(time.perf_counter(), endpoint)
        try:
            return await self._exchange(request, client, ex)
        except asyncio.CancelledError:  # only the client's connection cancels an exchange (it closed)
            ex.client_gone()
            raise
        except _ClientGone:
            ex.client_gone()
            return False
        finally:
            if self._metrics is not None:
                self._metrics.response(ex.outcome.status)
            self._record(ex)

    async def _exchange(self, request: Request, client: ClientConnection, ex: Exchange) -> bool:
        if request.target[:1] != b"/":
            self._problems.warning("proxy_rejected_target", "not_a_path", method=request.method.decode("latin-1"))
            ex.outcome.status = 400
            return client.reply(request, 400, openai_error(
                400, "This proxy forwards only origin-form targets (/path).", "invalid_request_error"))
        if request.expect is not None and request.version != "1.0":
            if request.expect.lower() != b"100-continue":
                ex.outcome.status = 417
                return client.reply(request, 417, b"")
            if not request.body_done:  # the client waits for this before it sends the body
                client.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        held = 0
        try:
            body, held = await self._request_body(request, ex)
            # Received: the request's last byte (or the exchange's start, for a pipelined request that waited
            # its turn), or now when its body streams through: what the proxy waits for before it sends. The
            # sidecar's own time runs from here to the request written to vLLM.
            received = max(request.done_at, ex.started) if request.body_done else time.perf_counter()
            conn, head = await self._send(request, body)
        except UpstreamError as error:
            reason = error.cause if error.stage == CONNECT and error.cause else UPSTREAM_CLOSED
            status = ERROR_STATUS[reason]
            ex.upstream_failure("upstream_unreachable", status)
            if self._metrics is not None:
                self._metrics.error(reason)
            self._problems.warning("proxy_upstream_unreachable", error.stage, detail=str(error)[:200])
            if request.stream_to is not None or not request.body_done:
                request.keep_alive = False  # the rest of its body is not going to be read
            return client.reply(request, status, openai_error(
                status, "The model server behind this proxy could not be reached." if status == 502 else
                "The model server behind this proxy did not accept a connection in time.", "upstream_unavailable"))
        finally:
            self.budget.give(held)
        try:
            return await self._relay(request, client, conn, head, ex, received)
        finally:
            if request.stream_to is not None and not request.body_done:
                conn.close()  # vLLM answered before the body ended: the rest must not reach another request
            self.pool.release(conn)  # back to the pool only if the exchange ended cleanly

    # --- the request body: observed, held or streamed --------------------------------------------------------

    async def _request_body(self, request: Request, ex: Exchange) -> tuple[bytes | None, int]:
        """(the whole body when it is buffered, else None: it streams through; bytes charged to the budget).
        The bytes parsed for observation are the bytes forwarded."""
        endpoint = ex.endpoint
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
                ex.info = self._read_request(request, endpoint, body)
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
                        ex.info = self._read_request(request, endpoint, body)
                    return body, held
        self.budget.give(held)  # what arrived so far is sent at once; it is not observation memory any more
        if endpoint is not None:
            ex.info = read_request(endpoint, None, "body_too_large")
        return None, 0

    @staticmethod
    async def _more(request: Request) -> None:
        await request.more()
        if request.body_broken:
            raise _ClientGone

    def _read_request(self, request: Request, endpoint: str, body: bytes) -> RequestInfo:
        try:
            encoding = request.header(b"content-encoding")
            if encoding:  # forwarded as it came; a decoded copy (bounded) is read and dropped at once
                plain, reason = decoded_body(body, encoding.decode("latin-1"), self._limit)
                return read_request(endpoint, plain, reason)
            return read_request(endpoint, body)
        except Exception:  # noqa: BLE001 — observation must never break the proxy
            return RequestInfo(endpoint=endpoint, parse_error="unparsable_request")

    # --- to vLLM and back ------------------------------------------------------------------------------------

    async def _send(self, request: Request, body: bytes | None) -> tuple[UpstreamConnection, Head]:
        head_bytes, chunks = self.origin.request_head(request, body)
        streamed = body is None and request.has_body
        no_body = request.method == b"HEAD"
        retried = False
        while True:
            conn = await self.pool.acquire(fresh=retried)
            try:
                waiter = conn.send(head_bytes, body, no_body)
                if streamed:
                    # while the upstream's write buffer is full, the client's body is not read
                    conn.on_write_paused = request.owner.pause_body
                    request.stream(conn, chunks)
                return conn, await waiter
            except UpstreamError as error:
                conn.close()
                if retried or streamed or not self._may_resend(request, conn, error):
                    raise
                retried = True
                log.debug("proxy_retry_on_new_connection", stage=error.stage, reason=str(error)[:100])
            except BaseException:
                conn.close()
                raise

    @staticmethod
    def _may_resend(request: Request, conn: UpstreamConnection, error: UpstreamError) -> bool:
        """A buffered request may go out once more, on a new connection, after *error* on *conn*: when vLLM
        never received it, or when it is safe to repeat and a pooled connection died before any answer."""
        if error.stage == UNSENT:
            return True
        return error.stage == NO_RESPONSE and conn.reused and request.method in SAFE_METHODS

    async def _relay(
        self, request: Request, client: ClientConnection, conn: UpstreamConnection, head: Head, ex: Exchange,
        received: float,
    ) -> bool:
        ex.outcome.status = head.status
        observer: SseObserver | BodyObserver | None = None
        info = ex.info
        if info is not None and info.parse_error is None and head.status < 400:
            if b"text/event-stream" in (head.get(b"content-type") or b""):
                observer = SseObserver(self._limit, self.budget)
            else:
                observer = BodyObserver(self._limit, self.budget)
        if client.closed:
            raise _ClientGone
        writer = ResponseWriter(client, request, head.status, head.reason, head.headers)
        observed = ObservedResponse(writer, observer, ex) if observer is not None else None
        try:
            done = conn.attach(observed if observed is not None else writer)  # what arrived is written at once
            client.begin_response(conn)
            if not done.done():
                writer.flush_head()  # the head goes out now, not with the first event (TTFT stays honest)
            if self._metrics is not None:  # the head is out (with the first body piece, or just now)
                self._metrics.overhead_seconds(conn.sent_at - received + time.perf_counter() - conn.first_byte_at)
            try:
                await done
            except UpstreamError as error:
                # Upstream broke mid-body: the client must see a broken response, not a clean short one.
                ex.upstream_failure("upstream_reset")
                if self._metrics is not None:
                    self._metrics.error(UPSTREAM_RESET)
                self._problems.warning("proxy_upstream_reset", error.stage, detail=str(error)[:200])
                client.abort_response()
                return False
            if client.closed:
                raise _ClientGone
            writer.end()
            if observed is not None:
                observed.finish()
            # The connection to the client goes on only if the request's body was read to its end.
            return writer.keep_alive and request.body_done and not request.body_broken
        finally:
            client.end_response()
            if observed is not None:
                observed.close()

    def _record(self, ex: Exchange) -> None:
        """Record an observed request; called exactly once per request, from ``exchange``'s ``finally``."""
        if ex.endpoint is None:
            return
        # A request whose body never arrived whole (the client went away) is still recorded.
        info = ex.info if ex.info is not None else RequestInfo(endpoint=ex.endpoint)
        try:
            self._recorder.request_done(info, ex.outcome, ex.started, time.perf_counter())
        except Exception as error:  # noqa: BLE001 — a recorder bug must not fail the request or flood the log
            self._problems.warning("tap_record_failed", type(error).__name__, exc_info=True)
