"""Build the Grafana dashboards in ``dashboards/`` from code (Grafana's grafana-foundation-sdk builders).

    python tools/dashboards.py --out dashboards     # write dashboards/*.json (make dashboards)
    python tools/dashboards.py --check              # exit 1 if the committed JSON is stale or a query is wrong

``--check`` fails when the committed JSON differs from what this file builds, when a query names a metric
that nobody defines (a series a sidecar that has seen everything exports, started here on loopback; a
recording rule in alerts/recording-rules.yaml; a vLLM name the sidecar reads; or a Prometheus built-in), when
a rate ignores ``$__rate_interval``, when a division has no ``> 0`` guard on its denominator, or when a panel
misses the datasource variable or a link to an existing runbook section. Queries read the recorded series wherever a recording rule exists; raw series
are queried only where no rule records what the panel needs.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# The classic dashboard JSON (schema v1) is what every Grafana imports through the UI, file provisioning and
# the Helm chart's ConfigMaps; the SDK warns on import that the v2 schema (Grafana 12+) exists.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Prefer using dashboardv2", DeprecationWarning)
    from grafana_foundation_sdk.builders import common as common_b
    from grafana_foundation_sdk.builders import dashboard as dash
    from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, timeseries
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models import common
    from grafana_foundation_sdk.models import dashboard as dm
    from grafana_foundation_sdk.models import heatmap as hm
    from grafana_foundation_sdk.models.prometheus import PromQueryFormat

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "dashboards"
# The alerts' runbook_url base; a dashboard variable, so a fork or a mirror can point it elsewhere.
RUNBOOK_BASE = "https://github.com/specdec-sidecar/specdec-sidecar/blob/main/docs/runbooks.md"
NO_TRAFFIC = "No traffic"
# Panels that read recorded series are empty for two reasons, and say both: without the recording rules
# (the PrometheusRule, or alerts/recording-rules.yaml) nothing is recorded, whatever the traffic. The
# "Recording rules" stat in the health row tells which.
NO_RULES = "No data: install the PrometheusRule (recording rules), or no traffic"
# Recorded series carry names with colons (level:metric:operations); the raw series never do.
RECORDED = re.compile(r"\b[a-z_]+:[a-z0-9_]+:[a-z0-9_]+\b")

DS = common.DataSourceRef(type_val="prometheus", uid="${datasource}")

# Label selectors. Recorded series are aggregated by (namespace, model[, temperature_bucket]): the pod filter
# only applies to the raw per-pod series. `cluster` is matched with =~ like every other label: its "All" is .*,
# which also matches a series without the label, so a Prometheus with no cluster label (one cluster, no
# Thanos, the chart's clusterLabel unset) answers every query as if the selector were not there.
C = 'cluster=~"$cluster"'
N = C + ', namespace=~"$namespace"'
M = N + ', model=~"$model"'
MB = M + ', temperature_bucket=~"$temperature_bucket"'
MP = M + ', pod=~"$pod"'
MBP = MB + ', pod=~"$pod"'
P = N + ', pod=~"$pod"'

# Each model's thresholds as the sidecars export them (calibrated by `measure` at the current load, or their
# configured defaults), weighted by draft tokens across pods in the recording rules; the alerts read the same.
BREAK_EVEN = f"namespace_model:specdec_break_even_acceptance:draft_weighted5m{{{M}}}"
NEAR_UPPER = f"namespace_model:specdec_near_break_even_upper_acceptance:draft_weighted5m{{{M}}}"
BUCKET_BREAK_EVEN = f"namespace_model_temperature_bucket:specdec_break_even_acceptance:draft_weighted5m{{{MB}}}"
GUARD = "specdec:draft_tokens_guard:threshold"

# Verdict codes computed in PromQL from the recorded acceptance and the recorded per-model thresholds, so
# the alerts, the threshold lines and the verdicts move together.
VERDICT_MAPPINGS = [
    dm.ValueMap(options={
        "-1": dm.ValueMappingResult(text="insufficient data (below the traffic guard)", color="text", index=0),
        "0": dm.ValueMappingResult(text="DISABLE: acceptance below break-even", color="red", index=1),
        "1": dm.ValueMappingResult(text="NEAR BREAK-EVEN: roughly a wash", color="orange", index=2),
        "2": dm.ValueMappingResult(text="USE: acceptance above the near-break-even edge", color="green", index=3),
    })
]


def verdict_expr(acceptance: str, draft_rate: str, on: str, break_even: str) -> str:
    """2 use, 1 near break-even, 0 disable, -1 below the traffic guard; absent without drafts ("No traffic").
    *break_even* matches *acceptance* on *on*; the near-break-even edge is the model's."""
    return (
        f"(\n  ({acceptance} >= bool on ({on}) {break_even})\n"
        f"  + ({acceptance} >= bool on (namespace, model) group_left () {NEAR_UPPER})\n)\n"
        f"and on ({on}) ({draft_rate} >= on () group_left () {GUARD})\n"
        f"or on ({on}) (0 * {acceptance} - 1)"
    )


def beside(series: str, threshold: str, on: str = "namespace, model") -> str:
    """A threshold as a column beside each row of ``series`` (tables cannot draw lines): matched on the
    model for per-model thresholds, on nothing (``on=""``) for a fleet-wide constant."""
    return f"0 * {series} + on ({on}) group_left () {threshold}"


# --- runbook sections (anchors of docs/runbooks.md headings) -------------------------------------------------

RUNBOOK = {
    "below": "SpecDecodeAcceptanceBelowBreakEven",
    "near": "SpecDecodeNearBreakEven",
    "bucket": "SpecDecodeTemperatureBucketBelowBreakEven",
    "p10": "SpecDecodeRequestAcceptanceP10Low",
    "tpot": "SpecDecodeTPOTTailWidening",
    "dropped": "SpecDecodeAcceptanceDropped",
    "kv": "SpecDecodeKVCacheSaturated",
    "preempt": "SpecDecodePreemptionsRising",
    "upstream": "SpecDecodeSidecarUpstreamDown",
    "absent": "SpecDecodeSidecarAbsent",
    "starting": "SpecDecodeSidecarUpstreamStarting",
    "proxy_errors": "SpecDecodeProxyErrorRatioHigh",
    "proxy_unreachable": "SpecDecodeProxyUpstreamUnreachable",
    "proxy_latency": "SpecDecodeProxyAddedLatencyHigh",
    "throttled": "SpecDecodeSidecarCPUThrottled",
    "slower": "SpecDecodeSlowerThanBaseline",
    "tail": "SpecDecodeTailRegression",
}


def runbook_links(*keys: str) -> list[dash.DashboardLink]:
    return [
        dash.DashboardLink(f"Runbook: {RUNBOOK[k]}")
        .type(dm.DashboardLinkType.LINK)
        .url("${runbook_base}#" + RUNBOOK[k].lower())
        .target_blank(True)
        for k in keys
    ]


