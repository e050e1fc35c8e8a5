"""The sidecar's HTTP application: /metrics, /healthz, /readyz, and the poll loop's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import choose_encoder

from sidecar import __version__
from sidecar.collector import HealthCollector
from sidecar.config import Settings
from sidecar.monitor import Monitor
from sidecar.scrape import Scraper

log = structlog.get_logger("sidecar.app")

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", CollectorRegistry)
SESSION = web.AppKey("session", aiohttp.ClientSession)
MONITOR = web.AppKey("monitor", Monitor)
POLL_TASK = web.AppKey("poll_task", asyncio.Task)


async def metrics(request: web.Request) -> web.Response:
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encoder(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": content_type})


async def healthz(request: web.Request) -> web.Response:
    """Alive while the poll loop runs (whatever the upstream's state)."""
    task = request.app.get(POLL_TASK)
    if task is None or task.done():
        return web.json_response({"status": "poll loop not running"}, status=503)
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready once the last poll of vLLM /metrics succeeded."""
    state = request.app[MONITOR].state
    if not state.up:
        return web.json_response({"status": "upstream not reachable", "scrapes": state.scrapes}, status=503)
    return web.json_response({"status": "ok", "scrapes": state.scrapes})


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300), auto_decompress=True
    )
    app[SESSION] = session
    settings = app[SETTINGS]
    monitor = Monitor(settings, Scraper(session, settings.upstream, settings.scrape_timeout), app[REGISTRY])
    app[MONITOR] = monitor
    app[REGISTRY].register(HealthCollector(lambda: monitor.state, settings))
    yield
    await session.close()


async def _poll_loop(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(app[MONITOR].run(), name="specdec-poll")
    app[POLL_TASK] = task
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> web.Application:
    app = web.Application()
    app[SETTINGS] = settings
    app[REGISTRY] = registry if registry is not None else CollectorRegistry()
    info = Gauge("specdec_build_info", "specdec-sidecar version.", ["version"], registry=app[REGISTRY])
    info.labels(__version__).set(1)
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_poll_loop)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
