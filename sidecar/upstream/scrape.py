"""Fetching vLLM /metrics: one async GET with a timeout, classified into a result or one error reason."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass

import aiohttp

from sidecar.upstream.vllm_metrics import VllmSnapshot, read_vllm_metrics

MAX_BODY_BYTES = 64 * 1024 * 1024


class ScrapeError(enum.StrEnum):
    CONNECT = "connect"
    TIMEOUT = "timeout"
    HTTP_STATUS = "http_status"
    PARSE = "parse"


@dataclass(frozen=True, slots=True)
class ScrapeResult:
    duration: float
    snapshot: VllmSnapshot | None = None
    error: ScrapeError | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.snapshot is not None


class Scraper:
    """Polls ``{upstream}/metrics`` over a shared aiohttp session."""

    def __init__(self, session: aiohttp.ClientSession, upstream: str, timeout: float) -> None:
        self._session = session
        self.url = upstream.rstrip("/") + "/metrics"
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    async def scrape(self) -> ScrapeResult:
        started = time.perf_counter()

        def done(**kwargs: object) -> ScrapeResult:
            return ScrapeResult(duration=time.perf_counter() - started, **kwargs)  # type: ignore[arg-type]

        try:
            async with self._session.get(
                self.url, timeout=self._timeout, headers={"Accept": "text/plain;version=0.0.4"}
            ) as response:
                if response.status != 200:
                    return done(error=ScrapeError.HTTP_STATUS, detail=f"HTTP {response.status}")
                body = await response.content.read(MAX_BODY_BYTES + 1)
        except asyncio.TimeoutError:
            return done(error=ScrapeError.TIMEOUT, detail="timed out")
        except (aiohttp.ClientConnectionError, OSError) as error:
            return done(error=ScrapeError.CONNECT, detail=type(error).__name__)
        except aiohttp.ClientError as error:  # malformed HTTP, payload errors
            return done(error=ScrapeError.CONNECT, detail=type(error).__name__)
        if len(body) > MAX_BODY_BYTES:
            return done(error=ScrapeError.PARSE, detail="body larger than 64 MiB")
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return done(error=ScrapeError.PARSE, detail="body is not UTF-8")
        snapshot = read_vllm_metrics(text)
        if not snapshot.engines:
            return done(error=ScrapeError.PARSE, detail="no vLLM series found")
        return done(snapshot=snapshot)