# --- queries and panels ---------------------------------------------------------------------------------------


@dataclass
class Q:
    expr: str
    legend: str = ""
    instant: bool = False
    table: bool = False
    heatmap: bool = False


def target(q: Q, ref: str) -> prometheus.Dataquery:
    t = prometheus.Dataquery().expr(q.expr).ref_id(ref).datasource(DS)
    if q.legend:
        t = t.legend_format(q.legend)
    if q.instant:
        t = t.instant()
    else:
        t = t.range()
    if q.table:
        t = t.format(PromQueryFormat.TABLE)
    elif q.heatmap:
        t = t.format(PromQueryFormat.HEATMAP)
    return t


def with_queries(panel, queries: Iterable[Q]):
    for i, q in enumerate(queries):
        panel = panel.with_target(target(q, chr(ord("A") + i)))
    return panel


def dashed(name: str, color: str) -> tuple[str, list[dm.DynamicConfigValue]]:
    return name, [
        dm.DynamicConfigValue(id_val="color", value={"mode": "fixed", "fixedColor": color}),
        dm.DynamicConfigValue(id_val="custom.lineStyle", value={"fill": "dash", "dash": [10, 10]}),
        dm.DynamicConfigValue(id_val="custom.fillOpacity", value=0),
    ]


def unstacked(style: tuple[str, list[dm.DynamicConfigValue]]) -> tuple[str, list[dm.DynamicConfigValue]]:
    """A line style that stays out of a stacked panel's stack (a threshold drawn over stacked shares)."""
    name, values = style
    return name, [*values, dm.DynamicConfigValue(id_val="custom.stacking", value={"mode": "none", "group": "A"})]


THRESHOLD_LINES = [
    Q(BREAK_EVEN, "{{model}} break-even"),
    Q(NEAR_UPPER, "{{model}} near-break-even upper edge"),
]
THRESHOLD_STYLE = [dashed("/.* break-even$/", "red"), dashed("/.* near-break-even upper edge$/", "orange")]


def no_value(queries: Iterable[Q]) -> str:
    """What an empty panel says: "No traffic", or, when it reads recorded series, that the rules may be missing."""
    return NO_RULES if any(RECORDED.search(q.expr) for q in queries) else NO_TRAFFIC


def ts(title: str, description: str, queries: list[Q], unit: str, runbooks: tuple[str, ...], *,
       w: int = 12, h: int = 8, styles: list | None = None, stack: bool = False, soft_max: float | None = None):
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit(unit)
        .no_value(no_value(queries))
        .span(w)
        .height(h)
        .line_width(2)
        .fill_opacity(8)
        .legend(common_b.VizLegendOptions().display_mode(common.LegendDisplayMode.TABLE)
                .placement(common.LegendPlacement.BOTTOM).show_legend(True).calcs(["lastNotNull", "min", "max"]))
        .tooltip(common_b.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI).sort(common.SortOrder.DESCENDING))
        .links(runbook_links(*runbooks))
    )
    if unit == "percentunit":
        panel = panel.min(0).axis_soft_max(1 if soft_max is None else soft_max)
    if stack:
        panel = panel.stacking(common_b.StackingConfig().mode(common.StackingMode.NORMAL))
    for name, props in styles or []:
        if name.startswith("/"):
            panel = panel.override_by_regexp(name.strip("/"), props)
        else:
            panel = panel.override_by_name(name, props)
    return with_queries(panel, queries)


def table_panel(title: str, description: str, queries: list[Q], runbooks: tuple[str, ...], columns: dict[str, str],
                units: dict[str, str], *, w: int = 12, h: int = 8, verdict_column: str | None = None,
                hidden: tuple[str, ...] = ()):
    """An instant table; ``columns`` renames fields (e.g. ``Value #A``) and fixes their order; ``units`` per
    field (every other column, labels included, is unitless: ``none``)."""
    rename = dict(columns)
    order = {name: i for i, name in enumerate(columns)}
    exclude = {"Time": True, **{h_: True for h_ in hidden}}
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DS)
        .unit("none")
        .no_value(no_value(queries))
        .span(w)
        .height(h)
        .links(runbook_links(*runbooks))
        .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
        .with_transformation(dm.DataTransformerConfig(
            id_val="organize",
            options={"excludeByName": exclude, "indexByName": order, "renameByName": rename},
        ))
    )
    for field, unit in units.items():
        panel = panel.override_by_name(rename.get(field, field), [dm.DynamicConfigValue(id_val="unit", value=unit)])
    if verdict_column:
        panel = panel.mappings(VERDICT_MAPPINGS).override_by_name(verdict_column, [
            dm.DynamicConfigValue(id_val="custom.cellOptions", value={"type": "color-background", "mode": "basic"}),
            dm.DynamicConfigValue(id_val="custom.width", value=330),
        ])
    return with_queries(panel, [Q(q.expr, q.legend, instant=True, table=True) for q in queries])


# --- the dashboard --------------------------------------------------------------------------------------------

ACC = f"namespace_model:specdec_acceptance:ratio_rate5m{{{M}}}"
DRAFT_RATE = f"namespace_model:specdec_draft_tokens:rate5m{{{M}}}"
BACC = f"namespace_model_temperature_bucket:specdec_request_acceptance:ratio_rate5m{{{MB}}}"
BDRAFT_RATE = f"namespace_model_temperature_bucket:specdec_request_draft_tokens:rate5m{{{MB}}}"
BSHARE = f"namespace_model_temperature_bucket:specdec_requests:share_rate5m{{{MB}}}"
TPOT_GAP = f"namespace_model:specdec_request_tpot_seconds:p99_over_p50_rate5m{{{M}}}"


