"""The status page at ``/`` of the metrics port, rendered by a real headless Chromium from a running sidecar.

Traffic goes through the sidecar's proxy to the loopback upstream that replays recorded vLLM responses
(tests/conftest.py); tests/test_dashboards_live.py loads the same page from sidecars fed by a real vLLM.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from yarl import URL

from conftest import FIXTURES, wait_for
from sidecar.app import create_app
from sidecar.config import build_settings
from sidecar.decision import decide
from sidecar.export.status_page import StatusPage
from sidecar.tap.metrics import ACCEPTANCE_BUCKETS

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed (make test installs the Debian package)")
    return path


async def run_chromium(*args: str, timeout: float = 90.0) -> bytes:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        proc = await asyncio.create_subprocess_exec(
            chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
    return out


async def dump_dom(url: str) -> str:
    """The DOM after Chromium loaded and laid out the page."""
    return (await run_chromium("--dump-dom", url)).decode()


async def screenshot(url: str, path: Path, size: str = "1500,760") -> None:
    await run_chromium(f"--screenshot={path}", f"--window-size={size}", url)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """Rows (``data-*`` attributes and cell texts by class), links, and every tag that could load something."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.links: dict[str, str] = {}
        self.tags: list[tuple[str, dict]] = []
        self.title = ""
        self._row: dict | None = None
        self._cell: str | None = None
        self._in_title = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "tr" and "data-model" in a:
            self._row = {k[5:]: v for k, v in a.items() if k.startswith("data-")} | {"cells": {}}
        elif tag == "td" and self._row is not None:
            self._cell = (a.get("class") or "").split()[-1] if a.get("class") else None
            if self._cell:
                self._row["cells"][self._cell] = ""
        elif tag == "a" and "id" in a:
            self.links[a["id"]] = a.get("href", "")
        elif tag == "title":
            self._in_title = True

    def handle_endtag(self, tag):
        if tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "td":
            self._cell = None
        elif tag == "title":
            self._in_title = False

    def handle_data(self, data):
        if self._row is not None and self._cell:
            self._row["cells"][self._cell] += data
        if self._in_title:
            self.title += data

    def bucket_row(self, model: str, bucket: str) -> dict:
        rows = [r for r in self.rows if r.get("model") == model and r.get("bucket") == bucket]
        assert len(rows) == 1, (model, bucket, self.rows)
        return rows[0]


def assert_self_contained(page: Page, text: str) -> None:
    """Nothing on the page loads from anywhere: no scripts, stylesheets, images, frames or CSS URLs."""
    loaders = [(t, a) for t, a in page.tags if t in ("script", "link", "img", "iframe", "object", "embed", "source")]
    assert loaders == []
    assert "url(" not in text and "@import" not in text
    assert all("src" not in a for _, a in page.tags)


def percent(cell: str) -> float:
    match = re.fullmatch(r"([0-9.]+)%", cell.strip())
    assert match, cell
    return float(match.group(1)) / 100


def recorded_spec(name: str) -> dict:
    text = (FIXTURES / name).read_text()
    if name.endswith(".sse"):
        text = [line[6:] for line in text.splitlines() if line.startswith("data: {")][-1]
    return json.loads(text)["metrics"]["speculative_decoding"]


async def send(proxy, temperature: float, stream: bool) -> None:
    body = {"model": "tiny-target", "prompt": "def f(", "max_tokens": 24, "temperature": temperature,
            "stream": stream}
    async with proxy.post(proxy.base + "/v1/completions", json=body) as r:
        assert r.status == 200
        await r.read()


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


async def test_distributions_cover_the_last_window_of_page_views(proxy):
    app_page = StatusPage(proxy.registry, build_settings(windows="10m", verdict_window="10m", min_drafts=1))

    def requests(text: str) -> str:
        return Page(text).bucket_row("tiny-target", "0.3-0.5")["cells"]["requests"]

    await send(proxy, 0.4, stream=False)
    first = app_page.page(now=1000.0)
    assert requests(first) == "1" and "since the sidecar started" in first
    for _ in range(2):
        await send(proxy, 0.4, stream=False)
    # views 300 s apart do not span the 10m window yet: still everything since the start
    second = app_page.page(now=1300.0)
    assert requests(second) == "3" and "since the sidecar started" in second
    await send(proxy, 0.4, stream=False)
    # a view a whole window after the first: only what came since that view, and the header says so
    third = app_page.page(now=1700.0)
    assert requests(third) == "3" and "over the last 700 s of page views" in third


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
