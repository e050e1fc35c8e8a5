"""``GET /`` on the metrics port: a small self-contained HTML page a person can read without Grafana.

What someone sees through ``kubectl port-forward pod/<pod> 9464``: the verdict per model and per temperature
bucket with the numbers behind it, acceptance, P10/P50/P90 of per-request acceptance, TTFT and TPOT, KV
usage, and links to ``/metrics`` and the runbooks. It refreshes itself (``<meta http-equiv="refresh">``), has
no scripts and loads nothing from anywhere else.

It is computed from the registry's samples, the same in-process state ``/metrics`` renders: no I/O. Verdicts
and their acceptance come from the collector (``--verdict-window``). Distributions are differences of the
tap's counters and histograms between page views, over the last ``--verdict-window`` once the views kept
span one (until then, everything since the sidecar started); the table header says which span they cover.
The row maths is ``top``'s (``build_view``), so the page and ``specdec-sidecar top`` agree.
"""

from __future__ import annotations

import html
import time
from collections import deque
from dataclasses import dataclass

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar import __version__
from sidecar.config import Settings, format_duration
from sidecar.decision import Verdict
from sidecar.export.view import View, build_view, millis, number, percent
from sidecar.upstream.derive import base_point, trim_history
from sidecar.upstream.exposition import Sample

# Same base as the alerts' runbook_url annotations (alerts/alerts.yaml).
RUNBOOK_BASE = "https://github.com/specdec-sidecar/specdec-sidecar/blob/main/docs/runbooks.md"
REFRESH_SECONDS = 10
MAX_VIEWS_KEPT = 512

