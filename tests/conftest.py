"""Shared fixtures: recorded real vLLM captures and a local upstream that replays them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

FIXTURES = Path(__file__).parent / "fixtures"


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads((FIXTURES / "MANIFEST.json").read_text())


@pytest.fixture(params=["vllm-0.32-draft-t3.prom", "vllm-0.32-ngram.prom", "vllm-0.32-draft-restarted.prom"])
def vllm_exposition(request) -> str:
    return fixture_text(request.param)


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
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def fake_vllm():
    server = FakeVllm()
    await server.start()
    yield server
    await server.stop()


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
