"""``GET /`` on the metrics port: a small self-contained HTML page a person can read without Grafana.

What someone sees through ``kubectl port-forward pod/<pod> 9464``: the verdict per model and per temperature
bucket with the numbers behind it, acceptance, P10/P50/P90 of per-request acceptance, TTFT and TPOT, KV
usage, and links to ``/metrics`` and the runbooks. It refreshes itself (``<meta http-equiv="refresh">``), has
no scripts and loads nothing from anywhere else.

It is computed from the sources' snapshots, the same ones ``/metrics`` renders, through the same
``assess`` the collector calls: no I/O, no round trip through the registry. Verdicts, acceptance and the
distributions are over ``--verdict-window`` (the tap's windows; the header says how much of it the history
really spans). The rows are built by ``export/view.py``'s functions, which ``top`` uses too.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import TYPE_CHECKING

from aiohttp import web

from sidecar import __version__
from sidecar.config import Settings, format_duration
from sidecar.decision import Verdict
from sidecar.export.assessment import assess
from sidecar.export.view import ModelRow, Row, View, millis, number, percent, speedup, view_from_snapshots
from sidecar.tap.windows import TapHealth
from sidecar.upstream.monitor import MonitorState

if TYPE_CHECKING:
    from sidecar.calibration import Calibration

# Same base as the alerts' runbook_url annotations (alerts/alerts.yaml).
RUNBOOK_BASE = "https://github.com/specdec-sidecar/specdec-sidecar/blob/main/docs/runbooks.md"
REFRESH_SECONDS = 10

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


def percent1(value: float | None) -> str:
    """A percentage with one decimal: the page has room for it."""
    return percent(value, 1)


def reason(row: ModelRow | Row, settings: Settings, source: str, break_even: float | None) -> str:
    """Why the verdict is what it is, in the decision framework's words, with the numbers."""
    window = format_duration(settings.verdict_window)
    verdict, acceptance = row.verdict, row.acceptance
    if verdict == Verdict.INSUFFICIENT_DATA or acceptance is None:
        return f"fewer than {settings.min_drafts} draft steps in the last {window}: no verdict yet"
    if source == "measure" and row.modelled_speedup is not None:
        band = settings.band
        where = (f"acceptance {percent1(acceptance)} against a calibrated break-even of {percent1(break_even)} at "
                 f"the current load: modelled speed-up {speedup(row.modelled_speedup)}")
        if verdict == Verdict.DISABLE:
            return f"{where}, below {1 - band:.2f}x: the drafts cost more than they save; turn speculation off here"
        if verdict == Verdict.NEAR_BREAK_EVEN:
            return f"{where}, within {band:.0%} of 1x: roughly a wash"
        return f"{where}, at least {1 + band:.2f}x: speculation pays for itself"
    be, upper = settings.break_even, settings.near_break_even_upper
    if verdict == Verdict.DISABLE:
        return (f"acceptance {percent1(acceptance)} is below break-even {percent1(be)} (default, uncalibrated): the "
                f"draft's verify work likely costs more than it saves; calibrate with `measure` to be sure")
    if verdict == Verdict.NEAR_BREAK_EVEN:
        return (f"acceptance {percent1(acceptance)} is between break-even {percent1(be)} and {percent1(upper)} "
                "(default, uncalibrated): roughly a wash, net-negative under more load")
    return f"acceptance {percent1(acceptance)} is at or above {percent1(upper)} (default, uncalibrated): speculation pays"


def _badge(verdict: str, anchor: str | None, runbook_base: str) -> str:
    text = html.escape(VERDICT_TEXT.get(verdict, verdict))
    badge = f'<span class="v v-{html.escape(verdict)}">{text}</span>'
    if anchor:
        badge += f' <a href="{html.escape(runbook_base)}#{anchor}">runbook</a>'
    return badge


