"""A loopback upstream that behaves like a production vLLM pod rather than a polite fake.

What it does that the simple fakes in ``conftest.py`` do not:

* ``/metrics`` is big (by default the real vLLM 0.32 capture repeated for eight data-parallel engines,
  over 300 KB) and written in many small pieces, each flushed and followed by a yield to the event loop, so
  the client receives it in many socket reads; chunked transfer encoding, no Content-Length.
* gzip when the client's ``Accept-Encoding`` allows it (prometheus_client's own exporters and many hops
  compress).
* idle keep-alive connections are closed after ``keepalive`` seconds (uvicorn, and so vLLM, closes them
  after 5 s: ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``).
* with ``api_key`` set, every ``/v1/*`` path answers 401 without ``Authorization: Bearer <key>``, while
  ``/metrics`` stays open, as vLLM's ``--api-key`` does.
* ``POST /v1/completions`` and ``/v1/chat/completions`` replay recorded vLLM responses; streams are written
  one SSE event per write.

Tests change ``page`` between polls to move counters, and read ``hits`` and ``connections``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections import Counter
from pathlib import Path

from aiohttp import web

FIXTURES = Path(__file__).parent / "fixtures"
_ENGINE = re.compile(r'engine="0"')


def data_parallel_page(text: str, engines: int = 8) -> str:
    """The one-engine page *text* as a data-parallel server with *engines* engines would export it."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("#") or 'engine="0"' not in line:
            out.append(line)
            continue
        out.extend(_ENGINE.sub(f'engine="{engine}"', line) for engine in range(engines))
    return "\n".join(out) + "\n"


def default_page() -> str:
    return data_parallel_page((FIXTURES / "vllm-0.32-draft-t3.prom").read_text())


def _sse_events(data: bytes) -> list[bytes]:
    parts = data.split(b"\n\n")
    return [p + b"\n\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


class HostileVllm:
    def __init__(
        self,
        page: str | None = None,
        *,
        api_key: str | None = "sk-hostile",
        keepalive: float = 5.0,
        write_size: int = 1000,
        gzip_ok: bool = True,
        models: tuple[str, ...] = ("tiny-target",),
    ) -> None:
        self.page = page if page is not None else default_page()
        self.api_key = api_key
        self.keepalive = keepalive
        self.write_size = write_size
        self.gzip_ok = gzip_ok
        self.models = models
        self.status = 200
        self.hits: Counter[str] = Counter()
        self.unauthorized = 0
        self._transports: set[int] = set()
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        """Distinct client connections seen so far."""
        return len(self._transports)

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        self.hits[request.path] += 1
        if request.transport is not None:
            self._transports.add(id(request.transport))
        if self.api_key is not None and request.path.startswith("/v1/"):
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                self.unauthorized += 1
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def _write_in_pieces(self, request: web.Request, body: bytes, headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(status=self.status, headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), self.write_size):
            await response.write(body[start : start + self.write_size])
            await asyncio.sleep(0)  # let the socket flush: the client sees many small reads
        await response.write_eof()
        return response

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        body = self.page.encode()
        headers = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        if self.gzip_ok and "gzip" in request.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return await self._write_in_pieces(request, body, headers)

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        chat = request.path.endswith("/chat/completions")
        if body.get("stream"):
            name = "chat-stream.sse" if chat else "completion-stream.sse"
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
            await response.prepare(request)
            for event in _sse_events((FIXTURES / name).read_bytes()):
                await response.write(event)
                await asyncio.sleep(0)
            await response.write_eof()
            return response
        name = "chat-nonstream.json" if chat else "completion-nonstream.json"
        return await self._write_in_pieces(
            request, (FIXTURES / name).read_bytes(), {"Content-Type": "application/json"}
        )

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        self.runner = web.AppRunner(app, keepalive_timeout=self.keepalive, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class HostileRelay:
    """Put in front of a real vLLM: its ``/metrics`` page comes back in ``write_size``-byte writes, gzipped
    when asked, and every other request is relayed as is (status, headers, body streamed in pieces); idle
    connections close after ``keepalive`` seconds, as uvicorn's do."""

    HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"})

    def __init__(self, target: str, *, write_size: int = 512, keepalive: float = 5.0) -> None:
        self.target = target.rstrip("/")
        self.write_size = write_size
        self.keepalive = keepalive
        self.metrics_polls = 0
        self.gzip_polls = 0
        self.runner: web.AppRunner | None = None
        self.port = 0
        self._session = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self.HOP}
        body = await request.read()
        async with self._session.request(request.method, self.target + request.raw_path, headers=headers,
                                         data=body or None) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in self.HOP}
            if request.path == "/metrics" and upstream.status == 200:
                self.metrics_polls += 1
                if "gzip" in request.headers.get("Accept-Encoding", ""):
                    self.gzip_polls += 1
                    payload = gzip.compress(payload)
                    out["Content-Encoding"] = "gzip"
            response = web.StreamResponse(status=upstream.status, headers=out)
            response.enable_chunked_encoding()
            await response.prepare(request)
            for start in range(0, len(payload), self.write_size):
                await response.write(payload[start : start + self.write_size])
                await asyncio.sleep(0)
            await response.write_eof()
            return response

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(auto_decompress=True)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self.runner = web.AppRunner(app, keepalive_timeout=self.keepalive, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self._session is not None:
            await self._session.close()
