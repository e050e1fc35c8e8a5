"""Fetching vLLM /metrics: one async GET with a timeout, classified into a result or one error reason."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass

import aiohttp

from sidecar.config import redact_url
from sidecar.upstream.vllm_metrics import VllmSnapshot, read_vllm_metrics

MAX_BODY_BYTES = 64 * 1024 * 1024


class ScrapeError(enum.StrEnum):
    CONNECT = "connect"
    TIMEOUT = "timeout"
    HTTP_STATUS = "http_status"
    TRUNCATED = "truncated"  # the body stopped short: the connection broke mid-body or the last line is cut
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
    """Polls ``{upstream}/metrics`` over its own aiohttp session (never the proxy's, which must not decode).

    The whole body is read (up to ``MAX_BODY_BYTES``), however many socket reads it takes, and decoded
    when the upstream compressed it; a body that does not end in a complete line was cut short and counts
    as a failed poll, never as a page with fewer series.
    """

    def __init__(self, session: aiohttp.ClientSession, upstream: str, timeout: float, api_key: str | None = None) -> None:
        self._session = session
        self.url = upstream.rstrip("/") + "/metrics"
        self.url_for_logs = redact_url(self.url)
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._headers = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "gzip"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"

    async def scrape(self) -> ScrapeResult:
        started = time.perf_counter()

        def done(**kwargs: object) -> ScrapeResult:
            return ScrapeResult(duration=time.perf_counter() - started, **kwargs)  # type: ignore[arg-type]

        try:
            async with self._session.get(self.url, timeout=self._timeout, headers=self._headers) as response:
                if response.status != 200:
                    return done(error=ScrapeError.HTTP_STATUS, detail=f"HTTP {response.status}")
                body = bytearray()
                async for chunk in response.content.iter_any():
                    body += chunk
                    if len(body) > MAX_BODY_BYTES:
                        return done(error=ScrapeError.PARSE, detail="body larger than 64 MiB")
        except asyncio.TimeoutError:
            return done(error=ScrapeError.TIMEOUT, detail="timed out")
        except (aiohttp.ClientConnectionError, OSError) as error:
            return done(error=ScrapeError.CONNECT, detail=type(error).__name__)
        except aiohttp.ClientPayloadError as error:  # a body cut short, a broken gzip stream
            return done(error=ScrapeError.TRUNCATED, detail=f"{type(error).__name__}: {error}")
        except aiohttp.ClientError as error:  # malformed HTTP
            return done(error=ScrapeError.CONNECT, detail=type(error).__name__)
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            return done(error=ScrapeError.PARSE, detail="body is not UTF-8")
        if text and not text.endswith("\n"):
            return done(error=ScrapeError.TRUNCATED, detail="body does not end in a complete line")
        snapshot = read_vllm_metrics(text)
        if not snapshot.engines:
            return done(error=ScrapeError.PARSE, detail="no vLLM series found")
        return done(snapshot=snapshot)
