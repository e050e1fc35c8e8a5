"""The sidecar process dies: what clients see, and how long until it serves again.

In the pod (Helm chart) the sidecar is a native sidecar container in front of vLLM, with readiness on
``/readyz``; the kubelet restarts it when it exits, and the pod leaves the Service endpoints while it is not
ready. At the process level this means: while ``python -m sidecar serve`` is dead, a client connecting to
the proxy port is refused at once (no hang); a stream in flight when it dies ends with an error at once
(never a clean, short body); once a new process starts on the same ports, it proxies within about its
start-up time and ``/readyz`` turns 200 after its first successful poll of vLLM. docs/reliability.md has the
figures this module prints.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import time

import aiohttp
import pytest

from fakes import SidecarProcess, free_port

pytestmark = pytest.mark.timeout(180)
REQUEST = {"model": "tiny-target", "prompt": "p", "temperature": 0, "stream": True, "stream_id": 1, "events": 3}


@pytest.fixture
def upstream(load_upstream):
    load_upstream.interval = 0.01
    return load_upstream


async def proxied_ok(session: aiohttp.ClientSession, proxy: str) -> bool:
    try:
        async with session.post(proxy + "/v1/completions", json=REQUEST) as r:
            await r.read()
            return r.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def status_of(session: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with session.get(url) as r:
            return r.status
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def time_until(predicate, since: float, timeout: float = 60.0, step: float = 0.01) -> float:
    while time.monotonic() - since < timeout:
        if await predicate():
            return time.monotonic() - since
        await asyncio.sleep(step)
    raise AssertionError(f"not within {timeout} s")


async def test_killed_sidecar_refuses_fast_then_serves_again(upstream):
    ports = dict(proxy_port=free_port(), metrics_port=free_port())
    url = f"http://127.0.0.1:{upstream.port}"
    sidecar = SidecarProcess(url, **ports).start()
    proxy = f"http://127.0.0.1:{ports['proxy_port']}"
    metrics = f"http://127.0.0.1:{ports['metrics_port']}"
    figures: dict[str, list[float]] = {"refused_ms": [], "inflight_error_ms": [], "to_first_proxied_s": [],
                                       "to_readyz_s": [], "to_port_open_s": []}
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(force_close=True)) as session:
            assert await time_until(lambda: proxied_ok(session, proxy), time.monotonic(), 30) >= 0
            for _ in range(3):
                assert await status_of(session, metrics + "/readyz") == 200
                # a slow stream in flight when the process is killed
                slow = {**REQUEST, "flood": False, "events": 1000, "stream_id": 7}
                upstream.interval = 0.05
                inflight = await session.post(proxy + "/v1/completions", json=slow)
                assert inflight.status == 200
                await inflight.content.readany()

                os.kill(sidecar.proc.pid, signal.SIGKILL)
                sidecar.proc.wait(5)
                killed = time.monotonic()
                with pytest.raises(aiohttp.ClientPayloadError):
                    await inflight.read()  # a broken body, never a clean short one
                figures["inflight_error_ms"].append((time.monotonic() - killed) * 1000)
                inflight.release()
                upstream.interval = 0.01

                # while it is down: refused at once, every time
                for _ in range(5):
                    t0 = time.monotonic()
                    with pytest.raises(aiohttp.ClientConnectorError) as refused:
                        async with session.post(proxy + "/v1/completions", json=REQUEST):
                            pass
                    assert isinstance(refused.value.os_error, ConnectionRefusedError)
                    figures["refused_ms"].append((time.monotonic() - t0) * 1000)
                assert await status_of(session, metrics + "/readyz") is None

                # restarted (what the kubelet does): time to the first proxied request and to ready
                restarted = time.monotonic()
                sidecar = SidecarProcess(url, **ports).start()
                figures["to_port_open_s"].append(time.monotonic() - restarted)
                figures["to_first_proxied_s"].append(
                    await time_until(lambda: proxied_ok(session, proxy), restarted))

                async def ready() -> bool:
                    return await status_of(session, metrics + "/readyz") == 200

                figures["to_readyz_s"].append(await time_until(ready, restarted))
    finally:
        sidecar.stop()
    print("\nsidecar SIGKILLed and restarted 3 times:")
    for name, values in figures.items():
        print(f"  {name}: median {statistics.median(values):.3f}, max {max(values):.3f} ({len(values)} samples)")
    assert max(figures["refused_ms"]) < 100, "a dead sidecar refuses connections at once"
    assert max(figures["inflight_error_ms"]) < 1000, "streams in flight fail at once"
    assert max(figures["to_first_proxied_s"]) < 20
    assert max(figures["to_readyz_s"]) < 20


async def test_sigterm_stops_cleanly_and_quickly(upstream):
    """What the kubelet sends first: the process exits 0, promptly, with nothing in flight."""
    sidecar = SidecarProcess(f"http://127.0.0.1:{upstream.port}").start()
    proxy = f"http://127.0.0.1:{sidecar.proxy_port}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await time_until(lambda: proxied_ok(session, proxy), time.monotonic(), 30)
    t0 = time.monotonic()
    sidecar.proc.send_signal(signal.SIGTERM)
    code = await asyncio.to_thread(sidecar.proc.wait, 30)
    took = time.monotonic() - t0
    print(f"\nSIGTERM -> exit {code} in {took:.2f} s")
    assert code == 0
    assert took < 10