def verdict_row() -> list:
    model_code = verdict_expr(ACC, DRAFT_RATE, "namespace, model", BREAK_EVEN)
    bucket_code = verdict_expr(BACC, BDRAFT_RATE, "namespace, model, temperature_bucket", BUCKET_BREAK_EVEN)
    verdict_stat = with_queries(
        stat.Panel()
        .title("Verdict by model")
        .description(
            "Fleet verdict per model over 5m, from the recorded token-weighted acceptance against the model's "
            "thresholds as its sidecars export them (the draft's calibrated cost at the current load where a "
            "calibration from `measure` is loaded, else the configured 0.5 / 0.65): USE at or above the "
            "near-break-even edge, NEAR BREAK-EVEN from break-even up to it, DISABLE below break-even; "
            "'insufficient data' while proposed draft tokens are under the traffic guard.")
        .datasource(DS)
        .unit("none")
        .no_value(NO_RULES)
        .span(7)
        .height(7)
        .mappings(VERDICT_MAPPINGS)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .graph_mode(common.BigValueGraphMode.NONE)
        .orientation(common.VizOrientation.HORIZONTAL)
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .links(runbook_links("below", "near")),
        [Q(model_code, "{{namespace}} / {{model}}", instant=True)],
    )
    model_table = table_panel(
        "Why: acceptance against the thresholds, by model",
        "One row per model (fleet, 5m): the verdict and what it was decided from. Acceptance is accepted / "
        "proposed draft tokens summed over pods and engines; P10 is the per-request distribution's 10th "
        "percentile (an average can hide a slow tenth); draft tokens/s is compared with the traffic guard.",
        [
            Q(model_code),
            Q(ACC),
            Q(BREAK_EVEN),
            Q(NEAR_UPPER),
            Q(f"namespace_model:specdec_request_acceptance:p10_rate5m{{{M}}}"),
            Q(f"namespace_model:specdec_mean_acceptance_length:ratio_rate5m{{{M}}}"),
            Q(DRAFT_RATE),
            Q(beside(DRAFT_RATE, GUARD, on="")),
        ],
        ("below", "near", "p10"),
        {"namespace": "namespace", "model": "model", "Value #A": "verdict", "Value #B": "acceptance",
         "Value #C": "break-even", "Value #D": "near-break-even edge", "Value #E": "per-request P10",
         "Value #F": "mean acceptance length", "Value #G": "draft tokens/s", "Value #H": "traffic guard"},
        {"Value #B": "percentunit", "Value #C": "percentunit", "Value #D": "percentunit", "Value #E": "percentunit",
         "Value #G": "short", "Value #H": "short"},
        w=17, h=7, verdict_column="verdict",
    )
    bucket_table = table_panel(
        "Verdict by temperature bucket, with its reasons",
        "One row per model and temperature bucket (fleet, 5m, from the request tap's per-request numbers): "
        "the verdict, acceptance against the thresholds, the bucket's share of the model's requests (a "
        "bucket below break-even with 10% or more of the traffic slows every batch it shares), the "
        "per-request P10/P50/P90 and streamed TPOT. Turn speculation off for a DISABLE bucket with a real share.",
        [
            Q(bucket_code),
            Q(BACC),
            Q(BUCKET_BREAK_EVEN),
            Q(beside(BACC, NEAR_UPPER)),
            Q(BSHARE),
            Q(f"namespace_model_temperature_bucket:specdec_request_acceptance:p10_rate5m{{{MB}}}"),
            Q(f"namespace_model_temperature_bucket:specdec_request_acceptance:p50_rate5m{{{MB}}}"),
            Q(f"namespace_model_temperature_bucket:specdec_request_acceptance:p90_rate5m{{{MB}}}"),
            Q(f"namespace_model_temperature_bucket:specdec_request_tpot_seconds:p50_rate5m{{{MB}}}"),
            Q(f"namespace_model_temperature_bucket:specdec_request_tpot_seconds:p99_rate5m{{{MB}}}"),
            Q(BDRAFT_RATE),
        ],
        ("bucket", "p10"),
        {"namespace": "namespace", "model": "model", "temperature_bucket": "temperature bucket",
         "Value #A": "verdict", "Value #B": "acceptance", "Value #C": "break-even",
         "Value #D": "near-break-even edge", "Value #E": "share of requests", "Value #F": "P10", "Value #G": "P50",
         "Value #H": "P90", "Value #I": "TPOT P50", "Value #J": "TPOT P99", "Value #K": "draft tokens/s"},
        {"Value #B": "percentunit", "Value #C": "percentunit", "Value #D": "percentunit", "Value #E": "percentunit",
         "Value #F": "percentunit", "Value #G": "percentunit", "Value #H": "percentunit", "Value #I": "s",
         "Value #J": "s", "Value #K": "short"},
        w=24, h=9, verdict_column="verdict",
    )
    alerts = table_panel(
        "Firing SpecDecode alerts",
        "Alerts from alerts/alerts.yaml firing now (Prometheus's ALERTS series), for the selected namespaces "
        "and models; alerts without a model or namespace label (sidecar health) always show. Each alert "
        "has a runbook section in the panel links.",
        [Q('ALERTS{alertname=~"SpecDecode.*", alertstate="firing", cluster=~"($cluster)|", '
           'namespace=~"($namespace)|", model=~"($model)|"}')],
        tuple(RUNBOOK),
        {"alertname": "alert", "severity": "severity", "namespace": "namespace", "model": "model",
         "temperature_bucket": "temperature bucket"},
        {},
        w=24, h=6,
        hidden=("__name__", "alertstate", "Value", "job", "instance", "pod"),
    )
    return [verdict_stat, model_table, bucket_table, alerts]


