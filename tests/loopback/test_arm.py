"""The pod's arm for the baseline comparison: specdec_speculation_enabled from vLLM's page or --speculative,
kept while vLLM is unreachable, and no stream-step acceptance where vLLM does not draft."""

from __future__ import annotations

import aiohttp
import pytest

from fakes import FakeVllm, fixture_text, start_sidecar, wait_for
from sidecar.upstream.monitor import arm_of

pytestmark = pytest.mark.timeout(60)

SPEC_PAGE = fixture_text("vllm-0.32-draft-t3.prom")
BASELINE_PAGE = "\n".join(line for line in SPEC_PAGE.splitlines() if "spec_decode" not in line) + "\n"


def test_the_setting_overrides_the_detection():
    detected = {"a": True, "b": False}
    assert arm_of(detected, "auto") == detected
    assert arm_of(detected, "true") == {"a": True, "b": True}
    assert arm_of(detected, "false") == {"a": False, "b": False}


async def arm(sidecar) -> dict[str, float]:
    async with aiohttp.ClientSession() as session, session.get(sidecar.url + "/metrics") as r:
        text = await r.text()
    out = {}
    for line in text.splitlines():
        if line.startswith("specdec_speculation_enabled{"):
            out[line.split('model="')[1].split('"')[0]] = float(line.rsplit(" ", 1)[1])
    return out


@pytest.mark.parametrize(("page", "setting", "expected"), [
    (SPEC_PAGE, "auto", 1.0), (BASELINE_PAGE, "auto", 0.0),
    (BASELINE_PAGE, "true", 1.0), (SPEC_PAGE, "false", 0.0),
])
async def test_speculation_enabled_is_exported_and_kept_while_vllm_is_down(page, setting, expected):
    upstream = FakeVllm()
    upstream.text = page
    await upstream.start()
    sidecar = await start_sidecar(upstream.url, wait_up=True, speculative=setting, scrape_interval="0.1s",
                                  scrape_timeout="0.1s", models="tiny-target")
    try:
        assert await arm(sidecar) == {"tiny-target": expected}
        await upstream.stop()
        await wait_for(lambda: not sidecar.monitor.state.up, timeout=10, what="the upstream seen down")
        assert await arm(sidecar) == {"tiny-target": expected}  # the last arm seen, not a vanished series
    finally:
        await sidecar.stop()
        await upstream.stop()


async def test_no_series_before_vllm_was_ever_read():
    sidecar = await start_sidecar("http://127.0.0.1:9", scrape_interval="0.1s", scrape_timeout="0.1s",
                                  models="tiny-target")
    try:
        await wait_for(lambda: sidecar.monitor.state.scrapes >= 2, timeout=10, what="two failed polls")
        assert await arm(sidecar) == {}
    finally:
        await sidecar.stop()
