"""The status page as a person sees it: its HTML read back (``Page``), and a real headless Chromium that loads
and renders it (``dump_dom``, ``screenshot``). Used by the loopback tier (HTML served by a sidecar in the
test) and the live tier (Chromium, sidecars fed by a real vLLM)."""

from __future__ import annotations

import asyncio
import re
import shutil
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

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