def acceptance_row() -> list:
    return [
        ts("Fleet acceptance against break-even",
           "Token-weighted acceptance per model over 5m (namespace_model:specdec_acceptance:ratio_rate5m) with "
           "each model's break-even and near-break-even lines as its sidecars export them (calibrated: the "
           "draft's measured cost at the current load; otherwise 0.5 / 0.65): below the red line speculation "
           "costs more than it saves.",
           [Q(ACC, "{{namespace}} / {{model}}"), *THRESHOLD_LINES], "percentunit", ("below", "near"),
           styles=THRESHOLD_STYLE),
        ts("Acceptance by temperature bucket",
           "Acceptance per temperature bucket from vLLM's per-request numbers (through the tap), with each "
           "model's break-even. No vLLM series carries temperature; this is where a sampled slice shows up "
           "below break-even.",
           [Q(BACC, "{{model}} {{temperature_bucket}}"), *THRESHOLD_LINES], "percentunit", ("bucket",),
           styles=THRESHOLD_STYLE),
        ts("Share of requests by temperature bucket",
           "Each bucket's share of a model's requests over 5m. A bucket below break-even matters once it carries "
           "a meaningful share: the alert needs the dashed line's (10% unless the rules say otherwise).",
           [Q(BSHARE, "{{model}} {{temperature_bucket}}"),
            Q("specdec:bucket_share:threshold", "a bucket alerts from this share")],
           "percentunit", ("bucket",), w=8, stack=True,
           styles=[unstacked(dashed("a bucket alerts from this share", "red"))]),
        ts("Per-request acceptance P10 / P50 / P90",
           "Distribution of per-request acceptance per model (recorded from the tap's histogram). A healthy "
           "token-weighted average can hide a P10 below break-even: a tenth of requests slower with speculation.",
           [Q(f"namespace_model:specdec_request_acceptance:p10_rate5m{{{M}}}", "{{model}} P10"),
            Q(f"namespace_model:specdec_request_acceptance:p50_rate5m{{{M}}}", "{{model}} P50"),
            Q(f"namespace_model:specdec_request_acceptance:p90_rate5m{{{M}}}", "{{model}} P90"),
            THRESHOLD_LINES[0]],
           "percentunit", ("p10",), w=8, styles=THRESHOLD_STYLE[:1]),
        heatmap_panel(),
        ts("Modelled speed-up (calibrated models)",
           "Each sidecar's modelled speed-up L / (1 + c*d) over its verdict window, per model and per "
           "temperature bucket: L tokens per verify step, d draft tokens per step, c the draft's cost per token "
           "measured by `measure` and read at the pod's current load. Above 1 speculation pays; the sidecar "
           "says use above 1 + band and disable below 1 - band. Absent for uncalibrated models.",
           [Q(f"avg by (namespace, model) (specdec_modelled_speedup{{{MP}}})", "{{model}}"),
            Q(f"avg by (namespace, model, temperature_bucket) (specdec_bucket_modelled_speedup{{{MBP}}})",
              "{{model}} {{temperature_bucket}}"),
            Q(f"0 * avg by (namespace, model) (specdec_modelled_speedup{{{MP}}}) + 1", "{{model}} break-even")],
           "x", ("below", "bucket"), w=8, styles=THRESHOLD_STYLE[:1]),
        ts("Mean acceptance length",
           "Tokens emitted per target forward pass: 1 + accepted per draft step. Per model from vLLM's counters "
           "(recorded), per temperature bucket from the tap. Close to 1 means the draft's work is wasted.",
           [Q(f"namespace_model:specdec_mean_acceptance_length:ratio_rate5m{{{M}}}", "{{model}}"),
            Q(f"1 + sum by (namespace, model, temperature_bucket) "
              f"(rate(specdec_request_accepted_tokens_total{{{MBP}}}[$__rate_interval]))\n  /\n"
              f"(sum by (namespace, model, temperature_bucket) "
              f"(rate(specdec_request_spec_steps_total{{{MBP}}}[$__rate_interval])) > 0)",
              "{{model}} {{temperature_bucket}}")],
           "short", ("below",), w=8),
        ts("Acceptance by speculative position",
           "Share of draft steps whose token at each position was accepted. If position 0 is already low the "
           "draft disagrees with the target from the first token (wrong draft, tokenizer or quantization); if "
           "only late positions are low, fewer speculative tokens will do.",
           [Q(f"sum by (namespace, model, position) "
              f"(rate(specdec_accepted_tokens_per_position_total{{{MP}}}[$__rate_interval]))\n"
              f"  / on (namespace, model) group_left ()\n"
              f"(sum by (namespace, model) (rate(specdec_drafts_total{{{MP}}}[$__rate_interval])) > 0)",
              "{{model}} position {{position}}")],
           "percentunit", ("below",), w=8),
        ts("Share of output from drafts",
           "Accepted draft tokens / generated tokens: how much of the output the draft model wrote.",
           [Q(f"sum by (namespace, model) (rate(specdec_accepted_tokens_total{{{MP}}}[$__rate_interval]))\n  /\n"
              f"(sum by (namespace, model) (rate(specdec_generation_tokens_total{{{MP}}}[$__rate_interval])) > 0)",
              "{{model}}")],
           "percentunit", ("below",), w=8),
        ts("Draft tokens per second: proposed, accepted, wasted",
           "Draft tokens proposed and accepted per second (recorded fleet rates) and the difference: verify "
           "compute spent on tokens the target rejected.",
           [Q(DRAFT_RATE, "{{model}} proposed"),
            Q(f"namespace_model:specdec_accepted_tokens:rate5m{{{M}}}", "{{model}} accepted"),
            Q(f"{DRAFT_RATE}\n  - on (namespace, model)\nnamespace_model:specdec_accepted_tokens:rate5m{{{M}}}",
              "{{model}} wasted")],
           "short", ("below",)),
        ts("Acceptance now and a day earlier",
           "Acceptance against its value 24h earlier and the alert's line (specdec:acceptance_drop:threshold, "
           "5 points, below it): a drop means something changed (target, draft, quantization, chat template, "
           "sampling defaults or traffic).",
           [Q(ACC, "{{model}} now"),
            Q(f"{ACC} offset 1d", "{{model}} a day earlier"),
            Q(f"({ACC} offset 1d) - on () group_left () specdec:acceptance_drop:threshold",
              "{{model}} alert below this")],
           "percentunit", ("dropped",), styles=[dashed("/.* alert below this$/", "red")]),
    ]


def heatmap_panel():
    panel = (
        heatmap.Panel()
        .title("Per-request acceptance distribution")
        .description(
            "How many requests fell in each per-request acceptance bucket per interval (the tap's "
            "specdec_request_acceptance_rate histogram). Two bands, one near 0 and one high, are a mixed "
            "workload: find the slice in the temperature panels.")
        .datasource(DS)
        .unit("reqps")
        .no_value(NO_TRAFFIC)
        .span(8)
        .height(8)
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit("percentunit"))
        .color(heatmap.HeatmapColorOptions().mode(hm.HeatmapColorMode.SCHEME).scheme("Oranges")
               .scale(hm.HeatmapColorScale.EXPONENTIAL).exponent(0.5).steps(64).fill("dark-orange").reverse(False))
        .cell_gap(1)
        .links(runbook_links("p10"))
    )
    return with_queries(panel, [Q(
        f"sum by (le) (rate(specdec_request_acceptance_rate_bucket{{{MBP}}}[$__rate_interval]))",
        "{{le}}", heatmap=True)])


def latency_row() -> list:
    def pct(kind: str, title: str, description: str):
        return ts(title, description, [
            Q(f"namespace_model_temperature_bucket:specdec_request_{kind}_seconds:{p}_rate5m{{{MB}}}",
              f"{{{{model}}}} {{{{temperature_bucket}}}} {p.upper()}")
            for p in ("p50", "p95", "p99")
        ], "s", ("tpot", "near"), w=8)

    return [
        pct("ttft", "TTFT P50 / P95 / P99 by temperature bucket",
            "Time to first token of streamed requests as clients see it through the tap, per bucket. The draft "
            "adds prefill work; compare with the same hour a day or a week earlier."),
        pct("tpot", "TPOT P50 / P95 / P99 by temperature bucket",
            "Time per output token of streamed requests per bucket. Where speculation helps TPOT falls; where "
            "acceptance is low it rises above what the target alone would do."),
        ts("TPOT P99/P50 now and a day earlier",
           "The gap between the TPOT tail and median against its value 24h earlier and the alert's line "
           "(specdec:tpot_tail_widening:threshold, 1.5x). Mixed workloads widen it: high-acceptance requests "
           "speed up the median while low-acceptance requests batched with them slow the tail.",
           [Q(TPOT_GAP, "{{model}} now"),
            Q(f"{TPOT_GAP} offset 1d", "{{model}} a day earlier"),
            Q(f"({TPOT_GAP} offset 1d) * on () group_left () specdec:tpot_tail_widening:threshold",
              "{{model}} alert above this")],
           "short", ("tpot",), w=8, styles=[dashed("/.* alert above this$/", "red")]),
    ]


