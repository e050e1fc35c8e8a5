"""Faults with a real vLLM (CPU build, the tiny target drafting for itself, k=4) behind the sidecar.

One vLLM start and one restart for the whole module:

* a client that hangs up mid-stream: vLLM really aborts the request (its own ``num_requests_running`` is 0
  within 1 s and it stops generating);
* vLLM SIGKILLed under traffic and restarted on the same port: the sidecar stays up, ``specdec_upstream_up``
  goes 0 then 1, every re-exported ``specdec_*_total`` counter is monotonic (sampled every 0.2 s, and
  ``resets()`` in Prometheus is 0), and a real Prometheus loading the project's rule files shows no
  break-even alert, only ``SpecDecodeSidecarUpstreamDown`` and the proxy's own (its 502s: the 5xx ratio and
  vLLM unreachable from the request path) while vLLM is down;
* while vLLM is down, every proxied request comes back quickly with a clean 502/503 (never hangs); while it
  is starting again, the same until it listens, then 200s. A request counts in the phase it began in.

How the alerts are checked without waiting for ``for: 5m``: the test copy of the rules keeps every ``for:``
at 5m and shortens rate windows to 30s (``devstack.alerting_stack``); Prometheus evaluates every second and
marks an alert ``pending`` at the first evaluation where its expression is true. The test reads
``/api/v1/alerts`` every second, so any alert whose expression held at any evaluation is seen, which is
stricter than waiting for ``firing``. ``SpecDecodeSidecarUpstreamDown`` must be pending while vLLM is down.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from conftest import start_vllm
from fakes import start_sidecar, wait_for
from devstack.alerting_stack import AlertingStack
from devstack.vllm_server import REPO
from sidecar.upstream.vllm_metrics import read_vllm_metrics

MODEL = "tiny-target"
# vLLM start-up (and here one restart) counts against the per-test timeout.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]
BREAK_EVEN_ALERTS = {"SpecDecodeAcceptanceBelowBreakEven", "SpecDecodeNearBreakEven",
                     "SpecDecodeTemperatureBucketBelowBreakEven", "SpecDecodeRequestAcceptanceP10Low",
                     "SpecDecodeAcceptanceDropped"}


def wait_for_vllm_slot(timeout: float = 300.0) -> None:
    """The machine is shared: start a vLLM only while fewer than two run."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(["pgrep", "-f", "vllm.entrypoints.openai.api_server"], capture_output=True, text=True)
        if len(out.stdout.split()) < 2 or time.monotonic() > deadline:
            return
        time.sleep(5)


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    wait_for_vllm_slot()
    speculative = {"method": "draft_model", "model": str(REPO / "models" / MODEL), "num_speculative_tokens": 4}
    server = start_vllm(tmp_path_factory, speculative)
    # No torch.compile: start-up (paid twice here) drops from minutes to well under one on a busy 2-core
    # machine; aborts, metrics and restarts behave the same.
    server.extra_args = [*server.extra_args, "--enforce-eager"]
    server.startup_timeout = 600
    try:
        server.start()
    except (RuntimeError, TimeoutError) as error:
        tail = server.log_path.read_text(errors="replace")[-3000:] if server.log_path else ""
        pytest.fail(f"{error}\n--- vLLM log tail ---\n{tail}")
    try:
        yield server
    finally:
        server.stop()


