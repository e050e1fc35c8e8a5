"""The series budget (docs/scaling.md): the real sidecar, with one model and every temperature bucket in use,
exports at most 600 series (the proxy's own 19 included), and no family more than its row in the budget table."""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from fakes import ProgressingVllm, feed, wait_for, write_calibration
from sidecar.app import PROXY_PORT, create_app
from sidecar.buckets import TemperatureBuckets
from sidecar.config import build_settings
from sidecar.decision import histogram_quantile
from sidecar.tap.metrics import ACCEPTANCE_BUCKETS, UNREAD_BUCKET

pytestmark = pytest.mark.timeout(90)

LIMIT = 600
SCALING = Path(__file__).resolve().parents[2] / "docs" / "scaling.md"
# What Prometheus sends when it scrapes (it gets OpenMetrics from prometheus_client).
PROMETHEUS_ACCEPT = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
                     "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1")


def budget_table() -> dict[str, int]:
    rows = re.findall(r"^\| `(specdec_[a-z0-9_]+)` \| (\d+) \|", SCALING.read_text(), re.M)
    table = {name: int(n) for name, n in rows}
    assert len(table) == len(rows), "a family has two budget rows"
    return table


def count_families(text: str, openmetrics: bool) -> Counter:
    families = parse_openmetrics(text) if openmetrics else parse_text(text)
    counts: Counter = Counter()
    for family in families:
        name = family.name + ("_total" if family.type == "counter" else "")
        counts[name] += len(family.samples)
    return counts


def sample_lines(text: str) -> int:
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def test_budget_rows_add_up_to_the_limit():
    table = budget_table()
    assert len(table) > 40
    assert sum(table.values()) <= LIMIT, sum(table.values())


async def test_sidecar_page_stays_within_the_budget(aiohttp_client, tmp_path):
    upstream = ProgressingVllm()
    await upstream.start()
    # calibrated, so the modelled speed-ups are on the page too: the worst case
    calibration = write_calibration(tmp_path / "calibration.json")
    try:
        settings = build_settings(upstream=upstream.url, scrape_interval="0.1s", scrape_timeout="0.1s",
                                  proxy_port=0, proxy_host="127.0.0.1", models="tiny-target", min_drafts=1,
                                  calibration=str(calibration))
        assert settings.temperature_buckets == TemperatureBuckets()  # the default edges
        client = await aiohttp_client(create_app(settings, CollectorRegistry()))
        await feed(client.session, f"http://127.0.0.1:{client.app[PROXY_PORT]}")

        async def page() -> str:
            async with client.get("/metrics", headers={"Accept": PROMETHEUS_ACCEPT}) as r:
                assert r.headers["Content-Type"].startswith("application/openmetrics-text")
                return await r.text()

        async def complete() -> bool:
            """Every family that can appear has appeared: the worst case, not an idle page."""
            counts = count_families(await page(), openmetrics=True)
            return (counts["specdec_bucket_verdict"] == 32 and counts["specdec_bucket_acceptance_rate"] == 8
                    and counts["specdec_bucket_modelled_speedup"] == 8 and counts["specdec_modelled_speedup"] == 1
                    and counts["specdec_recommended_schedule_info"] == 1
                    and counts["specdec_acceptance_rate"] == 3 and counts["specdec_position_acceptance_rate"] == 12)

        await wait_for(complete, timeout=30, what="every derived family on the page")
        text = await page()
        async with client.get("/metrics") as r:
            plain = await r.text()
    finally:
        await upstream.stop()

    counts = count_families(text, openmetrics=True)
    total = sum(counts.values())
    print(f"\n/metrics: {total} series; " + ", ".join(f"{n} {c}" for n, c in counts.most_common(8)))
    assert "_created" not in text and "_created" not in plain
    assert total == sample_lines(text) == sample_lines(plain)
    # the page really is the worst case of the budget: every bucket, both stream modes, both sources
    buckets = set(TemperatureBuckets().labels)
    assert len(buckets) == 8
    for family in ("specdec_request_acceptance_rate", "specdec_request_ttft_seconds",
                   "specdec_request_tpot_seconds"):
        seen = {s.labels["temperature_bucket"] for f in parse_openmetrics(text) if f.name == family for s in f.samples}
        assert seen == buckets, family
    requests = {s.labels["temperature_bucket"] for f in parse_openmetrics(text) if f.name == "specdec_requests"
                for s in f.samples}
    assert requests == buckets | {UNREAD_BUCKET}
    assert 'specdec_request_e2e_seconds_count{model="tiny-target",stream="false"}' in text
    assert 'specdec_request_mean_acceptance_length_count{model="tiny-target",source="stream_steps"}' in text

    table = budget_table()
    over = {n: (c, table.get(n)) for n, c in counts.items() if n not in table or c > table[n]}
    assert not over, f"families over their row in docs/scaling.md (count, budget): {over}"
    assert total <= LIMIT


@pytest.mark.parametrize("threshold", [0.5, 0.65])
def test_thresholds_are_acceptance_bucket_edges(threshold):
    assert threshold in ACCEPTANCE_BUCKETS


def _distributions(rng: random.Random) -> list[list[float]]:
    out = []
    for mean in (0.05, 0.15, 0.3, 0.45, 0.55, 0.62, 0.7, 0.8, 0.9):
        for concentration in (4, 12, 40):
            a, b = mean * concentration, (1 - mean) * concentration
            out.append([rng.betavariate(a, b) for _ in range(2000)])
    for share in (0.2, 0.5, 0.8):  # greedy requests accepting well, sampled ones accepting nothing or little
        out.append([rng.betavariate(7, 3) if rng.random() < share else
                    (0.0 if rng.random() < 0.5 else rng.betavariate(1, 20)) for _ in range(2000)])
    for p in (0.3, 0.6, 0.85):  # k=4 drafts per step, 6-40 steps per request
        values = []
        for _ in range(2000):
            drafted = 4 * rng.randint(6, 40)
            values.append(sum(rng.random() < p for _ in range(drafted)) / drafted)
        out.append(values)
    return out


def test_acceptance_bounds_resolve_p10_p50_p90():
    """The chosen edges keep P10/P50/P90 within 0.06 of the truth and never on the wrong side of 0.5/0.65."""
    edges = [*ACCEPTANCE_BUCKETS, math.inf]

    def zone(x: float) -> int:
        return 0 if x < 0.5 else 1 if x < 0.65 else 2

    for values in _distributions(random.Random(7)):
        ordered = sorted(values)
        cumulative = [(le, sum(1 for v in values if v <= le)) for le in edges]
        for q in (0.1, 0.5, 0.9):
            truth = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
            estimate = histogram_quantile(q, cumulative)
            assert estimate is not None
            assert abs(estimate - truth) <= 0.06, (q, truth, estimate)
            assert zone(estimate) == zone(truth), (q, truth, estimate)