BAND_LINE = "1 - specdec:speedup_band:threshold"


def baseline_row() -> list:
    """Against the baseline arm (docs/baseline.md): replicas without speculation on the same traffic."""
    def ratio(level: str, metric: str, q: str, sel: str) -> str:
        return f"{level}:specdec_speedup_vs_baseline_{metric}:{q}{{{sel}}}"

    bucket = "namespace_model_temperature_bucket"
    requests = f"namespace_model_temperature_bucket_arm:specdec_streamed_requests:increase30m{{{MB}"
    columns = {"model": "model", "temperature_bucket": "temperature bucket", "Value #A": "TPOT P50 speed-up",
               "Value #B": "TPOT P99 speed-up", "Value #C": "TTFT P50 speed-up", "Value #D": "TTFT P99 speed-up",
               "Value #E": "requests (speculative)", "Value #F": "requests (baseline)"}
    return [
        table_panel(
            "Measured speed-up against the baseline arm, per bucket",
            "Baseline / speculative time per output token and time to first token, P50 and P99, over 30m, on "
            "the same traffic (above 1: speculation helps; the same direction as `measure`'s speed-ups). A "
            "ratio exists only where both arms served at least specdec:baseline_min_requests:threshold streamed "
            "requests (100) in the window; the last two columns say how many they did. No rows: no baseline "
            "arm, or too little traffic in one of them.",
            [Q(ratio(bucket, "tpot", "p50", MB)), Q(ratio(bucket, "tpot", "p99", MB)),
             Q(ratio(bucket, "ttft", "p50", MB)), Q(ratio(bucket, "ttft", "p99", MB)),
             Q(f'sum without (arm) ({requests}, arm="speculative"}})'),
             Q(f'sum without (arm) ({requests}, arm="baseline"}})')],
            ("slower", "tail"), columns,
            {"Value #A": "x", "Value #B": "x", "Value #C": "x", "Value #D": "x", "Value #E": "short",
             "Value #F": "short"},
            w=24, hidden=("__name__", "namespace"),
        ),
        ts("TPOT speed-up against the baseline arm: P50 and P99",
           "Baseline / speculative TPOT per bucket and model-wide (above 1 speculation helps). The alert "
           "SpecDecodeSlowerThanBaseline fires below the dashed line on the P50; a P50 above 1 with a P99 below "
           "the line is SpecDecodeTailRegression, the mixed-workload signature.",
           [Q(ratio(bucket, "tpot", "p50", MB), "{{model}} {{temperature_bucket}} P50"),
            Q(ratio(bucket, "tpot", "p99", MB), "{{model}} {{temperature_bucket}} P99"),
            Q(ratio("namespace_model", "tpot", "p50", M), "{{model}} all buckets P50"),
            Q(ratio("namespace_model", "tpot", "p99", M), "{{model}} all buckets P99"),
            Q(BAND_LINE, "slower than the baseline below this")],
           "x", ("slower", "tail"), w=8, styles=[dashed("/.*below this$/", "red")]),
        ts("TTFT speed-up against the baseline arm: P50 and P99",
           "Baseline / speculative time to first token per bucket and model-wide (above 1 speculation helps). "
           "The draft adds prefill and scheduling work, so TTFT often loses a little where TPOT gains.",
           [Q(ratio(bucket, "ttft", "p50", MB), "{{model}} {{temperature_bucket}} P50"),
            Q(ratio(bucket, "ttft", "p99", MB), "{{model}} {{temperature_bucket}} P99"),
            Q(ratio("namespace_model", "ttft", "p50", M), "{{model}} all buckets P50"),
            Q(ratio("namespace_model", "ttft", "p99", M), "{{model}} all buckets P99")],
           "x", ("slower",), w=8),
        ts("Each arm's TPOT and TTFT: P50 and P99",
           "The two sides of every ratio: each arm's own TPOT and TTFT quantiles over the 30m window, per bucket "
           "and model-wide. A ratio that moves because the baseline got slower (load, a noisy neighbour) reads "
           "differently from one that moves because speculation did.",
           [Q(f"namespace_model_temperature_bucket_arm:specdec_request_{kind}_seconds:{p}_rate30m{{{MB}}}",
              f"{{{{model}}}} {{{{temperature_bucket}}}} {{{{arm}}}} {kind.upper()} {p.upper()}")
            for kind in ("tpot", "ttft") for p in ("p50", "p99")]
           + [Q(f"namespace_model_arm:specdec_request_{kind}_seconds:{p}_rate30m{{{M}}}",
                f"{{{{model}}}} {{{{arm}}}} {kind.upper()} {p.upper()}")
              for kind in ("tpot", "ttft") for p in ("p50", "p99")],
           "s", ("slower", "tail"), w=8),
        ts("Requests per arm in the comparison window",
           "Streamed requests with a TPOT each arm served per bucket over the 30m window (and per model, every "
           "bucket together), and the minimum each needs before a ratio is recorded (dashed). A ratio of two "
           "thin arms is noise: docs/baseline.md says how many a bucket needs.",
           [Q(f"namespace_model_temperature_bucket_arm:specdec_streamed_requests:increase30m{{{MB}}}",
              "{{model}} {{temperature_bucket}} {{arm}}"),
            Q(f"namespace_model_arm:specdec_streamed_requests:increase30m{{{M}}}", "{{model}} all buckets {{arm}}"),
            Q("specdec:baseline_min_requests:threshold", "minimum per arm")],
           "short", ("slower",), w=12, styles=[dashed("minimum per arm", "orange")]),
        ts("Load per replica in each arm",
           "vLLM's running requests per replica, averaged over each arm's pods, and the replicas in each arm. "
           "The comparison is fair only while both arms carry about the same load per replica; a Service does "
           "not balance by load.",
           [Q(f"namespace_model_arm:specdec_requests_running:avg{{{M}}}", "{{model}} {{arm}} running per replica"),
            Q(f"namespace_model_arm:specdec_replicas:count{{{M}}}", "{{model}} {{arm}} replicas")],
           "short", ("slower",), w=12),
    ]


