"""The sidecar's HTTP side: /metrics, /healthz, /readyz, the optional proxy, and background tasks' lifetime.

``create_app`` returns the metrics application. Three sources each publish their own snapshot on their own
clock: the monitor (poll loop over vLLM's /metrics), the tap's windows (``tap/windows.py``) and the
calibration file; the collector and the status page only read those snapshots. The cleanup context owns, in
order: the poll session, the poll loop, the tap's windows, the calibration watcher, the model-name refresher
and, when ``proxy_port`` is set, the proxy listening on its own port. Everything is cancelled and awaited on
shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, disable_created_metrics
from prometheus_client.exposition import choose_encoder

from sidecar import __version__
from sidecar.calibration import Calibration
from sidecar.calibration_source import CalibrationSource
from sidecar.config import Settings, redact_url
from sidecar.export.collector import HealthCollector
from sidecar.export.status_page import StatusPage
from sidecar.model_names import ModelNames, served_names
from sidecar.tap.metrics import RequestMetrics
from sidecar.tap.proxy import Proxy
from sidecar.tap.proxy_metrics import ProxyMetrics
from sidecar.tap.windows import TapHealth, TapMonitor
from sidecar.upstream.monitor import Monitor, MonitorState
from sidecar.upstream.scrape import Scraper

log = structlog.get_logger("sidecar.app")

SETTINGS = web.AppKey("settings", Settings)
REGISTRY = web.AppKey("registry", CollectorRegistry)
POLL_SESSION = web.AppKey("poll_session", aiohttp.ClientSession)
MONITOR = web.AppKey("monitor", Monitor)
REQUESTS = web.AppKey("requests", RequestMetrics)
MODEL_NAMES = web.AppKey("model_names", ModelNames)
TAP_WINDOWS = web.AppKey("tap_windows", TapMonitor)
CALIBRATION = web.AppKey("calibration", CalibrationSource)
POLL_TASK = web.AppKey("poll_task", asyncio.Task)
PROXY_PORT = web.AppKey("proxy_port", int)

MODEL_REFRESH_SECONDS = 60.0


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


async def _poll_session(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    # The poll session is the sidecar's own client of vLLM and decodes what it asks for (gzip); the proxy
    # has its own connections (sidecar.tap.upstream).
    poll_session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=4, keepalive_timeout=settings.upstream_keepalive),
        auto_decompress=True,
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    app[POLL_SESSION] = poll_session
    yield
    await poll_session.close()


async def _poll_loop(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    monitor = Monitor(
        settings,
        Scraper(app[POLL_SESSION], settings.upstream, settings.scrape_timeout, api_key=settings.api_key),
        app[REGISTRY],
        on_models=app[MODEL_NAMES].update_scraped,
    )
    app[MONITOR] = monitor
    task = asyncio.create_task(monitor.run(), name="specdec-poll")
    app[POLL_TASK] = task
    async with _running(task):
        yield


@contextlib.asynccontextmanager
async def _running(task: asyncio.Task) -> AsyncIterator[None]:
    """Cancel and await *task* when the block ends."""
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _tap_windows(app: web.Application) -> AsyncIterator[None]:
    async with _running(asyncio.create_task(app[TAP_WINDOWS].run(), name="specdec-tap-windows")):
        yield


async def _calibration(app: web.Application) -> AsyncIterator[None]:
    async with _running(asyncio.create_task(app[CALIBRATION].run(), name="specdec-calibration")):
        yield


async def _refresh_models(app: web.Application) -> None:
    """Keep the model label set equal to what vLLM serves (bounded; unknown names become ``other``).

    Without the API key a vLLM run with ``--api-key`` answers 401 here: logged once, and the names then come
    from the ``model_name`` values of ``/metrics`` alone (see ``model_names.py``).
    """
    settings, session = app[SETTINGS], app[POLL_SESSION]
    url = settings.upstream + "/v1/models"
    key = settings.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    last_problem: str | None = None
    while True:
        problem = None
        try:
            timeout = aiohttp.ClientTimeout(total=settings.scrape_timeout)
            async with session.get(url, timeout=timeout, headers=headers) as resp:
                if resp.status == 200:
                    names, aliases = served_names(await resp.json(content_type=None))
                    app[MODEL_NAMES].update_served(names, aliases)
                else:
                    problem = f"HTTP {resp.status}"
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError, ValueError) as error:
            problem = type(error).__name__
        if problem != last_problem and problem is not None:
            log.warning(
                "model_list_unavailable",
                url=redact_url(url),
                reason=problem,
                hint="set --upstream-api-key-file" if problem in ("HTTP 401", "HTTP 403") else None,
            )
        last_problem = problem
        await asyncio.sleep(MODEL_REFRESH_SECONDS if problem is None else max(settings.scrape_interval, 5.0))


async def _model_refresher(app: web.Application) -> AsyncIterator[None]:
    if app[SETTINGS].models:
        yield
        return
    async with _running(asyncio.create_task(_refresh_models(app), name="specdec-models")):
        yield


async def _proxy(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    if settings.proxy_port is None:
        yield
        return
    proxy = Proxy(
        settings.upstream,
        app[REQUESTS],
        max_observed_body=settings.max_observed_body,
        max_buffered_bytes=settings.max_buffered_bytes or None,
        connect_timeout=settings.upstream_connect_timeout,
        # Idle connections retire after --upstream-keepalive, before vLLM (uvicorn, 5 s) closes them.
        keepalive=settings.upstream_keepalive,
        # The proxy's own RED families: registered only when there is a proxy to describe.
        metrics=ProxyMetrics(app[REGISTRY]),
    )
    app[PROXY_PORT] = await proxy.start(settings.proxy_host, settings.proxy_port, backlog=1024)
    log.info("proxy_started", listen=f"{settings.proxy_host}:{app[PROXY_PORT]}", upstream=settings.upstream_for_logs)
    yield
    await proxy.close()


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> web.Application:
    # No `_created` samples: one extra series per counter and histogram child that no rule or panel reads
    # (docs/scaling.md). prometheus_client's switch is process-wide; the sidecar owns its process.
    disable_created_metrics()
    app = web.Application()
    app[SETTINGS] = settings
    app[REGISTRY] = registry if registry is not None else CollectorRegistry()
    info = Gauge("specdec_build_info", "specdec-sidecar version.", ["version"], registry=app[REGISTRY])
    info.labels(__version__).set(1)
    app[MODEL_NAMES] = ModelNames(settings.models)
    def speculating(model: str) -> bool | None:
        """Whether vLLM drafts for *model*: the --speculative setting, else what the last poll detected."""
        if settings.speculative != "auto":
            return settings.speculative == "true"
        return app[MONITOR].state.speculating.get(model) if MONITOR in app else None

    app[REQUESTS] = RequestMetrics(app[REGISTRY], settings.temperature_buckets, app[MODEL_NAMES], speculating)
    app[TAP_WINDOWS] = TapMonitor(app[REQUESTS].totals, settings.windows, settings.scrape_interval)
    app[CALIBRATION] = CalibrationSource(settings.calibration, app[REGISTRY], interval=settings.scrape_interval)
    app.cleanup_ctx.append(_poll_session)
    app.cleanup_ctx.append(_poll_loop)
    app.cleanup_ctx.append(_tap_windows)
    app.cleanup_ctx.append(_calibration)
    app.cleanup_ctx.append(_model_refresher)
    app.cleanup_ctx.append(_proxy)
    def upstream() -> MonitorState:
        return app[MONITOR].state if MONITOR in app else MonitorState()

    def tap() -> TapHealth:
        return app[TAP_WINDOWS].state

    def calibration() -> Calibration | None:
        return app[CALIBRATION].state

    app[REGISTRY].register(HealthCollector(upstream, settings, get_tap=tap, get_calibration=calibration))
    app.router.add_get("/", StatusPage(settings, upstream, tap, calibration).handle)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
