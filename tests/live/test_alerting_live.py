"""Live: real vLLM -> two sidecars -> real Prometheus (the project's rule files) -> real Alertmanager (the
example config) -> a loopback receiver speaking PagerDuty's Events API v2.

Test copies of the rule files shorten rate windows to 30s and every ``for:`` to 5s; the Alertmanager copy
points PagerDuty and the warning webhook at loopback and shortens grouping. Everything else is the shipped
files. vLLM serves the tiny target with itself as draft (k=4): sampled traffic accepts almost nothing,
greedy traffic alone accepts almost everything, so real traffic drives acceptance below and above 0.5.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from aiohttp import web

from fakes import serve_loopback, start_sidecar, wait_for
from devstack.alerting_stack import AlertingStack
from sidecar.commands.top import fetch_alerts

# vLLM start-up (35-100 s on 2 cores) counts against the per-test timeout: bound these tests separately.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

ROUTING_KEY = "R0UT1NGKEY0123456789abcdef012345"
SUMMARY = "Speculative decoding accepts too few draft tokens to pay for itself."


class Receiver:
    """PagerDuty Events API v2 (/v2/enqueue) and a plain webhook (/specdec), on loopback."""

    def __init__(self) -> None:
        self.pagerduty: list[dict] = []
        self.webhook: list[dict] = []
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def enqueue(self, request: web.Request) -> web.Response:
        event = await request.json()
        self.pagerduty.append(event)
        return web.json_response({"status": "success", "message": "Event processed",
                                  "dedup_key": event.get("dedup_key")}, status=202)

    async def hook(self, request: web.Request) -> web.Response:
        self.webhook.append(await request.json())
        return web.Response(text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v2/enqueue", self.enqueue)
        app.router.add_post("/specdec", self.hook)
        self.runner, self.port = await serve_loopback(app)


async def traffic(session, proxy: str, temperature: float, workers: int, seconds: float, log: list | None):
    deadline = time.monotonic() + seconds

    async def worker(w: int) -> None:
        i = 0
        while time.monotonic() < deadline:
            body = {"model": "tiny-target", "prompt": f"def f{w}_{i}(", "max_tokens": 24,
                    "temperature": temperature}
            async with session.post(proxy + "/v1/completions", json=body) as r:
                data = await r.json()
            if log is not None:
                log.append(data["metrics"]["speculative_decoding"])
            i += 1

    await asyncio.gather(*(worker(w) for w in range(workers)))


async def prom_query(session, url: str, expr: str) -> list[dict]:
    async with session.get(url + "/api/v1/query", params={"query": expr}) as r:
        return (await r.json())["data"]["result"]


async def test_page_on_break_even_and_resolve(selfdraft_vllm, tmp_path):
    if not AlertingStack.available():
        pytest.fail("prometheus and prometheus-alertmanager are not installed (make test installs them)")
    receiver = Receiver()
    await receiver.start()
    sidecars = [await start_sidecar(selfdraft_vllm.url, wait_up=True) for _ in range(2)]

    stack = AlertingStack(
        workdir=tmp_path,
        targets=[f"127.0.0.1:{s.port}" for s in sidecars],
        pagerduty_url=f"http://127.0.0.1:{receiver.port}/v2/enqueue",
        webhook_url=f"http://127.0.0.1:{receiver.port}/specdec",
        routing_key=ROUTING_KEY,
        namespace="live",
    )
    stack.start()
    prom = stack.prometheus_url
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            async def targets_up() -> bool:
                try:
                    return len(await prom_query(session, prom, 'up{job="specdec-sidecar"} == 1')) == 2
                except aiohttp.ClientError:
                    return False

            await wait_for(targets_up, timeout=60, what="Prometheus scraping both sidecars")

            # Phase 1 (fleet case + trigger): sampled traffic in bucket 0.3-0.5, three times as much through A.
            seen_a: list[dict] = []
            seen_b: list[dict] = []
            proxies = [s.proxy_url for s in sidecars]
            await asyncio.gather(traffic(session, proxies[0], 0.4, 3, 20, seen_a),
                                 traffic(session, proxies[1], 0.45, 1, 20, seen_b))
            await asyncio.sleep(3)  # two scrapes and evaluations after the last request
            recorded = await prom_query(
                session, prom, 'namespace_model_temperature_bucket:specdec_request_acceptance:ratio_rate5m'
                               '{temperature_bucket="0.3-0.5"}')
            accepted = sum(s["num_accepted_draft_tokens"] for s in seen_a + seen_b)
            drafted = sum(s["num_draft_tokens"] for s in seen_a + seen_b)
            truth = accepted / drafted
            assert len(recorded) == 1
            fleet = float(recorded[0]["value"][1])
            print(f"\nfleet: recorded {fleet:.4f}, token-weighted truth {truth:.4f} "
                  f"({len(seen_a)} + {len(seen_b)} requests, {accepted}/{drafted})")
            assert fleet == pytest.approx(truth, abs=0.01)
            # every per-request number reached the sidecars' counters exactly
            for sidecar, seen in zip(sidecars, (seen_a, seen_b)):
                labels = {"model": "tiny-target", "temperature_bucket": "0.3-0.5", "source": "vllm"}
                assert sidecar.registry.get_sample_value("specdec_request_accepted_tokens_total", labels) == sum(
                    s["num_accepted_draft_tokens"] for s in seen)

            # The break-even page specifically: with every for: shortened to seconds, SpecDecodeSidecarAbsent can
            # also page for a moment while the fresh Prometheus has not yet scraped the sidecars.
            def break_even_trigger(e: dict) -> bool:
                return e["event_action"] == "trigger" and "SpecDecodeAcceptanceBelowBreakEven" in e["payload"]["summary"]

            await wait_for(lambda: any(break_even_trigger(e) for e in receiver.pagerduty), timeout=90,
                           what="a PagerDuty trigger for the break-even alert")
            trigger = next(e for e in receiver.pagerduty if break_even_trigger(e))
            assert trigger["routing_key"] == ROUTING_KEY
            assert trigger["payload"]["severity"] == "critical"
            assert trigger["payload"]["summary"].startswith(SUMMARY)
            assert "SpecDecodeAcceptanceBelowBreakEven" in trigger["payload"]["summary"]
            assert trigger["dedup_key"]
            assert trigger["links"][0]["href"].endswith("#specdecodeacceptancebelowbreakeven")
            assert all(e["payload"]["severity"] == "critical" for e in receiver.pagerduty if "payload" in e)
            # `top --alertmanager` reads the same alert from Alertmanager's API
            firing = {a["labels"]["alertname"] for a in fetch_alerts(stack.alertmanager_url)}
            assert "SpecDecodeAcceptanceBelowBreakEven" in firing

            # Phase 2 (recovery): greedy requests one at a time through A: the self-draft accepts them.
            def is_its_resolve(e: dict) -> bool:
                return e["event_action"] == "resolve" and e["dedup_key"] == trigger["dedup_key"]

            async def resolved() -> bool:
                if not any(is_its_resolve(e) for e in receiver.pagerduty):
                    await traffic(session, proxies[0], 0.0, 1, 3, None)
                    return False
                return True

            await wait_for(resolved, timeout=150, what="a PagerDuty resolve")
            resolve = next(e for e in receiver.pagerduty if is_its_resolve(e))
            assert resolve["routing_key"] == ROUTING_KEY
            now = await prom_query(session, prom, "namespace_model:specdec_acceptance:ratio_rate5m")
            print(f"recovered acceptance {float(now[0]['value'][1]):.3f}; "
                  f"PagerDuty events {[e['event_action'] for e in receiver.pagerduty]}; "
                  f"webhook (non-paging) alerts {sorted({a['labels']['alertname'] for m in receiver.webhook for a in m['alerts']})}")
            # warnings went to the non-paging receiver, never to PagerDuty
            assert all(a["labels"]["severity"] != "critical" for m in receiver.webhook for a in m["alerts"])
    finally:
        stack.stop()
        for sidecar in sidecars:
            await sidecar.stop()
        await receiver.runner.cleanup()
