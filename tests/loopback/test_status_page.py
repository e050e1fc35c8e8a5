"""The status page at ``/`` of the metrics port, from a running sidecar: what it shows over a window of page
views, and with vLLM unreachable. Traffic goes through the sidecar's proxy to the loopback upstream that
replays recorded vLLM responses (``fakes.ReplayVllm``); live/test_status_page_chromium.py renders the same
page in a real headless Chromium, and live/test_dashboards_live.py from sidecars fed by a real vLLM.
"""

from __future__ import annotations

from browser import Page, assert_self_contained
from fakes import send_completion as send
from sidecar.app import MONITOR, REQUESTS, create_app
from sidecar.config import build_settings
from sidecar.export.status_page import StatusPage
from sidecar.tap.windows import TapMonitor


async def test_distributions_cover_the_verdict_window_of_the_taps_history(proxy):
    """The page reads the tap's windows (on the tap's own clock), not differences of page views."""
    app = proxy.metrics_client.app
    settings = build_settings(windows="10m", verdict_window="10m", min_drafts=1)
    clock = [1000.0]
    tap = TapMonitor(app[REQUESTS].totals, settings.windows, 5.0, clock=lambda: clock[0])
    status = StatusPage(settings, lambda: app[MONITOR].state, lambda: tap.state, lambda: None)

    def requests(text: str) -> str:
        return Page(text).bucket_row("tiny-target", "0.3-0.5")["cells"]["requests"]

    tap.tick()
    await send(proxy, 0.4, stream=False)
    clock[0] = 1300.0
    tap.tick()
    first = status.page()
    assert requests(first) == "1" and "the last 300 s (all the history there is so far)" in first
    for _ in range(2):
        await send(proxy, 0.4, stream=False)
    clock[0] = 1600.0
    tap.tick()
    second = status.page()
    assert requests(second) == "3" and "over the last 10m." in second
    await send(proxy, 0.4, stream=False)
    clock[0] = 1900.0
    tap.tick()
    # the window now starts at the 1300 s checkpoint: the first request has left it
    assert requests(status.page()) == "3"


async def test_idle_sidecar_with_vllm_unreachable(aiohttp_client, unused_tcp_port):
    settings = build_settings(upstream=f"http://127.0.0.1:{unused_tcp_port}", scrape_interval="0.1s",
                              scrape_timeout="0.1s", windows="1m", verdict_window="1m")
    client = await aiohttp_client(create_app(settings))
    response = await client.get("/")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/html; charset=utf-8"
    text = await response.text()
    page = Page(text)
    assert_self_contained(page, text)
    assert "vLLM /metrics unreachable" in text
    assert "No traffic" in text
    assert page.rows == []
