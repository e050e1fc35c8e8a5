"""`top`: the view built from a real sidecar's /metrics after traffic through its proxy."""

import json
import subprocess
import sys

from prometheus_client import generate_latest
from rich.console import Console

from fakes import FIXTURES, wait_for
from sidecar.app import MONITOR
from sidecar.upstream.exposition import parse
from sidecar.decision import histogram_quantile
from sidecar.commands.top import WANTED, build_view, render


def test_histogram_quantile_matches_promql_interpolation():
    buckets = [(0.1, 10.0), (0.5, 30.0), (1.0, 40.0), (float("inf"), 40.0)]
    assert histogram_quantile(0.25, buckets) == 0.1 * 10 / 10  # rank 10 is the top of the first bucket
    assert histogram_quantile(0.5, buckets) == 0.1 + 0.4 * (20 - 10) / 20
    assert histogram_quantile(0.99, buckets) == 0.5 + 0.5 * (39.6 - 30) / 10
    assert histogram_quantile(0.5, [(1.0, 0.0), (float("inf"), 0.0)]) is None
    assert histogram_quantile(0.9, [(1.0, 1.0), (float("inf"), 5.0)]) == 1.0  # rank in +Inf: highest finite


async def test_view_from_live_sidecar(proxy):
    registry = proxy.registry
    monitor = proxy.metrics_client.app[MONITOR]
    await wait_for(lambda: monitor.state.up)
    before = parse(generate_latest(registry).decode(), WANTED).samples
    for temperature, stream in ((0.0, False), (0.0, True), (0.9, False)):
        body = {"model": "tiny-target", "prompt": "x", "temperature": temperature, "stream": stream}
        async with proxy.post(proxy.base + "/v1/completions", json=body) as r:
            await r.read()
    polls = monitor.state.scrapes
    await wait_for(lambda: monitor.state.scrapes >= polls + 2)
    after = parse(generate_latest(registry).decode(), WANTED).samples
    view = build_view(after, before, 10.0)
    assert view.up
    rows = {(r.model, r.bucket): r for r in view.buckets}
    greedy = rows[("tiny-target", "0")]
    assert greedy.requests == 2
    nonstream = json.loads((FIXTURES / "completion-nonstream.json").read_bytes())["metrics"]["speculative_decoding"]
    events = [json.loads(l[6:]) for l in (FIXTURES / "completion-stream.sse").read_text().splitlines()
              if l.startswith("data: {")]
    stream = events[-1]["metrics"]["speculative_decoding"]
    assert greedy.acceptance == (nonstream["num_accepted_draft_tokens"] + stream["num_accepted_draft_tokens"]) / (
        nonstream["num_draft_tokens"] + stream["num_draft_tokens"])
    assert greedy.p10 is not None and greedy.p10 <= greedy.p50 <= greedy.p90
    assert greedy.ttft_p50 is not None and greedy.tpot_p99 is not None
    assert rows[("tiny-target", "0.7-1.0")].requests == 1
    model = view.models[0]
    assert model.model == "tiny-target" and model.kv_usage is not None

    console = Console(record=True, width=200)
    console.print(render(view, "http://sidecar/metrics"))
    text = console.export_text()
    assert "tiny-target" in text and "0.7-1.0" in text and "upstream up" in text


def test_top_once_against_unreachable_url_says_so():
    proc = subprocess.run([sys.executable, "-m", "sidecar", "top", "--url", "http://127.0.0.1:9/metrics", "--once"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert "cannot read metrics" in proc.stdout


def test_ttft_and_tpot_come_from_streamed_requests_only():
    """A page from a sidecar that still labels non-streamed requests' TTFT (their whole body time): those
    must not be summed into the streamed distribution."""
    from sidecar.upstream.exposition import Sample

    def hist(name, stream, counts):
        # three of the family's own edges (TTFT 0.1, 1, 5 s; TPOT 0.08, 0.15, 0.3 s) and +Inf
        edges = (0.1, 1.0, 5.0, float("inf")) if "ttft" in name else (0.08, 0.15, 0.3, float("inf"))
        return [Sample(name + "_bucket", (("le", "+Inf" if le == float("inf") else str(le)), ("model", "m"),
                                          ("stream", stream), ("temperature_bucket", "0")), float(c))
                for le, c in zip(edges, counts)]

    samples = [Sample("specdec_requests_total", (("model", "m"), ("status_class", "2xx"),
                                                 ("temperature_bucket", "0")), 20.0)]
    samples += hist("specdec_request_ttft_seconds", "true", (10, 10, 10, 10))     # all under 0.1 s
    samples += hist("specdec_request_ttft_seconds", "false", (0, 0, 10, 10))      # whole bodies: 1-5 s
    samples += hist("specdec_request_tpot_seconds", "true", (10, 10, 10, 10))     # all under 0.08 s
    samples += hist("specdec_request_tpot_seconds", "false", (0, 10, 10, 10))
    row = build_view(samples, None, 10.0).buckets[0]
    assert row.ttft_p99 <= 0.1 and row.tpot_p99 <= 0.08


def test_a_page_with_other_tpot_edges_reads_approximately():
    """A sidecar of another version, with other TPOT edges: read by interpolating its cumulative counts at
    this version's edges, not as if everything were above the last one."""
    from sidecar.upstream.exposition import Sample

    old_edges = (0.005, 0.01, 0.02, 0.04, 0.06, 0.1, 0.2, 0.5, float("inf"))  # the edges before 2.5 ms..300 ms
    counts = (0, 0, 50, 100, 100, 100, 100, 100, 100)  # half in (10, 20] ms, half in (20, 40] ms
    samples = [Sample("specdec_requests_total", (("model", "m"), ("status_class", "2xx"),
                                                 ("temperature_bucket", "0")), 100.0)]
    samples += [Sample("specdec_request_tpot_seconds_bucket", (("le", "+Inf" if le == float("inf") else str(le)),
                                                               ("model", "m"), ("stream", "true"),
                                                               ("temperature_bucket", "0")), float(c))
                for le, c in zip(old_edges, counts)]
    row = build_view(samples, None, 10.0).buckets[0]
    assert 0.015 <= row.tpot_p50 <= 0.025  # the page's own P50 is 0.02
    assert 0.03 <= row.tpot_p99 <= 0.045  # and its P99 0.0398


def test_header_says_what_the_distributions_cover():
    """The first frame has no earlier reading to subtract: its distributions are the sidecar's totals."""
    from sidecar.commands.top import covering

    console = Console(record=True, width=200)
    console.print(render(build_view([], None, 0.0), "http://sidecar/metrics"))
    first = console.export_text()
    assert "since the sidecar started" in first and "last 0s" not in first
    console.print(render(build_view([], [], 42.0), "http://sidecar/metrics"))
    assert "distributions over the last 42s" in console.export_text()
    assert covering(0.0) != covering(60.0) == "over the last 60s"
