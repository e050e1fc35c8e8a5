"""The poll loop: scrape vLLM every interval, keep a bounded history, publish an immutable ``Health``.

Exporters normally scrape upstream when Prometheus scrapes them. This one polls on its own clock because
windowed rates need a history of its own: a 5m acceptance is there even when Prometheus scrapes every 60s,
and several Prometheus replicas do not multiply the load on vLLM.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar.config import Settings
from sidecar.upstream.derive import Health, Point, advance, derive, trim_history, window_load
from sidecar.upstream.scrape import ScrapeError, ScrapeResult, Scraper

log = structlog.get_logger("sidecar.upstream.monitor")


@dataclass(frozen=True, slots=True)
class MonitorState:
    """What the collector reads. Replaced whole after every scrape; never mutated."""

    up: bool = False
    health: Health | None = None
    scrapes: int = 0
    # Running requests per model, kept while vLLM is unreachable: the load the calibrated break-even is read
    # at (the tap's verdicts go on without vLLM's /metrics). Where the verdict window drafted, the running
    # requests its drafts ran at (``derive.window_load``); elsewhere the last successful poll's.
    load: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    # Per model: whether vLLM drafts for it (``--speculative``, or detected from the families vLLM exports),
    # kept while vLLM is unreachable like ``load``: the arm a pod is in for the baseline comparison.
    speculating: Mapping[str, bool] = field(default_factory=lambda: MappingProxyType({}))


def arm_of(detected: Mapping[str, bool], setting: str) -> dict[str, bool]:
    """Per model, whether vLLM speculates: ``--speculative true``/``false`` for every model vLLM serves,
    ``auto`` what the page shows (``VllmSnapshot.speculating``)."""
    if setting == "auto":
        return dict(detected)
    return {model: setting == "true" for model in detected}


class OwnMetrics:
    """Metrics about the sidecar's own scraping, on the injected registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "specdec_upstream_scrape_duration_seconds",
            "Duration of the sidecar's polls of vLLM /metrics (successful or not).",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.errors = Counter(
            "specdec_upstream_scrape_errors",
            "Failed polls of vLLM /metrics by reason (connect, timeout, http_status, parse).",
            ["reason"],
            registry=registry,
        )
        for reason in ScrapeError:
            self.errors.labels(reason.value)
        self.scrapes = Counter(
            "specdec_upstream_scrapes", "Polls of vLLM /metrics attempted.", registry=registry
        )
        self.invalid_lines = Counter(
            "specdec_upstream_invalid_lines",
            "Lines of wanted vLLM series that did not parse and were skipped.",
            registry=registry,
        )
        self.restarts = Counter(
            "specdec_upstream_restarts",
            "vLLM engines seen restarting (a counter went down); windows count across the reset.",
            registry=registry,
        )
        self.last_success = Gauge(
            "specdec_upstream_last_success_timestamp_seconds",
            "Unix time of the last successful poll of vLLM /metrics.",
            registry=registry,
        )


class Monitor:
    def __init__(
        self,
        settings: Settings,
        scraper: Scraper,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.monotonic,
        on_models: Callable[[list[str]], None] | None = None,
    ) -> None:
        self.settings = settings
        self._scraper = scraper
        self._clock = clock
        self._points: deque[Point] = deque()
        self._max_window = max(settings.windows)
        self.metrics = OwnMetrics(registry)
        self.state = MonitorState()
        self._last_error: ScrapeError | None = None
        self._on_models = on_models

    def record(self, result: ScrapeResult, t: float) -> None:
        """Fold one scrape result into the history and publish a new state (synchronous, no I/O)."""
        self.metrics.scrapes.inc()
        self.metrics.duration.observe(result.duration)
        if not result.ok:
            assert result.error is not None
            self.metrics.errors.labels(result.error.value).inc()
            if self.state.up or self.state.scrapes == 0 or self._last_error != result.error:
                log.warning(
                    "upstream_lost" if self.state.up else "upstream_unavailable",
                    url=self._scraper.url_for_logs,
                    reason=result.error.value,
                    detail=result.detail,
                )
            self._last_error = result.error
            self.state = MonitorState(up=False, health=None, scrapes=self.state.scrapes + 1, load=self.state.load,
                                      speculating=self.state.speculating)
            return

        assert result.snapshot is not None
        if not self.state.up:
            log.info(
                "upstream_up" if self.state.scrapes == 0 else "upstream_back",
                url=self._scraper.url_for_logs,
                models=result.snapshot.models,
                engines=len(result.snapshot.engines),
            )
        self._last_error = None
        if self._on_models is not None:
            self._on_models(result.snapshot.models)
        point = advance(self._points[-1] if self._points else None, t, result.snapshot)
        if point.resets:
            self.metrics.restarts.inc(point.resets)
            log.info("upstream_counters_reset", engines=point.resets)
        self.metrics.invalid_lines.inc(result.snapshot.invalid_lines)
        self.metrics.last_success.set(time.time())
        self._points.append(point)
        trim_history(self._points, t, self._max_window)
        s = self.settings
        health = derive(
            self._points,
            s.windows,
            min_drafts=s.min_drafts,
            tolerance=s.scrape_interval / 2,
        )
        load = dict(self.state.load)
        if health is not None:
            load.update({m: g.pressure.running for m, g in health.models.items() if g.pressure.running is not None})
            # where the verdict window drafted, the load its drafts ran at (not one poll's running requests)
            load.update(window_load(self._points, t - s.verdict_window))
        speculating = dict(self.state.speculating)
        speculating.update(arm_of(result.snapshot.speculating(), s.speculative))
        self.state = MonitorState(
            up=True, health=health, scrapes=self.state.scrapes + 1, load=MappingProxyType(load),
            speculating=MappingProxyType(speculating),
        )

    async def poll_once(self) -> None:
        result = await self._scraper.scrape()
        self.record(result, self._clock())

    async def run(self) -> None:
        """Poll forever on a fixed schedule (no drift; a slow scrape skips missed ticks)."""
        interval = self.settings.scrape_interval
        next_tick = self._clock()
        while True:
            await self.poll_once()
            next_tick += interval
            now = self._clock()
            if next_tick < now:
                next_tick = now + interval - ((now - next_tick) % interval)
            await asyncio.sleep(next_tick - now)

    @property
    def history_length(self) -> int:
        return len(self._points)
