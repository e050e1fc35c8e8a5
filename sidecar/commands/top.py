"""``specdec-sidecar top``: a live terminal view of any sidecar's /metrics (e.g. through a port-forward).

Per model: acceptance from vLLM's counters, KV usage, waiting requests and the verdict. Per model and
temperature bucket: acceptance, P10/P50/P90 of per-request acceptance, mean acceptance length, TTFT and
TPOT P50/P99 of streamed requests (``stream="true"``; a non-streamed request's "first token" is its whole
body) and the bucket's verdict. Distributions are over the last ``--window`` seconds of what this
view has seen (differences of the sidecar's counters and histogram buckets), so they move with traffic.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections import deque

from pydantic import BaseModel, ConfigDict, Field, field_validator
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from sidecar.config import ExitCode, http_url
from sidecar.export.view import (  # noqa: F401 (re-exported)
    WANTED, View, build_view, calibration_notes, millis, number, percent, speedup,
)
from sidecar.upstream.exposition import Sample, parse

VERDICT_STYLE = {"use": "green", "near_break_even": "yellow", "disable": "bold red", "insufficient_data": "dim"}


def fetch(url: str, timeout: float = 5.0) -> list[Sample]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode("utf-8", "replace"), WANTED).samples



def fetch_alerts(alertmanager: str, timeout: float = 5.0) -> list[dict]:
    """Active, unsilenced, uninhibited specdec alerts from Alertmanager's v2 API."""
    url = alertmanager.rstrip("/") + "/api/v2/alerts?active=true&silenced=false&inhibited=false"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        alerts = json.loads(response.read())
    return [a for a in alerts if str(a.get("labels", {}).get("alertname", "")).startswith("SpecDecode")]


def render_alerts(alerts: list[dict] | str) -> Table | Text:
    if isinstance(alerts, str):
        return Text(f"Alertmanager: {alerts}", style="dim")
    table = Table(title="Firing alerts (Alertmanager)", title_justify="left", expand=True)
    for column in ("alert", "severity", "model", "temperature bucket", "since"):
        table.add_column(column)
    for alert in sorted(alerts, key=lambda a: (a["labels"].get("severity") != "critical", a["labels"]["alertname"])):
        labels = alert["labels"]
        severity = labels.get("severity", "")
        table.add_row(Text(labels["alertname"], style="bold red" if severity == "critical" else "yellow"), severity,
                      labels.get("model", ""), labels.get("temperature_bucket", ""),
                      str(alert.get("startsAt", ""))[11:19])
    if not alerts:
        table.add_row(Text("none", style="green"), "", "", "", "")
    return table


def covering(span: float) -> str:
    """What the distributions cover. A span of 0 is the first reading: with no earlier one to subtract, they
    are the sidecar's own totals since it started, whatever the window."""
    return f"over the last {span:.0f}s" if span > 0 else "since the sidecar started (one reading so far)"


def render(view: View, url: str) -> Group:
    status = Text("upstream up", style="green") if view.up else Text("upstream DOWN", style="bold red")
    header = Text.assemble(("specdec-sidecar top ", "bold"), (url, "cyan"), "  ", status,
                           f"  distributions {covering(view.span)}")
    models = Table(title="Models (from vLLM's counters)", title_justify="left", expand=True)
    for column in ("model", "acceptance", "window", "break-even", "thresholds", "modelled", "mean acc. length",
                   "KV usage", "running", "waiting", "verdict"):
        models.add_column(column, justify="left" if column in ("model", "verdict", "thresholds") else "right")
    for m in view.models:
        models.add_row(m.model, percent(m.acceptance), m.window or "—", percent(m.break_even), m.source,
                       speedup(m.modelled_speedup), number(m.mean_length), percent(m.kv_usage),
                       number(m.running, "{:.0f}"), number(m.waiting, "{:.0f}"),
                       Text(m.verdict, style=VERDICT_STYLE.get(m.verdict, "")))
    buckets = Table(title="By temperature bucket (from the request tap)", title_justify="left", expand=True)
    for column in ("model", "temp", "requests", "acceptance", "P10", "P50", "P90", "mean acc. length", "modelled",
                   "TTFT P50", "TTFT P99", "TPOT P50", "TPOT P99", "verdict"):
        buckets.add_column(column, justify="left" if column in ("model", "temp", "verdict") else "right")
    for r in view.buckets:
        buckets.add_row(r.model, r.bucket, f"{r.requests:.0f}", percent(r.acceptance), percent(r.p10), percent(r.p50),
                        percent(r.p90), number(r.mean_length), speedup(r.modelled_speedup), millis(r.ttft_p50),
                        millis(r.ttft_p99), millis(r.tpot_p50), millis(r.tpot_p99),
                        Text(r.verdict, style=VERDICT_STYLE.get(r.verdict, "")))
    notes = [Text(line, style="cyan") for line in calibration_notes(view)]
    return Group(header, models, buckets, *notes)


def run_top(
    url: str,
    interval: float,
    window: float,
    once: bool,
    console: Console | None = None,
    alertmanager: str | None = None,
) -> int:
    console = console or Console()
    history: deque[tuple[float, list[Sample]]] = deque()

    def frame() -> Group:
        now = time.monotonic()
        try:
            samples = fetch(url)
        except (urllib.error.URLError, OSError, ValueError) as error:
            return Group(Text(f"specdec-sidecar top {url}: cannot read metrics ({error})", style="bold red"))
        history.append((now, samples))
        while len(history) > 2 and history[1][0] <= now - window:
            history.popleft()
        base_t, base = history[0]
        use_base = base if len(history) > 1 else None
        view = render(build_view(samples, use_base, now - base_t), url)
        if alertmanager:
            try:
                alerts: list[dict] | str = fetch_alerts(alertmanager)
            except (urllib.error.URLError, OSError, ValueError) as error:
                alerts = f"cannot read {alertmanager} ({error})"
            view = Group(view, render_alerts(alerts))
        return view

    if once:
        console.print(frame())
        return 0
    try:
        with Live(frame(), console=console, refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame())
    except KeyboardInterrupt:
        pass
    return 0


class TopSettings(BaseModel):
    """Everything ``top`` can be told; each field is the flag of the same name."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    url: str = Field("http://127.0.0.1:9464/metrics", description="the sidecar's /metrics URL")
    interval: float = Field(2.0, gt=0, allow_inf_nan=False, description="seconds between refreshes")
    window: float = Field(60.0, gt=0, allow_inf_nan=False, description="seconds of history the distributions cover")
    once: bool = Field(False, description="print one frame and exit")
    alertmanager: str | None = Field(
        None, description="also show firing SpecDecode alerts from this Alertmanager URL",
        json_schema_extra={"metavar": "URL"})

    @field_validator("url", "alertmanager")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)


def run(settings: TopSettings) -> ExitCode:
    run_top(settings.url, settings.interval, settings.window, settings.once, alertmanager=settings.alertmanager)
    return ExitCode.OK
