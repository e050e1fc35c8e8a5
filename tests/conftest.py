"""Shared fixtures: recorded real vLLM captures and a local upstream that replays them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.app import PROXY_PORT, create_app
from sidecar.config import build_settings

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads((FIXTURES / "MANIFEST.json").read_text())


@pytest.fixture(params=["vllm-0.32-draft-t3.prom", "vllm-0.32-ngram.prom", "vllm-0.32-draft-restarted.prom"])
def vllm_exposition(request) -> str:
    return fixture_text(request.param)


async def serve_loopback(app: web.Application, port: int = 0, **runner_kw) -> tuple[web.AppRunner, int]:
    """Serve *app* on 127.0.0.1 (port 0 = any free one); returns the runner and the bound port."""
    runner_kw.setdefault("access_log", None)  # the fakes' access lines are not the sidecar's logs
    runner = web.AppRunner(app, **runner_kw)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, runner.addresses[0][1]


class FakeVllm:
    """A loopback HTTP server that answers /metrics with whatever the test says, and can vanish."""

    def __init__(self) -> None:
        self.text = ""
        self.status = 200
        self.delay = 0.0
        self.body: bytes | None = None
        self.hits = 0
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.body is not None:
            return web.Response(body=self.body, status=self.status, content_type="text/plain")
        return web.Response(text=self.text, status=self.status, content_type="text/plain")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner, self.port = await serve_loopback(app, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def hostile_vllm():
    """A production-like upstream (see tests/hostile.py): 300 KB+ page in many writes, gzip, 1 s keep-alive,
    API key ``sk-hostile`` on /v1/*."""
    from hostile import HostileVllm

    server = HostileVllm(keepalive=1.0)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def fake_vllm():
    server = FakeVllm()
    await server.start()
    yield server
    await server.stop()


def start_vllm(tmp_path_factory, speculative: dict, per_request_metrics: bool = True):
    """A real vLLM serving the tiny target (not yet started: use ``with``); fails, never skips, without vLLM."""
    from devstack.vllm_server import REPO, VllmServer, vllm_python

    if not vllm_python().exists():
        pytest.fail(f"vLLM is not installed at {vllm_python()} (run `make vllm`)")
    log = Path(tmp_path_factory.mktemp("vllm")) / "vllm.log"
    return VllmServer(
        model=REPO / "models" / "tiny-target", speculative=speculative, log_path=log, startup_timeout=400,
        per_request_metrics=per_request_metrics,
    )


@pytest.fixture(scope="session")
def selfdraft_vllm(tmp_path_factory):
    """A real vLLM with the tiny target drafting for itself (k=4), shared by the live Prometheus tests
    (alerting and dashboards): each start-up costs about a minute of CI."""
    from devstack.vllm_server import REPO

    model = REPO / "models" / "tiny-target"
    with start_vllm(tmp_path_factory, {"method": "draft_model", "model": str(model), "num_speculative_tokens": 4}) as server:
        yield server


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def sse_events(data: bytes) -> list[bytes]:
    """Split a recorded stream into the writes vLLM made (one SSE event each)."""
    parts = data.split(b"\n\n")
    return [p + b"\n\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


class ReplayVllm:
    """Serves recorded vLLM responses; behaviour can be switched per request with X-Fake."""

    def __init__(self) -> None:
        self.disconnected = asyncio.Event()
        self.seen: list[dict] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        mode = request.headers.get("X-Fake", "")
        self.seen.append({"headers": dict(request.headers), "len": len(raw), "path": request.path_qs})
        if mode == "echo":
            return web.json_response(
                {"sha256": hashlib.sha256(raw).hexdigest(), "len": len(raw), "method": request.method,
                 "raw_path": request.raw_path, "auth": request.headers.get("Authorization")}
            )
        if mode == "error":
            return web.json_response({"object": "error", "message": "boom", "type": "InternalServerError",
                                      "code": 500}, status=500)
        body = json.loads(raw)
        chat = request.path.endswith("/chat/completions")
        if body.get("stream"):
            name = "chat-stream.sse" if chat else "completion-stream.sse"
            if mode == "no-spec":
                name = "completion-stream-no-spec-metrics.sse"
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
            await response.prepare(request)
            events = sse_events((FIXTURES / name).read_bytes())
            try:
                for i, event in enumerate(events):
                    if mode == "reset" and i == 3:
                        request.transport.abort()
                        return response
                    if mode == "slow":
                        await asyncio.sleep(0.05)
                    await response.write(event)
                if mode == "slow":
                    for _ in range(200):
                        await asyncio.sleep(0.05)
                        await response.write(b": keep-alive\n\n")
            except (ConnectionResetError, asyncio.CancelledError):
                self.disconnected.set()
                raise
            await response.write_eof()
            return response
        name = "chat-nonstream.json" if chat else "completion-nonstream.json"
        return web.Response(body=(FIXTURES / name).read_bytes(), content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "tiny-target", "object": "model"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=(FIXTURES / "vllm-0.32-draft-t1.prom").read_bytes(), content_type="text/plain")

    async def anything(self, request: web.Request) -> web.Response:
        raw = await request.read()
        return web.json_response({"method": request.method, "raw_path": request.raw_path, "len": len(raw)},
                                 status=201, headers={"X-Upstream": "yes"})

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_route("*", "/{tail:.*}", self.anything)
        self.runner, self.port = await serve_loopback(app, handler_cancellation=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def upstream():
    server = ReplayVllm()
    await server.start()
    yield server
    await server.runner.cleanup()


@pytest.fixture
async def proxy(aiohttp_client, upstream):
    registry = CollectorRegistry()
    settings = build_settings(upstream=upstream.url, scrape_interval="0.1s", scrape_timeout="0.1s",
                              windows="10m", verdict_window="10m", proxy_port=0, proxy_host="127.0.0.1",
                              min_drafts=1, models="tiny-target")
    client = await aiohttp_client(create_app(settings, registry))
    port = client.app[PROXY_PORT]
    session = aiohttp.ClientSession(auto_decompress=False, connector=aiohttp.TCPConnector(limit=0))
    session.base = f"http://127.0.0.1:{port}"
    session.registry = registry
    session.metrics_client = client
    yield session
    await session.close()