def render_page(view: View, settings: Settings, runbook_base: str = RUNBOOK_BASE) -> str:
    """The whole page as a string (pure: the view in, HTML out)."""
    window = format_duration(settings.verdict_window)
    esc = html.escape
    spread = (f"the last {view.span:.0f} s (all the history there is so far)" if view.span < settings.verdict_window
              else f"the last {window}")
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>specdec-sidecar: speculative decoding status</title>",
        f"<style>{CSS}</style></head><body>",
        "<h1>Speculative decoding: is it paying off?</h1>",
        f'<p class="meta">specdec-sidecar {esc(__version__)} · upstream {esc(settings.upstream)} · '
        f"verdicts over {window}: calibrated models by their modelled speed-up (1 ± {settings.band:g}), others by "
        f"acceptance (break-even {percent1(settings.break_even)}, near-break-even up to "
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

    sources = {m.model: (m.source, m.break_even) for m in view.models}
    out.append(f"<h2>By model (vLLM's counters, {window})</h2>")
    out.append('<table id="models"><thead><tr><th class="l">model</th><th class="l">verdict</th>'
               '<th class="l">why</th><th class="l">thresholds</th><th>acceptance</th><th>break-even now</th>'
               "<th>modelled speed-up</th><th>mean acceptance length</th><th>KV usage</th>"
               "<th>running</th><th>waiting</th></tr></thead><tbody>")
    for m in view.models:
        out.append(
            f'<tr data-model="{esc(m.model)}" data-verdict="{esc(m.verdict)}" data-source="{esc(m.source)}">'
            f'<td class="l">{esc(m.model)}</td>'
            f'<td class="l verdict">{_badge(m.verdict, MODEL_RUNBOOK.get(m.verdict), runbook_base)}</td>'
            f'<td class="why">{esc(reason(m, settings, m.source, m.break_even))}</td>'
            f'<td class="l source">{"calibrated (measure)" if m.source == "measure" else "default"}</td>'
            f'<td class="acceptance">{percent1(m.acceptance)}</td><td class="break-even">{percent1(m.break_even)}</td>'
            f'<td class="speedup">{speedup(m.modelled_speedup)}</td><td>{number(m.mean_length)}</td>'
            f"<td>{percent1(m.kv_usage)}</td><td>{number(m.running, '{:.0f}')}</td><td>{number(m.waiting, '{:.0f}')}</td>"
            "</tr>"
        )
    if not view.models:
        out.append('<tr><td class="l" colspan="11">No traffic</td></tr>')
    out.append("</tbody></table>")

    out.append(f"<h2>By model and temperature bucket (the request tap)</h2>"
               f'<p class="meta" id="spread">Verdict, acceptance, requests, P10/P50/P90 of per-request acceptance, '
               f"TTFT and TPOT over {spread}.</p>")
    out.append('<table id="buckets"><thead><tr><th class="l">model</th><th class="l">temperature</th>'
               '<th class="l">verdict</th><th class="l">why</th><th>acceptance</th><th>modelled speed-up</th>'
               "<th>requests</th><th>P10</th><th>P50</th><th>P90</th><th>TTFT P50</th><th>TTFT P99</th>"
               "<th>TPOT P50</th><th>TPOT P99</th></tr></thead><tbody>")
    for r in view.buckets:
        source, break_even = sources.get(r.model, ("measure" if r.modelled_speedup is not None else "default", None))
        if r.break_even is not None:  # the bucket's own, from the costs measured at its temperatures
            break_even = r.break_even
        out.append(
            f'<tr data-model="{esc(r.model)}" data-bucket="{esc(r.bucket)}" data-verdict="{esc(r.verdict)}">'
            f'<td class="l">{esc(r.model)}</td><td class="l">{esc(r.bucket)}</td>'
            f'<td class="l verdict">{_badge(r.verdict, BUCKET_RUNBOOK.get(r.verdict), runbook_base)}</td>'
            f'<td class="why">{esc(reason(r, settings, source, break_even))}</td>'
            f'<td class="acceptance">{percent1(r.acceptance)}</td><td class="speedup">{speedup(r.modelled_speedup)}</td>'
            f'<td class="requests">{r.requests:.0f}</td>'
            f'<td class="p10">{percent1(r.p10)}</td><td class="p50">{percent1(r.p50)}</td><td class="p90">{percent1(r.p90)}</td>'
            f'<td class="ttft-p50">{millis(r.ttft_p50)}</td><td>{millis(r.ttft_p99)}</td>'
            f'<td class="tpot-p50">{millis(r.tpot_p50)}</td><td>{millis(r.tpot_p99)}</td></tr>'
        )
    if not view.buckets:
        out.append('<tr><td class="l" colspan="14">No traffic through the proxy yet</td></tr>')
    out.append("</tbody></table>")
    for model, advice in sorted(view.schedules.items()):
        out.append(f'<h2>Recommended k schedule for {esc(model)}</h2><p class="meta">vLLM\'s '
                   f'<code>--speculative-config \'{{"num_speculative_tokens_per_batch_size": '
                   f'<span class="schedule" data-model="{esc(model)}">{esc(advice.json)}</span>}}\'</code>: '
                   "the best k per calibrated load level for the acceptance seen live at that load (the "
                   "calibration's own where too few drafts ran at it).</p>")
        out.append('<table class="levels"><thead><tr><th>running requests from</th><th>draft cost c</th>'
                   '<th>live acceptance</th><th>best k</th><th class="l">from</th></tr></thead><tbody>')
        for level in advice.levels:
            out.append(f"<tr><td>{level.concurrency:g}</td><td>{level.draft_cost:.3f}</td>"
                       f"<td>{percent1(level.acceptance)}</td><td>{level.best_k}</td>"
                       f'<td class="l">{esc(level.source)}</td></tr>')
        out.append("</tbody></table>")
    out.append("</body></html>\n")
    return "".join(out)


class StatusPage:
    """Serves ``/`` from the sources' snapshots (the same getters the collector reads)."""

    def __init__(
        self,
        settings: Settings,
        get_state: Callable[[], MonitorState],
        get_tap: Callable[[], TapHealth | None],
        get_calibration: Callable[[], Calibration | None],
        runbook_base: str = RUNBOOK_BASE,
    ) -> None:
        self._settings = settings
        self._get_state = get_state
        self._get_tap = get_tap
        self._get_calibration = get_calibration
        self._runbook_base = runbook_base

    def page(self) -> str:
        state, tap = self._get_state(), self._get_tap()
        assessment = assess(state, tap, self._get_calibration(), self._settings)
        view = view_from_snapshots(state, tap, assessment, self._settings)
        return render_page(view, self._settings, self._runbook_base)

    async def handle(self, request: web.Request) -> web.Response:
        return web.Response(text=self.page(), content_type="text/html", charset="utf-8",
                            headers={"Cache-Control": "no-store"})