def kv_row() -> list:
    return [
        ts("KV cache usage (fullest pod)",
           "KV cache in use on the fullest pod per model. The draft's weights and layers come out of the same "
           "KV budget, so speculation directly reduces how many requests fit. The alert fires above the dashed "
           "line (90% unless the rules say otherwise) with requests waiting.",
           [Q(f"namespace_model:specdec_kv_cache_usage:max{{{M}}}", "{{model}}"),
            Q("specdec:kv_cache_usage:threshold", "alert above this (with requests waiting)")],
           "percentunit", ("kv",), w=5, styles=[dashed("alert above this (with requests waiting)", "red")]),
        ts("Requests running and waiting",
           "Requests waiting for a slot (recorded) and running, summed over pods. KV usage hurts only when work "
           "queues behind it.",
           [Q(f"namespace_model:specdec_requests_waiting:sum{{{M}}}", "{{model}} waiting"),
            Q(f"sum by (namespace, model) (specdec_requests_running{{{MP}}})", "{{model}} running")],
           "short", ("kv",), w=5),
        ts("Preemptions per second",
           "Requests vLLM preempted because the KV cache ran out (recorded fleet rate). Preempted requests are "
           "recomputed, which costs far more than speculation saves. The alert fires above the dashed line.",
           [Q(f"namespace_model:specdec_preemptions:rate5m{{{M}}}", "{{model}}"),
            Q("specdec:preemptions_per_second:threshold", "alert above this")],
           "short", ("preempt",), w=5, styles=[dashed("alert above this", "red")]),
        ts("Generated tokens per second",
           "Tokens vLLM generated per second per model (recorded fleet rate), with the traffic guard of the "
           "KV-cache and preemption alerts: below the dashed line a model counts as idle and neither fires.",
           [Q(f"namespace_model:specdec_generation_tokens:rate5m{{{M}}}", "{{model}}"),
            Q("specdec:generation_tokens_guard:threshold", "alert guard: idle below this")],
           "short", ("kv", "preempt"), w=4, styles=[dashed("alert guard: idle below this", "text")]),
        ts("KV cache capacity per pod",
           "KV cache size in tokens per pod (vLLM's cache_config_info). A draft costs KV twice: its weights "
           "shrink the budget and its layers make every token's KV larger; a step down here after a draft "
           "change is that cost.",
           [Q(f"specdec_kv_cache_capacity_tokens{{{MP}}}", "{{pod}} {{model}}")],
           "short", ("kv",), w=5),
    ]


def health_row() -> list:
    up_mappings = [dm.ValueMap(options={
        "0": dm.ValueMappingResult(text="DOWN", color="red", index=0),
        "1": dm.ValueMappingResult(text="up", color="green", index=1),
    })]
    up = with_queries(
        stat.Panel()
        .title("Sidecars scraped and reading vLLM")
        .description(
            "Per pod: whether Prometheus scrapes the sidecar (up) and whether the sidecar's last poll of vLLM's "
            "/metrics succeeded (specdec_upstream_up). While vLLM is unreachable the sidecar's derived series "
            "are absent, not frozen.")
        .datasource(DS)
        .unit("none")
        .no_value("No sidecar scraped")
        .span(4)
        .height(6)
        .mappings(up_mappings)
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .graph_mode(common.BigValueGraphMode.NONE)
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .links(runbook_links("upstream", "starting", "absent")),
        [Q(f'up{{job="specdec-sidecar", {P}}}', "scrape {{pod}}", instant=True),
         Q(f"specdec_upstream_up{{{P}}}", "vLLM {{pod}}", instant=True)],
    )
    rules = with_queries(
        stat.Panel()
        .title("Recording rules")
        .description(
            "Whether this Prometheus evaluates the project's recording rules (the chart's PrometheusRule, or "
            "alerts/recording-rules.yaml): their constant series specdec:draft_tokens_guard:threshold exists "
            "exactly when they are loaded. Without them every panel on recorded series stays empty whatever the "
            "traffic, and no alert can fire.")
        .datasource(DS)
        .unit("none")
        .no_value("NOT LOADED: install the PrometheusRule")
        .span(4)
        .height(6)
        .mappings([dm.ValueMap(options={"1": dm.ValueMappingResult(text="loaded", color="green", index=0)})])
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .text_mode(common.BigValueTextMode.VALUE)
        .graph_mode(common.BigValueGraphMode.NONE)
        .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .links(runbook_links("absent")),
        [Q("count(specdec:draft_tokens_guard:threshold)", instant=True)],
    )
    return [
        rules,
        up,
        ts("Sidecar polls of vLLM: errors and restarts",
           "Failed polls per second by reason (connect, timeout, http_status, parse) and vLLM restarts seen "
           "(a counter went down).",
           [Q(f"sum by (pod, reason) (rate(specdec_upstream_scrape_errors_total{{{P}}}[$__rate_interval]))",
              "{{pod}} {{reason}}"),
            Q(f"sum by (pod) (rate(specdec_upstream_restarts_total{{{P}}}[$__rate_interval]))",
              "{{pod}} vLLM restarts")],
           "short", ("upstream",), w=8),
        ts("Poll duration P99 and age of the last good poll",
           "How long the sidecar's polls of vLLM take, and seconds since the last one that succeeded.",
           [Q(f"histogram_quantile(0.99, sum by (pod, le) "
              f"(rate(specdec_upstream_scrape_duration_seconds_bucket{{{P}}}[$__rate_interval])))",
              "{{pod}} poll P99"),
            Q(f"time() - specdec_upstream_last_success_timestamp_seconds{{{P}}}", "{{pod}} since last good poll")],
           "s", ("upstream",), w=8),
        ts("Requests whose acceptance could not be attributed",
           "Requests through the tap without per-request acceptance, by reason. no_spec_metrics means vLLM "
           "runs without --per-request-spec-decode-metrics; the per-bucket panels then miss those requests.",
           [Q(f"sum by (reason) (rate(specdec_requests_unattributed_total{{{P}}}[$__rate_interval]))",
              "{{reason}}")],
           "reqps", ("bucket",)),
        table_panel(
            "Each sidecar's own verdict",
            "What each pod's sidecar decides on its own (specdec_verdict, specdec_bucket_verdict) over its "
            "--verdict-window with its own thresholds; the fleet verdicts above are token-weighted across pods.",
            [Q(f"specdec_verdict{{{MP}}} == 1"),
             Q(f"specdec_bucket_verdict{{{MBP}}} == 1")],
            ("below", "bucket"),
            {"pod": "pod", "model": "model", "temperature_bucket": "temperature bucket", "verdict": "verdict"},
            {},
            hidden=("__name__", "Value #A", "Value #B", "job", "instance", "namespace"),
        ),
    ]


