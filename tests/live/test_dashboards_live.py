"""Live: every query of dashboards/*.json runs on a real Prometheus over real vLLM traffic, and returns data.

Real vLLM (the tiny target drafting for itself, k=4) -> two sidecars (pods ``sidecar-a``/``sidecar-b``,
namespace ``live``) with their proxies -> a real Prometheus that loads alerts/recording-rules.yaml and
alerts/alerts.yaml (every ``for:`` shortened to 1s so alerts can fire within the test; rate windows unchanged)
and scrapes both sidecars every second. Traffic: greedy requests (the self-draft accepts most of them), then
sampled ones (it accepts almost none), streamed and not: both sides of break-even, in several temperature
buckets.

Dashboard variables are resolved the way Grafana does it: the variable queries run against the same
Prometheus (``label_values`` -> the label values API), the chosen values are substituted (multi-value as a
``(a|b)`` regex, "All" as ``.*``), and ``$__rate_interval`` becomes 1m. Each panel query then runs as
Grafana would run it (instant for tables and stats, a range query otherwise).

Queries that legitimately have no data here, and why (they must still run without error):
- "Acceptance now and a day earlier" B and C, "TPOT P99/P50 now and a day earlier" B and C: they read the
  recorded series ``offset 1d``, and this Prometheus is minutes old. Their A query (now) must have data.
- The rest of ``NO_DATA_HERE`` below, each with its reason.

This Prometheus attaches no ``cluster`` label, as a single-cluster Prometheus does not: the ``cluster``
variable lists nothing, Grafana's "All" puts ``.*`` into every ``cluster=~"$cluster"``, and every query must
still return its data. The alert annotation query runs too, and must draw the alert the traffic fires.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time

import aiohttp
import pytest
import pytest_asyncio
from browser import Page, assert_self_contained, dump_dom, percent, screenshot
from fakes import start_sidecar, wait_for

from devstack.alerting_stack import LoopbackPrometheus, find_binary, shorten_rules
from devstack.vllm_server import REPO
from tools.dashboards import DASHBOARDS, panels_of

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600), pytest.mark.asyncio(loop_scope="module")]

NAMESPACE = "live"
PODS = ("sidecar-a", "sidecar-b")
RATE_INTERVAL = "1m"
NO_DATA_HERE = {
    ("Acceptance now and a day earlier", "B"): "offset 1d: Prometheus is minutes old",
    ("Acceptance now and a day earlier", "C"): "offset 1d: Prometheus is minutes old",
    ("TPOT P99/P50 now and a day earlier", "B"): "offset 1d: Prometheus is minutes old",
    ("TPOT P99/P50 now and a day earlier", "C"): "offset 1d: Prometheus is minutes old",
    # the sidecars here run without --calibration: modelled speed-ups exist for calibrated models only
    ("Modelled speed-up (calibrated models)", "A"): "no calibration loaded in this stack",
    ("Modelled speed-up (calibrated models)", "B"): "no calibration loaded in this stack",
    ("Modelled speed-up (calibrated models)", "C"): "no calibration loaded in this stack",
    # both sidecars here speculate: there is no baseline arm to compare with (tests/live/test_baseline_vllm.py
    # runs one), so every ratio and the baseline's own counts are absent, by design
    **{(title, ref): "no baseline arm in this stack" for title, refs in (
        ("Measured speed-up against the baseline arm, per bucket", "ABCDF"),
        ("TPOT speed-up against the baseline arm: P50 and P99", "ABCD"),
        ("TTFT speed-up against the baseline arm: P50 and P99", "ABCD"),
    ) for ref in refs},
    # cAdvisor's container_cpu_cfs_* come from the kubelet (kube-prometheus-stack's kubelet job); no kubelet here
    ("Sidecar container CPU throttling", "A"): "no cAdvisor series without a kubelet",
}


async def api(session: aiohttp.ClientSession, url: str, path: str, **params) -> dict:
    async with session.get(url + path, params=params) as r:
        body = await r.json()
    assert body["status"] == "success", (path, params, body)
    return body["data"]


async def traffic(session, proxy: str, temperature: float, workers: int, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    done = 0

    async def worker(w: int) -> None:
        nonlocal done
        i = 0
        while time.monotonic() < deadline:
            body = {"model": "tiny-target", "prompt": f"def f{w}_{i}(", "max_tokens": 24,
                    "temperature": temperature, "stream": i % 2 == 0}
            async with session.post(proxy + "/v1/completions", json=body) as r:
                assert r.status == 200
                await r.read()
            i += 1
            done += 1

    await asyncio.gather(*(worker(w) for w in range(workers)))
    return done


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack(selfdraft_vllm, tmp_path_factory):
    """Two sidecars over one real vLLM, a real Prometheus scraping them, and traffic already sent."""
    sidecars = {pod: await start_sidecar(selfdraft_vllm.url, wait_up=True) for pod in PODS}
    if find_binary("prometheus") is None:
        pytest.fail("prometheus is not installed (make test installs it)")
    prometheus = LoopbackPrometheus(tmp_path_factory.mktemp("prometheus"), {pod: s.port for pod, s in sidecars.items()},
                                    lambda text: shorten_rules(text, window="5m", for_="1s"), NAMESPACE)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
    try:
        async def scraping() -> bool:
            try:
                data = await api(session, prometheus.url, "/api/v1/query", query='up{job="specdec-sidecar"} == 1')
                return len(data["result"]) == len(PODS)
            except (aiohttp.ClientError, AssertionError):
                return False

        await wait_for(scraping, timeout=60, what="Prometheus scraping both sidecars")
        started = time.time()
        proxies = {pod: s.proxy_url for pod, s in sidecars.items()}
        # greedy alone first (the self-draft accepts it), then sampled traffic in two buckets on both pods
        sent = await traffic(session, proxies["sidecar-a"], 0.0, 1, 10)
        sent += sum(await asyncio.gather(traffic(session, proxies["sidecar-a"], 0.9, 2, 12),
                                         traffic(session, proxies["sidecar-b"], 0.4, 1, 12)))
        print(f"\n{sent} requests through the proxies")

        async def alert_firing() -> bool:
            data = await api(session, prometheus.url, "/api/v1/query",
                             query='ALERTS{alertname=~"SpecDecode.*", alertstate="firing"}')
            return bool(data["result"])

        await wait_for(alert_firing, timeout=60, what="a SpecDecode alert firing")
        await asyncio.sleep(3)  # a few more scrapes and evaluations after the last request
        yield {"prom": prometheus.url, "session": session, "sidecars": sidecars, "start": started - 5}
    finally:
        await session.close()
        prometheus.stop()
        for sidecar in sidecars.values():
            await sidecar.stop()


def grafana_regex(values: list[str], all_values: bool) -> str:
    """How Grafana writes a multi-value variable into a PromQL regex matcher."""
    if all_values:
        return ".*"
    escaped = [re.sub(r"([\\^$*+?.()|\[\]{}])", r"\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def substitute(expr: str, values: dict[str, str]) -> str:
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    assert "$" not in expr, expr
    return expr


async def label_values(session, prom: str, query: str, values: dict[str, str]) -> list[str]:
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
    assert match, query
    data = await api(session, prom, f"/api/v1/label/{match.group(2)}/values",
                     **{"match[]": substitute(match.group(1), values)})
    return data


def dashboards() -> list[tuple[str, dict]]:
    return [(name, json.loads((REPO / "dashboards" / name).read_text())) for name in DASHBOARDS]


async def resolve_variables(stack, model: dict) -> dict[str, str]:
    """Run each query variable in order, select what a person debugging this fleet would: the namespace and
    the model, both pods (multi-value), every temperature bucket ("All")."""
    session, prom = stack["session"], stack["prom"]
    chosen = {"cluster": ([], True), "namespace": ([NAMESPACE], False), "model": (["tiny-target"], False),
              "pod": (list(PODS), False), "temperature_bucket": ([], True)}
    values: dict[str, str] = {}
    for var in model["templating"]["list"]:
        if var["type"] != "query":
            continue
        options = await label_values(session, prom, var["query"], values)
        pick, everything = chosen[var["name"]]
        assert set(pick) <= set(options), (var["name"], options)
        values[var["name"]] = grafana_regex(pick, everything)
    return values


async def test_variables_list_what_the_sidecars_export(stack):
    session, prom = stack["session"], stack["prom"]
    for _, model in dashboards():
        values = await resolve_variables(stack, model)
        buckets = await label_values(session, prom, next(
            v["query"] for v in model["templating"]["list"] if v["name"] == "temperature_bucket"), values)
        assert {"0", "0.7-1.0", "0.3-0.5"} <= set(buckets)
        pods = await label_values(session, prom, next(
            v["query"] for v in model["templating"]["list"] if v["name"] == "pod"), values)
        assert sorted(pods) == list(PODS)
        # no cluster label on this Prometheus: the variable lists nothing and its All (.*) matches everything
        clusters = await label_values(session, prom, next(
            v["query"] for v in model["templating"]["list"] if v["name"] == "cluster"), values)
        assert clusters == [] and values["cluster"] == ".*"


async def test_every_panel_query_runs_and_returns_data(stack):
    session, prom = stack["session"], stack["prom"]
    rules = await api(session, prom, "/api/v1/rules")
    rule_health = [(r["name"], r["health"], r.get("lastError")) for g in rules["groups"] for r in g["rules"]]
    assert len(rule_health) > 30 and all(h == "ok" for _, h, _ in rule_health), rule_health
    end = time.time()
    checked, empty = 0, []
    for name, model in dashboards():
        values = await resolve_variables(stack, model)
        for panel in panels_of(model):
            for target in panel.get("targets", []):
                expr = substitute(target["expr"], values)
                if target.get("instant"):
                    data = await api(session, prom, "/api/v1/query", query=expr, time=end)
                    has_data = bool(data["result"])
                else:
                    data = await api(session, prom, "/api/v1/query_range", query=expr, start=stack["start"],
                                     end=end, step="2s")
                    has_data = any(series["values"] for series in data["result"])
                checked += 1
                key = (panel["title"], target["refId"])
                if key in NO_DATA_HERE:
                    assert not has_data, key  # the reason given for it holds
                    continue
                if not has_data:
                    empty.append(f"{name}: {panel['title']} [{target['refId']}]: {expr}")
        for annotation in model.get("annotations", {}).get("list", []):
            if "expr" not in annotation:
                continue
            expr = substitute(annotation["expr"], values)
            data = await api(session, prom, "/api/v1/query_range", query=expr, start=stack["start"], end=end,
                             step="2s")  # as the panels: the alert fires only in the last seconds of the stack
            checked += 1
            if not any(series["values"] for series in data["result"]):
                empty.append(f"{name}: annotation {annotation['name']}: {expr}")
    print(f"\n{checked} panel and annotation queries run, {len(NO_DATA_HERE)} allowed to be empty here")
    assert checked > 60
    assert empty == []
    # the verdict panel shows both sides of break-even from real traffic: a disabled and a kept bucket
    verdict_panel = next(p for _, m in dashboards() for p in panels_of(m)
                         if p["title"] == "Verdict by temperature bucket, with its reasons")
    values = await resolve_variables(stack, dashboards()[0][1])
    codes = await api(session, prom, "/api/v1/query", query=substitute(verdict_panel["targets"][0]["expr"], values))
    by_bucket = {s["metric"]["temperature_bucket"]: float(s["value"][1]) for s in codes["result"]}
    print(f"bucket verdict codes (2 use, 1 near, 0 disable, -1 guard): {by_bucket}")
    assert by_bucket["0.7-1.0"] == 0


async def test_status_page_in_chromium_with_real_vllm_traffic(stack, tmp_path):
    sidecar = stack["sidecars"]["sidecar-a"]
    registry = sidecar.registry
    url = sidecar.url + "/"
    text = await dump_dom(url)
    page = Page(text)
    assert_self_contained(page, text)
    for bucket in ("0", "0.7-1.0"):
        row = page.bucket_row("tiny-target", bucket)
        current = next(v for v in ("use", "near_break_even", "disable", "insufficient_data")
                       if registry.get_sample_value("specdec_bucket_verdict", {
                           "model": "tiny-target", "temperature_bucket": bucket, "verdict": v}) == 1.0)
        assert row["verdict"] == current, (bucket, row)
        acceptance = registry.get_sample_value("specdec_bucket_acceptance_rate", {
            "model": "tiny-target", "temperature_bucket": bucket, "window": "1m"})
        if acceptance is not None:
            assert percent(row["cells"]["acceptance"]) == pytest.approx(acceptance, abs=0.0006)
        assert row["cells"]["p50"].endswith("%") and row["cells"]["tpot-p50"].endswith(" ms")
    assert page.bucket_row("tiny-target", "0.7-1.0")["verdict"] == "disable"
    shot = tmp_path / "status-page.png"
    await screenshot(url, shot)
    if target := os.environ.get("SPECDEC_STATUS_PAGE_SCREENSHOT"):
        shutil.copyfile(shot, target)