VERDICT_TEXT = {
    "use": "use",
    "near_break_even": "near break-even",
    "disable": "disable",
    "insufficient_data": "insufficient data",
}
MODEL_RUNBOOK = {"disable": "specdecodeacceptancebelowbreakeven", "near_break_even": "specdecodenearbreakeven"}
BUCKET_RUNBOOK = {"disable": "specdecodetemperaturebucketbelowbreakeven",
                  "near_break_even": "specdecodenearbreakeven"}

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2em 2em;color:#1d2330;background:#fff}
h1{font-size:20px;margin:0 0 .2em}h2{font-size:16px;margin:1.4em 0 .4em}
.meta{color:#555}.meta a{margin-right:1em}
table{border-collapse:collapse;width:100%}th,td{padding:.3em .6em;border-bottom:1px solid #e3e6ec;text-align:right;
white-space:nowrap}th{background:#f4f6f9;font-weight:600}td.l,th.l{text-align:left}td.why{text-align:left;
white-space:normal;color:#333}
.v{display:inline-block;padding:.1em .6em;border-radius:.8em;font-weight:600;color:#fff}
.v-use{background:#1a7f37}.v-near_break_even{background:#b35900}.v-disable{background:#c62828}
.v-insufficient_data{background:#8a8f98}
.down{background:#c62828;color:#fff;padding:.5em 1em;border-radius:4px;font-weight:600}
.up{color:#1a7f37;font-weight:600}
"""


@dataclass(frozen=True, slots=True)
class PageView:
    """The registry's samples at one page view (``t`` from the monotonic clock)."""

    t: float
    samples: list[Sample]


def percent1(value: float | None) -> str:
    """A percentage with one decimal: the page has room for it."""
    return percent(value, 1)


def registry_samples(registry: CollectorRegistry) -> list[Sample]:
    """Every sample the registry would render on /metrics, as the exposition reader's ``Sample``s."""
    return [
        Sample(s.name, tuple(sorted(s.labels.items())), s.value)
        for family in registry.collect()
        for s in family.samples
    ]



def reason(verdict: str, acceptance: float | None, settings: Settings) -> str:
    """Why the verdict is what it is, in the decision framework's words, with the numbers."""
    be, upper = settings.break_even, settings.near_break_even_upper
    window = format_duration(settings.verdict_window)
    if verdict == Verdict.INSUFFICIENT_DATA or acceptance is None:
        return f"fewer than {settings.min_drafts} draft steps in the last {window}: no verdict yet"
    if verdict == Verdict.DISABLE:
        return (f"acceptance {percent1(acceptance)} is below break-even {percent1(be)}: the draft's verify work costs "
                f"more than it saves; turn speculation off for this traffic")
    if verdict == Verdict.NEAR_BREAK_EVEN:
        return (f"acceptance {percent1(acceptance)} is between break-even {percent1(be)} and {percent1(upper)}: roughly a "
                f"wash, net-negative under more load")
    return f"acceptance {percent1(acceptance)} is at or above {percent1(upper)}: speculation pays for itself"


def _badge(verdict: str, anchor: str | None, runbook_base: str) -> str:
    text = html.escape(VERDICT_TEXT.get(verdict, verdict))
    badge = f'<span class="v v-{html.escape(verdict)}">{text}</span>'
    if anchor:
        badge += f' <a href="{html.escape(runbook_base)}#{anchor}">runbook</a>'
    return badge


def render_page(view: View, samples: list[Sample], settings: Settings, span: float | None,
                runbook_base: str = RUNBOOK_BASE) -> str:
    """The whole page as a string (pure: ``view`` and ``samples`` in, HTML out)."""
    window = format_duration(settings.verdict_window)
    model_acceptance: dict[str, float] = {}
    model_length: dict[str, float] = {}
    bucket_acceptance: dict[tuple[str, str], float] = {}
    for s in samples:
        if s.label("window") != window:
            continue
        if s.name == "specdec_acceptance_rate":
            model_acceptance[s.label("model")] = s.value
        elif s.name == "specdec_mean_acceptance_length":
            model_length[s.label("model")] = s.value
        elif s.name == "specdec_bucket_acceptance_rate":
            bucket_acceptance[(s.label("model"), s.label("temperature_bucket"))] = s.value
    esc = html.escape
    spread = "since the sidecar started" if span is None else f"over the last {span:.0f} s of page views"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>specdec-sidecar: speculative decoding status</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Speculative decoding: is it paying off?</h1>",
        f'<p class="meta">specdec-sidecar {esc(__version__)} · upstream {esc(settings.upstream)} · '
        f"verdicts over {window} (break-even {percent1(settings.break_even)}, near-break-even up to "
        f"{percent1(settings.near_break_even_upper)}) · refreshes every {REFRESH_SECONDS} s<br>"
        f'<a id="metrics-link" href="metrics">/metrics</a><a id="runbooks-link" href="{esc(runbook_base)}">'
        "runbooks</a></p>",
    ]
    if view.up:
        out.append('<p id="upstream" class="up">vLLM /metrics: reachable</p>')
    else:
        out.append('<p id="upstream" class="down">vLLM /metrics unreachable: derived series are absent until '
                   f'it answers (<a href="{esc(runbook_base)}#specdecodesidecarupstreamdown" '
                   'style="color:#fff">runbook</a>)</p>')

    out.append(f"<h2>By model (vLLM's counters, {window})</h2>")
    out.append('<table id="models"><thead><tr><th class="l">model</th><th class="l">verdict</th>'
               '<th class="l">why</th><th>acceptance</th><th>mean acceptance length</th><th>KV usage</th>'
               "<th>running</th><th>waiting</th></tr></thead><tbody>")
    for m in view.models:
        acceptance = model_acceptance.get(m.model)
        out.append(
            f'<tr data-model="{esc(m.model)}" data-verdict="{esc(m.verdict)}">'
            f'<td class="l">{esc(m.model)}</td>'
            f'<td class="l verdict">{_badge(m.verdict, MODEL_RUNBOOK.get(m.verdict), runbook_base)}</td>'
            f'<td class="why">{esc(reason(m.verdict, acceptance, settings))}</td>'
            f'<td class="acceptance">{percent1(acceptance)}</td><td>{number(model_length.get(m.model))}</td>'
            f"<td>{percent1(m.kv_usage)}</td><td>{number(m.running, '{:.0f}')}</td><td>{number(m.waiting, '{:.0f}')}</td>"
            "</tr>"
        )
    if not view.models:
        out.append('<tr><td class="l" colspan="8">No traffic</td></tr>')
    out.append("</tbody></table>")

    out.append(f"<h2>By model and temperature bucket (the request tap)</h2>"
               f'<p class="meta" id="spread">Verdict and acceptance over {window}; requests, P10/P50/P90 of '
               f"per-request acceptance, TTFT and TPOT {spread}.</p>")
    out.append('<table id="buckets"><thead><tr><th class="l">model</th><th class="l">temperature</th>'
               '<th class="l">verdict</th><th class="l">why</th><th>acceptance</th><th>requests</th>'
               "<th>P10</th><th>P50</th><th>P90</th><th>TTFT P50</th><th>TTFT P99</th><th>TPOT P50</th>"
               "<th>TPOT P99</th></tr></thead><tbody>")
    for r in view.buckets:
        acceptance = bucket_acceptance.get((r.model, r.bucket))
        out.append(
            f'<tr data-model="{esc(r.model)}" data-bucket="{esc(r.bucket)}" data-verdict="{esc(r.verdict)}">'
            f'<td class="l">{esc(r.model)}</td><td class="l">{esc(r.bucket)}</td>'
            f'<td class="l verdict">{_badge(r.verdict, BUCKET_RUNBOOK.get(r.verdict), runbook_base)}</td>'
            f'<td class="why">{esc(reason(r.verdict, acceptance, settings))}</td>'
            f'<td class="acceptance">{percent1(acceptance)}</td><td class="requests">{r.requests:.0f}</td>'
            f'<td class="p10">{percent1(r.p10)}</td><td class="p50">{percent1(r.p50)}</td><td class="p90">{percent1(r.p90)}</td>'
            f'<td class="ttft-p50">{millis(r.ttft_p50)}</td><td>{millis(r.ttft_p99)}</td>'
            f'<td class="tpot-p50">{millis(r.tpot_p50)}</td><td>{millis(r.tpot_p99)}</td></tr>'
        )
    if not view.buckets:
        out.append('<tr><td class="l" colspan="13">No traffic through the proxy yet</td></tr>')
    out.append("</tbody></table></body></html>\n")
    return "".join(out)


class StatusPage:
    """Serves ``/``; keeps the registry samples of recent page views to difference distributions against."""

    def __init__(self, registry: CollectorRegistry, settings: Settings, runbook_base: str = RUNBOOK_BASE) -> None:
        self._registry = registry
        self._settings = settings
        self._runbook_base = runbook_base
        self._views: deque[PageView] = deque(maxlen=MAX_VIEWS_KEPT)

    def page(self, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        samples = registry_samples(self._registry)
        self._views.append(PageView(now, samples))
        trim_history(self._views, now, self._settings.verdict_window)
        window = self._settings.verdict_window
        base = base_point(self._views, window, 0.0)
        if base is not None and now - base.t < window:
            base = None  # views do not span a whole window yet: everything since the sidecar started
        view = build_view(samples, base.samples if base else None, now - base.t if base else 0.0)
        return render_page(view, samples, self._settings, now - base.t if base else None, self._runbook_base)

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(text=self.page(), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})
