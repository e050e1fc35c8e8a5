"""End to end against a real vLLM (CPU build) serving the tiny pair with draft-model speculation (k=4).

Traffic with a mix of temperatures, streaming and not, chat and completions, at concurrency 8, goes through
the sidecar's proxy. The sidecar's numbers must equal what vLLM itself said: per temperature bucket, the
sums of vLLM's per-request numbers; in total, the deltas of vLLM's own counters; and the windowed
acceptance the deltas of vLLM's counters give over the same interval.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from conftest import start_vllm
from fakes import HostileRelay, wait_for
from sidecar.app import MONITOR, PROXY_PORT, create_app
from sidecar.buckets import TemperatureBuckets
from sidecar.config import build_settings
from sidecar.decision import decide
from sidecar.upstream.vllm_metrics import read_vllm_metrics
from devstack.vllm_server import REPO, draft_model_config, ngram_config

# vLLM start-up (35-100 s on 2 cores) counts against the per-test timeout: bound these tests separately.
pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]

MODELS = REPO / "models"


API_KEY = "sk-e2e"


@pytest.fixture(scope="module", params=["draft_model", "ngram"])
def vllm(request, tmp_path_factory):
    """A real vLLM run as in production: ``--api-key`` on /v1/*, uvicorn's 5 s keep-alive."""
    config = draft_model_config(MODELS / "tiny-draft") if request.param == "draft_model" else ngram_config()
    server = start_vllm(tmp_path_factory, config)
    server.extra_args = ["--api-key", API_KEY]
    with server:
        yield server


async def vllm_counters(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as r:
        snap = read_vllm_metrics(await r.text())
    total: dict[str, float] = defaultdict(float)
    for sample in snap.engines.values():
        total["accepted"] += sample.accepted_tokens or 0
        total["drafted"] += sample.draft_tokens or 0
        total["drafts"] += sample.drafts or 0
    return dict(total)


async def settled_counters(session: aiohttp.ClientSession, url: str, timeout: float = 30.0) -> dict[str, float]:
    """vLLM's counters once they stop moving: its stats logger may count the last step a moment after the
    last response has gone out, so a read right after the traffic can be short."""
    deadline = time.monotonic() + timeout
    previous = await vllm_counters(session, url)
    while time.monotonic() < deadline:
        await asyncio.sleep(1.0)
        current = await vllm_counters(session, url)
        if current == previous:
            return current
        previous = current
    raise AssertionError("vLLM's counters kept moving with no traffic")


def spec_of(body: bytes, stream: bool) -> dict:
    if not stream:
        return json.loads(body)["metrics"]["speculative_decoding"]
    events = [json.loads(l[6:]) for l in body.decode().splitlines() if l.startswith("data: {")]
    return [e for e in events if e.get("metrics")][-1]["metrics"]["speculative_decoding"]


def completion_tokens(body: bytes, stream: bool) -> int:
    if not stream:
        return json.loads(body)["usage"]["completion_tokens"]
    events = [json.loads(l[6:]) for l in body.decode().splitlines() if l.startswith("data: {")]
    return [e for e in events if e.get("usage")][-1]["usage"]["completion_tokens"]


TEMPERATURES = [0.0, 0.2, 0.5, 0.8, 1.0, None]


def requests_mix(n: int) -> list[tuple[str, dict, bool]]:
    out = []
    for i in range(n):
        temperature = TEMPERATURES[i % len(TEMPERATURES)]
        stream = (i // len(TEMPERATURES)) % 2 == 1
        chat = (i // (2 * len(TEMPERATURES))) % 2 == 1
        body: dict = {"model": "tiny-target", "max_tokens": 24 + (i % 3) * 8, "stream": stream}
        if temperature is not None:
            body["temperature"] = temperature
        if chat:
            body["messages"] = [{"role": "user", "content": f"import os{i}"}]
            out.append(("/v1/chat/completions", body, stream))
        else:
            body["prompt"] = f"def f{i}("
            out.append(("/v1/completions", body, stream))
    return out


@pytest.fixture
async def relay(vllm):
    """vLLM's pages reach the sidecar in 512-byte writes, gzipped, over connections idle-closed after 5 s."""
    server = HostileRelay(vllm.url)
    await server.start()
    yield server
    await server.stop()


async def test_sidecar_equals_vllm(vllm, relay, aiohttp_client, tmp_path):
    registry = CollectorRegistry()
    # Draft-model run: the sidecar has no key (model names come from /metrics); n-gram run: it has the key.
    key = {}
    if vllm.speculative["method"] == "ngram":
        (tmp_path / "key").write_text(API_KEY)
        key = {"upstream_api_key_file": str(tmp_path / "key")}
    settings = build_settings(
        upstream=relay.url, scrape_interval="0.5s", scrape_timeout="0.5s", windows="1m,1h", verdict_window="1h",
        proxy_port=0, proxy_host="127.0.0.1", min_drafts=1, **key,
    )
    client = await aiohttp_client(create_app(settings, registry))
    monitor = client.app[MONITOR]
    proxy = f"http://127.0.0.1:{client.app[PROXY_PORT]}"
    await wait_for(lambda: monitor.state.up, timeout=30, what="sidecar to see vLLM")

    async with aiohttp.ClientSession(auto_decompress=False, headers={"Authorization": f"Bearer {API_KEY}"}) as session:
        before = await vllm_counters(session, vllm.url)
        # The sidecar's first point must hold exactly these counters: vLLM is idle from here until traffic.
        first_points = monitor.history_length
        await wait_for(lambda: monitor.history_length > first_points, what="a poll after the baseline")

        buckets = TemperatureBuckets()
        expected: dict[str, dict[str, int]] = defaultdict(
            lambda: {"accepted": 0, "drafted": 0, "requests": 0, "with_drafts": 0, "steps": 0, "streamed": 0,
                     "multi_token": 0}
        )
        semaphore = asyncio.Semaphore(8)

        async def send(path: str, body: dict, stream: bool) -> None:
            async with semaphore:
                async with session.post(proxy + path, json=body, timeout=aiohttp.ClientTimeout(total=300)) as r:
                    raw = await r.read()
                    assert r.status == 200, raw[:300]
            spec = spec_of(raw, stream)
            bucket = buckets.bucket(body.get("temperature"), "temperature" in body)
            expected[bucket]["accepted"] += spec["num_accepted_draft_tokens"]
            expected[bucket]["drafted"] += spec["num_draft_tokens"]
            expected[bucket]["requests"] += 1
            expected[bucket]["with_drafts"] += spec["num_draft_tokens"] > 0  # n-gram may find nothing to propose
            expected[bucket]["steps"] += spec["num_spec_steps"]
            expected[bucket]["streamed"] += stream  # TTFT and TPOT describe streamed requests only
            expected[bucket]["multi_token"] += stream and completion_tokens(raw, stream) > 1  # TPOT: two tokens

        mix = requests_mix(48)
        await asyncio.gather(*(send(*m) for m in mix))
        after = await settled_counters(session, vllm.url)
        polls = monitor.state.scrapes
        await wait_for(lambda: monitor.state.scrapes >= polls + 2, what="polls after the traffic")

    get = registry.get_sample_value
    total_accepted = total_drafted = 0.0
    for bucket, want in expected.items():
        labels = {"model": "tiny-target", "temperature_bucket": bucket, "source": "vllm"}
        assert get("specdec_request_accepted_tokens_total", labels) == want["accepted"], bucket
        assert get("specdec_request_draft_tokens_total", labels) == want["drafted"], bucket
        hist = {"model": "tiny-target", "temperature_bucket": bucket}
        assert (get("specdec_request_acceptance_rate_count", hist) or 0) == want["with_drafts"]
        streamed = {**hist, "stream": "true"}
        assert (get("specdec_request_ttft_seconds_count", streamed) or 0) == want["streamed"], bucket
        assert (get("specdec_request_tpot_seconds_count", streamed) or 0) == want["multi_token"], bucket
        assert get("specdec_request_ttft_seconds_count", {**hist, "stream": "false"}) is None, bucket
        rate = want["accepted"] / want["drafted"] if want["drafted"] and want["steps"] else None
        implied = decide(rate, 0.5, 0.65).value
        assert get("specdec_bucket_verdict", {**hist, "verdict": implied}) == 1.0, (bucket, rate)
        total_accepted += get("specdec_request_accepted_tokens_total", labels)
        total_drafted += get("specdec_request_draft_tokens_total", labels)
    assert set(expected) == {"0", "0-0.3", "0.3-0.5", "0.7-1.0", "default"}
    assert total_accepted == after["accepted"] - before["accepted"]
    assert total_drafted == after["drafted"] - before["drafted"]

    acceptance = get("specdec_acceptance_rate", {"model": "tiny-target", "window": "1h"})
    truth = (after["accepted"] - before["accepted"]) / (after["drafted"] - before["drafted"])
    assert acceptance == pytest.approx(truth, rel=1e-12)
    assert get("specdec_mean_acceptance_length", {"model": "tiny-target", "window": "1h"}) == pytest.approx(
        1 + (after["accepted"] - before["accepted"]) / (after["drafts"] - before["drafts"]), rel=1e-12
    )
    want = "use" if truth >= 0.65 else "near_break_even" if truth >= 0.5 else "disable"
    assert get("specdec_verdict", {"model": "tiny-target", "verdict": want}) == 1.0
    print(f"\n{vllm.speculative['method']}: acceptance {truth:.4f} over {after['drafted'] - before['drafted']:.0f} "
          f"draft tokens; per bucket " + ", ".join(
              f"{b}: {v['accepted']}/{v['drafted']}" for b, v in sorted(expected.items())))
    unattributed = sum(
        s.value for f in registry.collect() if f.name == "specdec_requests_unattributed" for s in f.samples
        if s.name.endswith("_total")
    )
    assert unattributed == 0
    # Every poll went through the relay's many small gzip writes, and none came back short, unparsable or
    # refused. A poll may time out (0.5 s here, while vLLM's 2-core CPU build serves 8 requests at once; seen
    # in CI): that is vLLM being slow, not a body read wrong, so those are only bounded.
    assert relay.gzip_polls >= 4 and relay.gzip_polls == relay.metrics_polls
    errors = {
        s.labels["reason"]: s.value for f in registry.collect() if f.name == "specdec_upstream_scrape_errors"
        for s in f.samples if s.name.endswith("_total")
    }
    assert {reason: n for reason, n in errors.items() if reason != "timeout" and n} == {}, errors
    assert errors.get("timeout", 0) <= monitor.state.scrapes / 4, (errors, monitor.state.scrapes)


async def test_stream_steps_source_without_per_request_metrics(tmp_path_factory, aiohttp_client):
    """vLLM without --per-request-spec-decode-metrics: accepted = completion tokens - content chunks."""
    with start_vllm(tmp_path_factory, draft_model_config(MODELS / "tiny-draft"), per_request_metrics=False) as vllm:
        registry = CollectorRegistry()
        settings = build_settings(upstream=vllm.url, scrape_interval="0.5s", scrape_timeout="0.5s", windows="1m",
                                  verdict_window="1m", proxy_port=0, proxy_host="127.0.0.1", min_drafts=1)
        client = await aiohttp_client(create_app(settings, registry))
        proxy = f"http://127.0.0.1:{client.app[PROXY_PORT]}"
        await wait_for(lambda: client.app[MONITOR].state.up, timeout=30)
        finished_by_length = 0
        estimate = 0
        async with aiohttp.ClientSession() as session:
            before = await vllm_counters(session, vllm.url)
            semaphore = asyncio.Semaphore(8)

            async def send(i: int) -> None:
                nonlocal finished_by_length, estimate
                body = {"model": "tiny-target", "prompt": f"def g{i}(", "max_tokens": 20 + i % 7, "stream": True,
                        "temperature": 0}
                async with semaphore:
                    async with session.post(proxy + "/v1/completions", json=body) as r:
                        raw = await r.read()
                events = [json.loads(l[6:]) for l in raw.decode().splitlines() if l.startswith("data: {")]
                chunks = sum(1 for e in events if e["choices"] and e["choices"][0].get("text"))
                tokens = [e for e in events if e.get("usage")][-1]["usage"]["completion_tokens"]
                estimate += tokens - chunks
                finished_by_length += any(c.get("finish_reason") == "length" for e in events for c in e["choices"])

            await asyncio.gather(*(send(i) for i in range(24)))
            after = await settled_counters(session, vllm.url)
    labels = {"model": "tiny-target", "temperature_bucket": "0", "source": "stream_steps"}
    sidecar_accepted = registry.get_sample_value("specdec_request_accepted_tokens_total", labels)
    assert sidecar_accepted == estimate
    truth = after["accepted"] - before["accepted"]
    # Exact except the last step of a request cut by max_tokens, which can hide up to k=4 accepted tokens.
    assert 0 <= truth - sidecar_accepted <= 4 * finished_by_length
    print(f"\nstream_steps: sidecar {sidecar_accepted:.0f} accepted vs vLLM {truth:.0f} "
          f"({finished_by_length} requests cut by max_tokens)")
