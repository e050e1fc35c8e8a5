"""A thin, byte-exact reverse proxy in front of vLLM that taps each request as it streams through.

Every method, path, query, header and body is forwarded; the response's status, headers and body come back
unchanged, streamed chunk by chunk (no whole bodies held), except hop-by-hop headers (RFC 9110 §7.6.1).
Bodies are not decompressed or re-encoded. A client that goes away cancels the handler, which closes the
upstream connection, so vLLM aborts the request. If vLLM cannot be reached the client gets a 502 with an
OpenAI-style JSON error. Observation (``tap.py``) reads copies of the bytes and can never fail the request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Protocol

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from sidecar.tap.observe import (
    OBSERVED_PATHS,
    BodyObserver,
    Outcome,
    RequestInfo,
    SseObserver,
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


class Recorder(Protocol):
    def request_done(self, info: RequestInfo | None, outcome: Outcome, started: float, ended: float) -> None: ...


def end_to_end(headers: CIMultiDict[str] | object, also_drop: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """*headers* less the hop-by-hop ones: the fixed list, those named by ``Connection``, and *also_drop*
    (lower case). Used for both directions, so requests and responses lose exactly the same kinds."""
    out: CIMultiDict[str] = CIMultiDict()
    drop = set(HOP_BY_HOP) | also_drop
    for value in headers.getall("Connection", []):  # type: ignore[attr-defined]
        drop |= {token.strip().lower() for token in value.split(",")}
    for key, value in headers.items():  # type: ignore[attr-defined]
        if key.lower() not in drop:
            out.add(key, value)
    return out


# Host and Content-Length are set for the upstream hop; Expect was already answered to the client (aiohttp
# sends its 100 Continue), so repeating it upstream could stall the body.
REQUEST_ONLY_DROP = frozenset({"host", "content-length", "expect"})


def openai_error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": kind, "param": None, "code": status}}, status=status
    )


class Proxy:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        upstream: str,
        recorder: Recorder,
        max_observed_body: int,
        connect_timeout: float,
    ) -> None:
        self._session = session
        self._upstream = upstream.rstrip("/")
        self._recorder = recorder
        self._limit = max_observed_body
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout, connect=connect_timeout)

    async def _request_body(self, request: web.Request) -> tuple[bytes | AsyncIterator[bytes] | None, bytes | None]:
        """(what to send upstream, the whole body if it fit under the observation limit)."""
        if not request.body_exists:
            return None, b""
        length = request.content_length
        if length is not None and length <= self._limit:
            body = await request.content.readexactly(length) if length else b""
            return body, body
        # Unknown or large length: read up to the limit; beyond it, stream the rest through unobserved.
        head = bytearray()
        while len(head) <= self._limit:
            chunk = await request.content.readany()
            if not chunk:
                return bytes(head), bytes(head)
            head += chunk

        async def rest() -> AsyncIterator[bytes]:
            yield bytes(head)
            async for chunk in request.content.iter_any():
                yield chunk

        return rest(), None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        endpoint = OBSERVED_PATHS.get(request.path) if request.method == "POST" else None
        info: RequestInfo | None = None
        outcome = Outcome()
        try:
            data, whole = await self._request_body(request)
        except (asyncio.IncompleteReadError, aiohttp.ClientPayloadError, ConnectionError):
            return web.Response(status=400)  # client sent a broken body; nothing to forward
        if endpoint is not None:
            try:
                info = read_request(endpoint, whole)
            except Exception:  # noqa: BLE001 — observation must never break the proxy
                info = RequestInfo(endpoint=endpoint, parse_error="unparsable_request")

        headers = end_to_end(request.headers, REQUEST_ONLY_DROP)
        skip = [h for h in CLIENT_AUTO_HEADERS if h not in request.headers]
        # raw_path is the path and query exactly as the client sent them: no re-encoding on the way.
        url = URL(self._upstream + request.raw_path, encoded=True)
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                auto_decompress=False,
                skip_auto_headers=skip,
                timeout=self._timeout,
            )
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as error:
            outcome.status = 502
            outcome.unattributed = "upstream_unreachable"
            self._done(info, outcome, started)
            log.warning("proxy_upstream_unreachable", reason=type(error).__name__)
            return openai_error(502, "The model server behind this proxy could not be reached.", "upstream_unavailable")

        relayed = False
        try:
            response = await self._relay(request, upstream, info, outcome, started)
            relayed = True
            return response
        finally:
            if relayed:
                upstream.release()  # keep-alive connection back to the pool
            else:
                upstream.close()  # drop the connection: vLLM sees the disconnect and aborts the request

    async def _relay(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        info: RequestInfo | None,
        outcome: Outcome,
        started: float,
    ) -> web.StreamResponse:
        outcome.status = upstream.status
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=end_to_end(upstream.headers)
        )
        observer = None
        if info is not None and info.parse_error is None and upstream.status < 400:
            content_type = upstream.headers.get("Content-Type", "")
            observer = SseObserver() if "text/event-stream" in content_type else BodyObserver(self._limit)
        await response.prepare(request)
        completed = False
        try:
            async for chunk in upstream.content.iter_any():
                now = time.perf_counter()
                await response.write(chunk)
                if observer is not None:
                    try:
                        observer.feed(chunk, now, outcome)
                    except Exception:  # noqa: BLE001
                        observer = None
                        outcome.unattributed = "observer_error"
            await response.write_eof()
            completed = True
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as error:
            # Upstream broke mid-body: the client must see a broken response, not a clean short one.
            outcome.unattributed = "upstream_reset"
            log.warning("proxy_upstream_reset", reason=type(error).__name__)
            if request.transport is not None:
                request.transport.close()
            raise
        except (ConnectionResetError, asyncio.CancelledError):
            outcome.unattributed = "client_disconnected"
            raise
        finally:
            if completed and observer is not None:
                try:
                    observer.finish(time.perf_counter(), outcome)
                except Exception:  # noqa: BLE001
                    outcome.unattributed = "observer_error"
            self._done(info, outcome, started)
        return response

    def _done(self, info: RequestInfo | None, outcome: Outcome, started: float) -> None:
        if info is None:
            return
        try:
            self._recorder.request_done(info, outcome, started, time.perf_counter())
        except Exception:  # noqa: BLE001
            log.exception("tap_record_failed")


def create_proxy_app(proxy: Proxy) -> web.Application:
    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app