def proxy_row() -> list:
    """The proxy's own health (RED): the sidecar sits in the request path, so its errors and its added latency
    are its users'."""
    guard = "specdec:proxy_requests_guard:threshold"
    return [
        ts("Requests through the proxies by status class",
           "Requests per second through the sidecars' proxies on every path (not only the completions the tap "
           "observes), by the status class the clients got (4xx includes clients gone before the answer), and "
           "per pod, with the traffic guard of the proxy alerts.",
           [Q(f"namespace_status_class:specdec_proxy_requests:rate5m{{{N}}}", "{{namespace}} {{status_class}}"),
            Q(f"namespace:specdec_proxy_requests:rate5m{{{N}}}", "{{namespace}} all"),
            Q(f"namespace_pod:specdec_proxy_requests:rate5m{{{P}}}", "{{pod}}"),
            Q(guard, "alert guard: quiet below this")],
           "reqps", ("proxy_errors",), w=8, styles=[dashed("alert guard: quiet below this", "text")]),
        ts("5xx share of proxied requests",
           "Share of the requests through the proxies answered with a 5xx (vLLM's own and the proxy's 502/504), "
           "summed over pods; SpecDecodeProxyErrorRatioHigh pages above the dashed line.",
           [Q(f"namespace:specdec_proxy_requests_5xx:ratio_rate5m{{{N}}}", "{{namespace}}"),
            Q("specdec:proxy_error_ratio:threshold", "alert above this")],
           "percentunit", ("proxy_errors",), w=8, soft_max=0.1, styles=[dashed("alert above this", "red")]),
        ts("The proxy's own failures by reason",
           "What the proxy answered or did itself, per second: connect_refused and upstream_closed are its 502s, "
           "connect_timeout its 504s (vLLM not reachable); upstream_reset responses vLLM broke off mid-body; "
           "buffered_bytes_cap clients that stopped reading, closed at --max-buffered-bytes.",
           [Q(f"namespace_reason:specdec_proxy_errors:rate5m{{{N}}}", "{{namespace}} {{reason}}")],
           "reqps", ("proxy_errors", "proxy_unreachable"), w=8),
        ts("Requests the proxy could not get to vLLM, per pod",
           "Share of each pod's proxied requests answered with the proxy's own 502/504 (vLLM refused, timed out "
           "or closed before answering): one pod's vLLM failing in the request path.",
           [Q(f"namespace_pod:specdec_proxy_upstream_unreachable:ratio_rate5m{{{P}}}", "{{pod}}"),
            Q("specdec:proxy_error_ratio:threshold", "alert above this")],
           "percentunit", ("proxy_unreachable",), w=8, soft_max=0.1, styles=[dashed("alert above this", "orange")]),
        ts("Time spent in the sidecar: P50 and P99",
           "Per request, the sidecar's own time: request received to request written to vLLM, plus vLLM's first "
           "response byte to the response head written to the client (vLLM's own time is not in it).",
           [Q(f"namespace:specdec_proxy_overhead_seconds:p50_rate5m{{{N}}}", "{{namespace}} P50"),
            Q(f"namespace:specdec_proxy_overhead_seconds:p99_rate5m{{{N}}}", "{{namespace}} P99"),
            Q("specdec:proxy_overhead_p99_seconds:threshold", "P99 alert above this")],
           "s", ("proxy_latency",), w=8, styles=[dashed("P99 alert above this", "orange")]),
        ts("Sidecar container CPU throttling",
           "Share of the specdec-sidecar container's CPU periods throttled by its CPU limit (cAdvisor's "
           "container_cpu_cfs_* series, as kube-prometheus-stack scrapes them): a throttled proxy holds every "
           "request it relays.",
           [Q(f"namespace_pod:specdec_sidecar_cpu_throttled_periods:ratio_rate5m{{{P}}}", "{{pod}}"),
            Q("specdec:cpu_throttled_ratio:threshold", "alert above this")],
           "percentunit", ("throttled", "proxy_latency"), w=8, styles=[dashed("alert above this", "orange")]),
    ]


# Firing SpecDecode alerts drawn on every time series (Prometheus's ALERTS series, one annotation per alert
# and label set while it fires), filtered like the panels; alerts without a namespace (sidecar health without
# kube-state-metrics) always show.
ALERT_ANNOTATIONS = ('ALERTS{alertname=~"SpecDecode.*", alertstate="firing", cluster=~"($cluster)|", '
                     'namespace=~"($namespace)|"}')


def build_overview() -> dash.Dashboard:
    builder = (
        dash.Dashboard("Speculative decoding: is it paying off?")
        .uid("specdec-overview")
        .description(
            "specdec-sidecar: the verdict per model and temperature bucket, acceptance against break-even, "
            "latency by bucket, KV pressure, the proxy's own health and sidecar health; firing SpecDecode alerts "
            "are drawn on the time series. Generated by tools/dashboards.py; edit the code, not this JSON.")
        .tags(["specdec", "vllm", "speculative-decoding"])
        .editable()
        .time("now-6h", "now")
        .refresh("30s")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .link(dash.DashboardLink("Runbooks").type(dm.DashboardLinkType.LINK).url("${runbook_base}")
              .target_blank(True).icon("doc"))
        .annotation(
            dash.AnnotationQuery()
            .name("SpecDecode alerts")
            .datasource(DS)
            .enable(True)
            .icon_color("red")
            .expr(ALERT_ANNOTATIONS)
            .step("60s")
            .title_format("{{alertname}}")
            .text_format("{{severity}} {{namespace}} {{model}} {{temperature_bucket}} {{pod}}")
            .tag_keys("alertname,severity,namespace,model")
            .use_value_for_time(False))
        .with_variable(dash.DatasourceVariable("datasource").label("Data source").type("prometheus"))
        .with_variable(query_var("cluster", "Cluster", "label_values(specdec_build_info, cluster)"))
        .with_variable(query_var("namespace", "Namespace", f"label_values(specdec_build_info{{{C}}}, namespace)"))
        .with_variable(query_var("model", "Model", f"label_values(specdec_verdict{{{N}}}, model)"))
        .with_variable(query_var("pod", "Pod", f"label_values(specdec_build_info{{{N}}}, pod)"))
        .with_variable(query_var(
            "temperature_bucket", "Temperature bucket",
            f"label_values(specdec_requests_total{{{M}}}, temperature_bucket)"))
        .with_variable(dash.TextBoxVariable("runbook_base").label("Runbook base URL").default_value(RUNBOOK_BASE)
                       .description("Where docs/runbooks.md is served; panel links append #<alert name>."))
    )
    rows = [
        ("Verdict: keep speculation on?", verdict_row()),
        ("Acceptance against break-even", acceptance_row()),
        ("Latency by temperature bucket (streamed requests)", latency_row()),
        ("Against the baseline arm (replicas without speculation, same traffic)", baseline_row()),
        ("KV pressure", kv_row()),
        ("The proxy's own health (RED)", proxy_row()),
        ("Sidecar and upstream health", health_row()),
    ]
    next_id = 1
    for title, panels in rows:
        builder = builder.with_row(dash.Row(title).id(next_id))
        next_id += 1
        for panel in panels:
            builder = builder.with_panel(panel.id(next_id))
            next_id += 1
    return builder


def query_var(name: str, label: str, query: str) -> dash.QueryVariable:
    return (
        dash.QueryVariable(name)
        .label(label)
        .datasource(DS)
        .query(query)
        .definition(query)
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(dm.VariableOption(selected=True, text="All", value="$__all"))
    )


DASHBOARDS = {"specdec-overview.json": build_overview}


