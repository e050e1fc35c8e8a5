"""Tiers by directory, and the shared fixtures: recorded real vLLM captures, the fake upstreams of
``fakes.py``, the sidecar's proxy in front of a replaying upstream, and a real vLLM for the live tier."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from fakes import FIXTURES, FakeVllm, HostileVllm, LoadUpstream, ReplayVllm, fixture_text, raise_fd_limit

TIERS = ("unit", "loopback", "live")


def pytest_collection_modifyitems(config, items) -> None:
    """Mark each test with its tier (the directory under tests/ it sits in), so ``-m`` selects tiers."""
    root = Path(__file__).parent
    for item in items:
        tier = item.path.relative_to(root).parts[0] if item.path.is_relative_to(root) else ""
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: every test lives in one of tests/{{{','.join(TIERS)}}}/")
        item.add_marker(tier)


@pytest.fixture(scope="session")
def manifest() -> dict:
    return json.loads((FIXTURES / "MANIFEST.json").read_text())


@pytest.fixture(params=["vllm-0.32-draft-t3.prom", "vllm-0.32-ngram.prom", "vllm-0.32-draft-restarted.prom"])
def vllm_exposition(request) -> str:
    return fixture_text(request.param)


@pytest.fixture
async def hostile_vllm():
    """A production-like upstream (``fakes.HostileVllm``): 300 KB+ page in many writes, gzip, 1 s keep-alive,
    API key ``sk-hostile`` on /v1/*."""
    server = HostileVllm(keepalive=1.0)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def load_upstream():
    """``fakes.LoadUpstream`` (events 0.05 s apart; a test may change ``interval``), the fd limit raised."""
    raise_fd_limit()
    server = LoadUpstream(interval=0.05)
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


@pytest.fixture
async def upstream():
    server = ReplayVllm()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def proxy(aiohttp_client, upstream):
    """The sidecar (metrics app under aiohttp's test client) with its proxy in front of ``upstream``; the
    session's ``base`` is the proxy, ``registry`` and ``metrics_client`` the sidecar's."""
    from sidecar.app import PROXY_PORT, create_app
    from sidecar.config import build_settings

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