async def vllm_gauges(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """(num_requests_running, generation_tokens_total) straight from vLLM's /metrics."""
    async with session.get(url + "/metrics") as r:
        snapshot = read_vllm_metrics(await r.text())
    running = sum(s.running or 0.0 for s in snapshot.engines.values())
    generated = sum(s.generation_tokens or 0.0 for s in snapshot.engines.values())
    return running, generated


# --- upstream slow to start (loopback, no vLLM needed) ----------------------------------------------------

async def test_upstream_starting_gets_clean_errors_quickly():
    """vLLM binds its port long before it listens (``create_server_socket`` binds; uvicorn calls listen()
    once the engine is up, 35-75 s later here): connections are refused until then. Both a bound port that
    does not listen yet and a port nobody holds get a clean 502 with an OpenAI-style error at once."""
    starting = socket.socket()
    starting.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    starting.bind(("127.0.0.1", 0))  # bound, no listen(): what vLLM's port looks like while it loads
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    nobody = closed.getsockname()[1]
    closed.close()
    results = {}
    try:
        for name, port in (("bound, not listening yet", starting.getsockname()[1]), ("nobody on the port", nobody)):
            sidecar = await start_sidecar(f"http://127.0.0.1:{port}", upstream_connect_timeout="2s")
            proxy = sidecar.proxy_url
            try:
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
                    statuses, slowest = [], 0.0
                    for stream in (False, True, False):
                        t0 = time.monotonic()
                        async with session.post(proxy + "/v1/completions", json={
                                "model": MODEL, "prompt": "x", "max_tokens": 4, "stream": stream}) as r:
                            body = await r.json()
                            statuses.append(r.status)
                        slowest = max(slowest, time.monotonic() - t0)
                        assert body["error"]["code"] == r.status
                    results[name] = (statuses, round(slowest, 4))
            finally:
                await sidecar.stop()
    finally:
        starting.close()
    print(f"\nupstream not serving yet: {results}")
    for name, (statuses, slowest) in results.items():
        assert all(s in (502, 503) for s in statuses), (name, statuses)
        assert slowest < 1.0, f"{name}: a request took {slowest:.2f} s"


# --- client aborts mid-stream ---------------------------------------------------------------------------

async def test_client_abort_mid_stream_aborts_in_vllm(vllm):
    sidecar = await start_sidecar(vllm.url, upstream_connect_timeout="2s")
    proxy = sidecar.proxy_url
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            body = {"model": MODEL, "prompt": "def main(", "max_tokens": 400, "ignore_eos": True,
                    "temperature": 0, "stream": True}
            _, generated_before = await vllm_gauges(session, vllm.url)
            client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
            response = await client.post(proxy + "/v1/completions", json=body)
            assert response.status == 200
            chunks = 0
            async for _ in response.content.iter_any():
                chunks += 1
                if chunks >= 3:
                    break
            running, _ = await vllm_gauges(session, vllm.url)
            assert running == 1, "the stream is running in vLLM before the client hangs up"
            # hang up: close the TCP connection under the response
            response.connection.transport.abort()
            hung_up = time.monotonic()
            await client.close()

            seen = None
            while time.monotonic() - hung_up < 5:
                running, generated = await vllm_gauges(session, vllm.url)
                if running == 0:
                    seen = time.monotonic() - hung_up
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(1.0)
            _, generated_after = await vllm_gauges(session, vllm.url)
            await asyncio.sleep(1.0)
            _, generated_later = await vllm_gauges(session, vllm.url)
            print(f"\nclient hung up after {chunks} reads; vLLM num_requests_running 0 after "
                  f"{seen if seen is None else round(seen, 3)} s; tokens generated for it: "
                  f"{generated_after - generated_before:.0f} of max_tokens 400")
            assert seen is not None and seen <= 1.0, f"vLLM still running the request {seen} s after the hang-up"
            assert generated_after - generated_before < 400, "vLLM generated the whole completion for nobody"
            assert generated_later == generated_after, "vLLM kept generating after the hang-up"
    finally:
        await sidecar.stop()


# --- vLLM killed and restarted under traffic ------------------------------------------------------------

def specdec_counters(registry: CollectorRegistry) -> dict[tuple, float]:
    out = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith("specdec_") and sample.name.endswith("_total"):
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_vllm_killed_and_restarted_under_traffic(vllm, tmp_path):
    if not AlertingStack.available():
        pytest.fail("prometheus and prometheus-alertmanager are not installed (make test installs them)")
    sidecar = await start_sidecar(vllm.url, upstream_connect_timeout="2s")
    proxy, registry, monitor = sidecar.proxy_url, sidecar.registry, sidecar.monitor
    stack = AlertingStack(workdir=tmp_path, targets=[f"127.0.0.1:{sidecar.port}"], pagerduty_url="http://127.0.0.1:9/",
                          webhook_url="http://127.0.0.1:9/", namespace="faults", fast_window="30s", fast_for="5m")
    stack.start()
    prom = stack.prometheus_url
    timeline: list[tuple[float, str, object]] = []  # (t, what, value)
    stop = asyncio.Event()
    phase = {"name": "up"}
    alerts_by_phase: dict[str, set[tuple[str, str]]] = {"up": set(), "down": set(), "starting": set(), "back": set()}
    decreases: list[str] = []
    proxied: list[tuple[str, int | str, float]] = []
    up_values: list[tuple[float, float]] = []
    t0 = time.monotonic()

    async def traffic(session: aiohttp.ClientSession, w: int) -> None:
        i = 0
        while not stop.is_set():
            started, started_in = time.monotonic(), phase["name"]  # a request belongs to the phase it began in
            try:
                async with session.post(proxy + "/v1/completions",
                                        json={"model": MODEL, "prompt": f"def f{w}_{i}(", "max_tokens": 24,
                                              "temperature": 0}) as r:
                    await r.read()
                    proxied.append((started_in, r.status, time.monotonic() - started))
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                proxied.append((started_in, type(error).__name__, time.monotonic() - started))
            i += 1
            await asyncio.sleep(0.05)

    async def watch_counters() -> None:
        last: dict[tuple, float] = {}
        while not stop.is_set():
            value = registry.get_sample_value("specdec_upstream_up")
            up_values.append((time.monotonic() - t0, value))
            for key, v in specdec_counters(registry).items():
                if key in last and v < last[key]:
                    decreases.append(f"{key}: {last[key]} -> {v} at {time.monotonic() - t0:.1f}s")
                last[key] = v
            await asyncio.sleep(0.2)

    async def watch_alerts(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            try:
                async with session.get(prom + "/api/v1/alerts") as r:
                    for alert in (await r.json())["data"]["alerts"]:
                        alerts_by_phase[phase["name"]].add((alert["labels"]["alertname"], alert["state"]))
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(1.0)

    async def query(session: aiohttp.ClientSession, expr: str) -> list[dict]:
        async with session.get(prom + "/api/v1/query", params={"query": expr}) as r:
            return (await r.json())["data"]["result"]

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            async def scraped() -> bool:
                try:
                    return bool(await query(session, 'up{job="specdec-sidecar"} == 1'))
                except aiohttp.ClientError:
                    return False

            await wait_for(lambda: monitor.state.up, timeout=30, what="sidecar polling vLLM")
            await wait_for(scraped, timeout=60, what="Prometheus scraping the sidecar")

            async def no_alerts() -> bool:  # SidecarAbsent is pending until the first scrape: let it clear
                async with session.get(prom + "/api/v1/alerts") as r:
                    return not (await r.json())["data"]["alerts"]

            await wait_for(no_alerts, timeout=30, what="no alerts before the test starts")
            tasks = [asyncio.create_task(traffic(session, w)) for w in range(2)]
            tasks += [asyncio.create_task(watch_counters()), asyncio.create_task(watch_alerts(session))]

            async def traffic_recorded() -> bool:
                got = await query(session, "namespace_model:specdec_acceptance:ratio_rate5m")
                return bool(got)

            await wait_for(traffic_recorded, timeout=60, what="recorded acceptance in Prometheus")
            await asyncio.sleep(8)
            before = await query(session, "namespace_model:specdec_acceptance:ratio_rate5m")
            timeline.append((time.monotonic() - t0, "acceptance before kill", float(before[0]["value"][1])))

            # SIGKILL the whole vLLM process group (API server and engine core) under traffic.
            os.killpg(vllm._proc.pid, signal.SIGKILL)
            vllm._proc.wait(10)
            vllm._proc = None
            killed = time.monotonic()
            phase["name"] = "down"  # requests started from now on: vLLM is gone
            timeline.append((killed - t0, "vLLM SIGKILLed", None))
            await wait_for(lambda: registry.get_sample_value("specdec_upstream_up") == 0, timeout=5,
                           what="specdec_upstream_up 0")
            timeline.append((time.monotonic() - t0, "specdec_upstream_up 0", round(time.monotonic() - killed, 2)))

            async def down_alert_pending() -> bool:
                return ("SpecDecodeSidecarUpstreamDown", "pending") in alerts_by_phase["down"]

            await wait_for(down_alert_pending, timeout=20, what="SpecDecodeSidecarUpstreamDown pending")
            timeline.append((time.monotonic() - t0, "SpecDecodeSidecarUpstreamDown pending",
                             round(time.monotonic() - killed, 2)))

            # Restart on the same port (start() blocks on /health: run it in a thread, traffic goes on).
            await asyncio.to_thread(wait_for_vllm_slot)
            # From here vLLM may begin to listen before start() has seen /health: a 200 is then right.
            phase["name"] = "starting"
            restart_at = time.monotonic()
            try:
                await asyncio.to_thread(vllm.start)
            except (RuntimeError, TimeoutError) as error:
                tail = vllm.log_path.read_text(errors="replace")[-3000:] if vllm.log_path else ""
                pytest.fail(f"restart: {error}\n--- vLLM log tail ---\n{tail}")
            timeline.append((time.monotonic() - t0, "vLLM healthy again", round(time.monotonic() - restart_at, 1)))
            await wait_for(lambda: registry.get_sample_value("specdec_upstream_up") == 1, timeout=10,
                           what="specdec_upstream_up 1")
            phase["name"] = "back"
            timeline.append((time.monotonic() - t0, "specdec_upstream_up 1", None))

            async def down_alert_gone() -> bool:
                got = await query(session, 'ALERTS{alertname="SpecDecodeSidecarUpstreamDown"}')
                return not got

            await wait_for(down_alert_gone, timeout=20, what="SpecDecodeSidecarUpstreamDown cleared")
            await asyncio.sleep(40)  # more than the 30s rate window after the return, traffic flowing
            after = await query(session, "namespace_model:specdec_acceptance:ratio_rate5m")
            timeline.append((time.monotonic() - t0, "acceptance after restart", float(after[0]["value"][1])))
            # resets() drops the metric name, so one query per re-exported counter
            resets = {}
            for name in sorted({name for name, _ in specdec_counters(registry)}):
                got = await query(session, f'sum(resets({name}{{job="specdec-sidecar"}}[10m]))')
                resets[name] = float(got[0]["value"][1]) if got else None
            timeline.append((time.monotonic() - t0, "resets() per counter in Prometheus", resets))
            stop.set()
            await asyncio.gather(*tasks)
    finally:
        stop.set()
        stack.stop()
        await sidecar.stop()
        print()
        for t, what, value in timeline:
            print(f"  {t:7.1f}s  {what}" + ("" if value is None else f": {value}"))
        down_requests = [(s, d) for p, s, d in proxied if p == "down"]
        print(f"proxied while down: {len(down_requests)} requests, statuses "
              f"{sorted({str(s) for s, _ in down_requests})}, slowest "
              f"{max((d for _, d in down_requests), default=0):.3f} s; while starting: "
              f"{sorted({str(s) for p, s, _ in proxied if p == 'starting'})}; after: "
              f"{sum(1 for p, s, _ in proxied if p == 'back' and s == 200)} x 200")
        print(f"alerts seen by phase: { {k: sorted(v) for k, v in alerts_by_phase.items()} }")
        print(f"counter decreases: {decreases}")

    assert not decreases, f"re-exported counters went down: {decreases}"
    assert resets.get("specdec_accepted_tokens_total") == 0 and resets.get("specdec_draft_tokens_total") == 0, resets
    assert all(v in (0, None) for v in resets.values()), f"Prometheus saw counter resets: {resets}"
    ups = [v for _, v in up_values if v is not None]
    first_zero = ups.index(0.0)
    assert 1.0 in ups[:first_zero] and 1.0 in ups[first_zero:], "specdec_upstream_up went 1 -> 0 -> 1"
    # alerts: nothing while up but the sidecar's own added latency, which this machine really does push up:
    # vLLM's CPU build keeps both cores busy and the sidecar waits for one at P99 (pending in one CI run with
    # vLLM up all along; the shipped rule waits 15m, this copy's `for:` 5m keeps it pending); only the
    # upstream-down one while down; no break-even alert at any time
    assert alerts_by_phase["up"] <= {("SpecDecodeProxyAddedLatencyHigh", "pending")}, alerts_by_phase["up"]
    # while vLLM is down its clients get the proxy's 502s: the proxy's own alerts may be pending beside the page
    # on the upstream (the sidecar had read vLLM before, so it is UpstreamDown, never UpstreamStarting)
    down_alerts = {"SpecDecodeSidecarUpstreamDown", "SpecDecodeProxyErrorRatioHigh",
                   "SpecDecodeProxyUpstreamUnreachable"}
    # the added-latency alert may stay (or become) pending while vLLM is down: only relayed responses are timed,
    # so its 30s window then holds the last ones from before the kill, and the 502s keep its traffic guard met
    # (seen once in CI: pending in the down phase only)
    latency_pending = {("SpecDecodeProxyAddedLatencyHigh", "pending")}
    assert "SpecDecodeSidecarUpstreamDown" in {name for name, _ in alerts_by_phase["down"]}
    assert {name for name, _ in alerts_by_phase["down"] - latency_pending} <= down_alerts, alerts_by_phase["down"]
    assert not {name for name, _ in alerts_by_phase["back"]} & BREAK_EVEN_ALERTS, alerts_by_phase["back"]
    # vLLM's start-up takes both cores of this machine: the sidecar's own time per request really grows for
    # the first requests after it (seen: the added-latency alert pending; the shipped rule waits 15m)
    assert {name for name, _ in alerts_by_phase["back"]} <= down_alerts | {"SpecDecodeProxyAddedLatencyHigh"}
    # the recorded acceptance stayed on the right side of break-even
    assert float(before[0]["value"][1]) >= 0.5 and float(after[0]["value"][1]) >= 0.5
    # while vLLM was down or starting, every proxied request got a clean error quickly, never a hang
    assert down_requests, "traffic kept going while vLLM was down"
    assert all(s in (502, 503) for s, _ in down_requests), sorted({str(s) for s, _ in down_requests})
    assert max(d for _, d in down_requests) < 5.0
    # while it was starting again: a quick clean error until it listens, then answers
    starting = [(s, d) for p, s, d in proxied if p == "starting"]
    assert all(s in (200, 502, 503) for s, _ in starting), sorted({str(s) for s, _ in starting})
    assert all(d < 5.0 for s, d in starting if s != 200), starting
    assert {name for name, _ in alerts_by_phase["starting"] - latency_pending} <= down_alerts
    assert any(p == "back" and s == 200 for p, s, _ in proxied), "requests succeed again after the restart"