def render(build) -> str:
    return json.dumps(build().build(), cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


# --- checks ---------------------------------------------------------------------------------------------------

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless", "offset",
    "inf", "nan",
}
# Series Prometheus itself defines.
PROMETHEUS_BUILTINS = {"up", "ALERTS", "ALERTS_FOR_STATE"}


@functools.cache
def exported_series_names() -> frozenset[str]:
    """Every series name (``_total``, ``_bucket``, ``_sum``, ``_count`` included) on the page of a sidecar that
    has seen everything it can export (tests/fakes.py's ``fed_sidecar_page``: a loopback upstream replaying
    vLLM, traffic through the tap, a calibration): what the code exports, not what the README says."""
    import asyncio
    import tempfile

    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    from fakes import fed_sidecar_page

    with tempfile.TemporaryDirectory(prefix="dashboards-") as workdir:
        page = asyncio.run(fed_sidecar_page(Path(workdir)))
    return frozenset(line.split("{")[0].split(" ")[0] for line in page.splitlines()
                     if line and not line.startswith("#"))


def defined_metric_names() -> tuple[set[str], set[str]]:
    """(exact names, prefixes) anyone defines: what a fed sidecar exports, the recording rules, what the
    sidecar reads from vLLM, Prometheus's own series."""
    import yaml

    sys.path.insert(0, str(REPO))
    from sidecar.upstream.vllm_metrics import WANTED

    names: set[str] = set(PROMETHEUS_BUILTINS) | set(WANTED) | exported_series_names()
    prefixes: set[str] = set()
    for group in yaml.safe_load((REPO / "alerts" / "recording-rules.yaml").read_text())["groups"]:
        for rule in group["rules"]:
            if "record" in rule:
                names.add(rule["record"])
    return names, prefixes


def metric_names(expr: str) -> set[str]:
    """Series names a PromQL expression selects (functions, keywords, label lists and matchers removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)           # strings
    text = re.sub(r"\{[^}]*\}", "", text)                     # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                    # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\boffset\s+\w+", " ", text)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = m.group(0)
        rest = text[m.end():].lstrip()
        if rest.startswith("(") or word.lower() in PROMQL_KEYWORDS:
            continue
        if m.start() > 0 and (text[m.start() - 1].isdigit() or text[m.start() - 1] in "$."):
            continue  # 1e3, $variables
        names.add(word)
    return names


def unguarded_divisions(expr: str) -> list[str]:
    """Each ``/`` must divide by a parenthesised expression that ends in ``> 0`` (idle -> absent, not NaN)."""
    problems = []
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    for m in re.finditer(r"/", text):
        rest = text[m.end():]
        rest = re.sub(r"^\s*(on|ignoring)\s*\([^)]*\)\s*(group_left|group_right)?\s*(\([^)]*\))?", "", rest)
        rest = rest.lstrip()
        if not rest.startswith("("):
            problems.append(f"division without a guarded denominator: ...{text[m.start():m.start() + 60]!r}")
            continue
        depth = 0
        for i, ch in enumerate(rest):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                inner = rest[1:i].rstrip()
                if not re.search(r">\s*0$", inner):
                    problems.append(f"denominator not guarded with '> 0': ({inner[-60:]})")
                break
    return problems


def panels_of(model: dict) -> Iterator[dict]:
    for panel in model.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def problems_in(model: dict, defined: tuple[set[str], set[str]], runbook_anchors: set[str]) -> list[str]:
    names, prefixes = defined
    problems = []
    variables = {v["name"] for v in model.get("templating", {}).get("list", [])}
    for needed in ("datasource", "cluster", "namespace", "model", "pod", "temperature_bucket", "runbook_base"):
        if needed not in variables:
            problems.append(f"missing variable {needed}")
    ids = [p.get("id") for p in panels_of(model)]
    if len(ids) != len(set(ids)) or None in ids:
        problems.append(f"panel ids not unique: {ids}")
    annotations = [a for a in model.get("annotations", {}).get("list", []) if "expr" in a]
    if not any("ALERTS" in a["expr"] for a in annotations):
        problems.append("no annotation draws the firing SpecDecode alerts (ALERTS)")
    for a in annotations:
        for name in metric_names(a["expr"]):
            if name not in names:
                problems.append(f"annotation {a.get('name')}: metric {name} is not defined anywhere")
    for panel in panels_of(model):
        if panel.get("type") == "row":
            continue
        title = panel.get("title", "?")
        if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{title}: no unit")
        if panel.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"{title}: panel datasource is not the datasource variable")
        links = [link["url"] for link in panel.get("links", [])]
        if not links:
            problems.append(f"{title}: no runbook link")
        for url in links:
            anchor = url.split("#", 1)[-1]
            if not url.startswith("${runbook_base}#") or anchor not in runbook_anchors:
                problems.append(f"{title}: link {url} is not a runbook section")
        for t in panel.get("targets", []):
            expr = t["expr"]
            where = f"{title} [{t['refId']}]"
            if t.get("datasource", {}).get("uid") != "${datasource}":
                problems.append(f"{where}: query datasource is not the datasource variable")
            for name in metric_names(expr):
                if name not in names and not any(name.startswith(p) for p in prefixes):
                    problems.append(f"{where}: metric {name} is not defined anywhere")
            for window in re.findall(r"\[([^\]]+)\]", re.sub(r"\{[^}]*\}", "", expr)):
                if window != "$__rate_interval":
                    problems.append(f"{where}: range [{window}] instead of [$__rate_interval]")
            problems += [f"{where}: {p}" for p in unguarded_divisions(expr)]
            for var in re.findall(r"\$(\w+)", expr):
                if var not in variables and not var.startswith("__"):
                    problems.append(f"{where}: unknown variable ${var}")
    return problems


def runbook_anchors() -> set[str]:
    text = (REPO / "docs" / "runbooks.md").read_text()
    return {h.strip().lower().replace(" ", "-") for h in re.findall(r"^##+ (.+)$", text, re.M)}


def check(out: Path) -> list[str]:
    problems = []
    defined = defined_metric_names()
    anchors = runbook_anchors()
    for name, build in DASHBOARDS.items():
        text = render(build)
        path = out / name
        if not path.exists():
            problems.append(f"{path} is missing: run make dashboards")
        elif path.read_text() != text:
            problems.append(f"{path} differs from what tools/dashboards.py builds: run make dashboards")
        problems += [f"{name}: {p}" for p in problems_in(json.loads(text), defined, anchors)]
    extra = {p.name for p in out.glob("*.json")} - set(DASHBOARDS)
    problems += [f"{out / n} is not built by tools/dashboards.py" for n in sorted(extra)]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="directory of the dashboard JSON (default dashboards/)")
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on any problem")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.out)
        for p in problems:
            print(p, file=sys.stderr)
        return 1 if problems else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, build in DASHBOARDS.items():
        (args.out / name).write_text(render(build))
        print(f"wrote {args.out / name}")
    problems = check(args.out)
    for p in problems:
        print(p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
