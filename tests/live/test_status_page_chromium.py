"""The status page rendered by a real headless Chromium from a running sidecar: verdicts, distributions and
links as a person sees them. Traffic goes through the sidecar's proxy to the loopback upstream that replays
recorded vLLM responses (``fakes.ReplayVllm``)."""

from __future__ import annotations

import re

import pytest
from yarl import URL

from browser import Page, assert_self_contained, dump_dom, percent
from fakes import recorded_spec, send_completion as send, wait_for
from sidecar.decision import decide
from sidecar.tap.metrics import ACCEPTANCE_BUCKETS


async def test_page_in_chromium_shows_verdicts_distributions_and_links(proxy):
    for _ in range(3):
        await send(proxy, 0.0, stream=False)
        await send(proxy, 0.0, stream=True)
    await send(proxy, 0.9, stream=True)
    registry = proxy.registry
    streamed, plain = recorded_spec("completion-stream.sse"), recorded_spec("completion-nonstream.json")
    truth = (3 * (streamed["num_accepted_draft_tokens"] + plain["num_accepted_draft_tokens"])
             / (3 * (streamed["num_draft_tokens"] + plain["num_draft_tokens"])))
    expected = decide(truth).value

    def bucket_decided() -> bool:
        return registry.get_sample_value("specdec_bucket_verdict", {
            "model": "tiny-target", "temperature_bucket": "0", "verdict": expected}) == 1.0 and \
            registry.get_sample_value("specdec_bucket_acceptance_rate", {
                "model": "tiny-target", "temperature_bucket": "0", "window": "10m"}) == pytest.approx(truth)

    await wait_for(bucket_decided, timeout=10, what="the bucket verdict over the requests sent")
    url = str(proxy.metrics_client.make_url("/"))
    text = await dump_dom(url)
    page = Page(text)

    assert page.title == "specdec-sidecar: speculative decoding status"
    assert any(t == "meta" and a.get("http-equiv") == "refresh" for t, a in page.tags)
    assert_self_contained(page, text)

    zero = page.bucket_row("tiny-target", "0")
    assert zero["verdict"] == expected
    assert percent(zero["cells"]["acceptance"]) == pytest.approx(truth, abs=0.0006)
    assert zero["cells"]["requests"] == "6"
    assert ("below break-even" in zero["cells"]["why"]) == (expected == "disable")
    # every request in bucket 0 accepted one of two rates: P10..P90 lie in the histogram buckets around them
    rates = sorted(s["num_accepted_draft_tokens"] / s["num_draft_tokens"] for s in (streamed, plain))
    low = max(b for b in ACCEPTANCE_BUCKETS if b < rates[0]) if rates[0] > 0 else 0.0
    high = min(b for b in ACCEPTANCE_BUCKETS if b >= rates[1])
    for q in ("p10", "p50", "p90"):
        assert low <= percent(zero["cells"][q]) <= high + 1e-9, (q, zero["cells"][q], rates)
    assert re.fullmatch(r"\d+ ms", zero["cells"]["ttft-p50"].strip())
    assert re.fullmatch(r"\d+ ms", zero["cells"]["tpot-p50"].strip())

    hot = page.bucket_row("tiny-target", "0.7-1.0")
    assert hot["cells"]["requests"] == "1"
    model_rows = [r for r in page.rows if "bucket" not in r]
    assert [r["model"] for r in model_rows] == ["tiny-target"]
    assert model_rows[0]["verdict"] in {"use", "near_break_even", "disable", "insufficient_data"}

    # the /metrics link resolves from the page, and the runbooks link points at the runbook document
    assert page.links["runbooks-link"].endswith("docs/runbooks.md")
    async with proxy.get(str(proxy.metrics_client.make_url("/").join(URL(page.links["metrics-link"])))) as r:
        assert r.status == 200
        assert "specdec_bucket_verdict" in await r.text()
