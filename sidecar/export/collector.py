"""Renders the sources' latest snapshots as Prometheus metric families on every scrape (no I/O, no mutation).

Two snapshots come in, each published by its own source on its own clock: the upstream's ``MonitorState``
(vLLM's counters, polled) and the tap's ``TapHealth`` (per temperature bucket); the calibration is a third,
optional one. ``export/assessment.py`` turns them into verdicts through ``decision.judge``.

While the upstream is unreachable the series derived from vLLM's counters are not rendered (they vanish
instead of freezing at old values); the tap's per-bucket series and every model's thresholds still are.
Example output::

    specdec_upstream_up 1.0
    specdec_acceptance_rate{model="tiny-target",window="5m"} 0.72
    specdec_mean_acceptance_length{model="tiny-target",window="5m"} 3.88
    specdec_position_acceptance_rate{model="tiny-target",position="0",window="5m"} 0.91
    specdec_verdict{model="tiny-target",verdict="use"} 1.0
    specdec_verdict{model="tiny-target",verdict="disable"} 0.0
    specdec_spec_decode_draft_acceptance_rate{model="tiny-target"} 0.72
    specdec_engine_kv_cache_usage_ratio{engine="0",model="tiny-target"} 0.13
    specdec_break_even_acceptance_rate{model="tiny-target"} 0.12
    specdec_modelled_speedup{model="tiny-target"} 1.9
    specdec_calibration_info{k="4",measured_at="2026-12-04T19:02:11Z",method="ngram",model="tiny-target",source="measure"} 1.0
    specdec_speculation_enabled{model="tiny-target"} 1.0
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sidecar.config import Settings, format_duration
from sidecar.decision import VERDICTS
from sidecar.export.assessment import Assessment, assess
from sidecar.tap.windows import TapHealth
from sidecar.upstream.derive import Counts, GroupHealth, WindowStats
from sidecar.upstream.monitor import MonitorState

if TYPE_CHECKING:
    from sidecar.calibration import Calibration

# (suffix, help, getter) for per-window values; rendered for models and, with an engine label, engines.
WINDOWED: tuple[tuple[str, str, Callable[[WindowStats], float | None]], ...] = (
    (
        "acceptance_rate",
        "Accepted / proposed draft tokens over the window (vLLM's definition). Absent below --min-drafts.",
        lambda w: w.acceptance_rate,
    ),
    (
        "mean_acceptance_length",
        "1 + accepted tokens per draft step over the window: tokens emitted per target forward pass.",
        lambda w: w.mean_acceptance_length,
    ),
    (
        "accepted_token_ratio",
        "Share of generated tokens that came from accepted drafts over the window.",
        lambda w: w.accepted_token_ratio,
    ),
    (
        "draft_tokens_per_second",
        "Draft tokens proposed per second over the window.",
        lambda w: w.draft_tokens_per_second,
    ),
    (
        "accepted_tokens_per_second",
        "Draft tokens accepted per second over the window.",
        lambda w: w.accepted_tokens_per_second,
    ),
    (
        "wasted_draft_tokens_per_second",
        "Draft tokens proposed and rejected per second over the window (verify compute spent for nothing).",
        lambda w: w.wasted_draft_tokens_per_second,
    ),
    (
        "preemptions_per_second",
        "Requests preempted per second over the window (KV cache exhausted).",
        lambda w: w.preemptions_per_second,
    ),
)

COUNTER_EXPORTS = (
    ("drafts", "specdec_drafts", "Draft steps (vllm:spec_decode_num_drafts_total)."),
    ("draft_tokens", "specdec_draft_tokens", "Draft tokens proposed (vllm:spec_decode_num_draft_tokens_total)."),
    ("accepted_tokens", "specdec_accepted_tokens",
     "Draft tokens accepted (vllm:spec_decode_num_accepted_tokens_total)."),
    ("generation_tokens", "specdec_generation_tokens", "Tokens generated (vllm:generation_tokens_total)."),
    ("preemptions", "specdec_preemptions", "Requests preempted (vllm:num_preemptions_total)."),
)

POLL_NOTE = "Derived from the sidecar's own poll of vLLM /metrics every {interval}."


class HealthCollector(Collector):
    """Yields fresh families from the sources' snapshots each time Prometheus (or a test) collects."""

    def __init__(
        self,
        get_state: Callable[[], MonitorState],
        settings: Settings,
        get_tap: Callable[[], TapHealth | None] = lambda: None,
        get_calibration: Callable[[], Calibration | None] = lambda: None,
    ) -> None:
        self._get_state = get_state
        self._get_tap = get_tap
        self._get_calibration = get_calibration
        self._settings = settings
        self._note = " " + POLL_NOTE.format(interval=format_duration(settings.scrape_interval))

    def describe(self) -> list:  # families vary with the upstream; skip the registration-time collect
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        state = self._get_state()
        tap = self._get_tap()
        assessment = assess(state, tap, self._get_calibration(), self._settings)
        up = GaugeMetricFamily(
            "specdec_upstream_up", "1 if the last poll of vLLM /metrics succeeded, else 0."
        )
        up.add_metric([], 1.0 if state.up else 0.0)
        yield up
        yield from self._buckets(tap, assessment)
        yield from self._thresholds(assessment)
        yield self._arm(state)
        if not state.up or state.health is None:
            return
        yield from self._render(state, assessment)

    def _arm(self, state: MonitorState) -> GaugeMetricFamily:
        """Which arm this pod is in for the baseline comparison; kept while vLLM is unreachable (last seen)."""
        family = GaugeMetricFamily(
            "specdec_speculation_enabled",
            "1 if vLLM drafts for this model (speculative arm), 0 if not (baseline arm): detected from whether vLLM "
            f"exports its spec-decode families, or set by --speculative (here: {self._settings.speculative}). The "
            "recording rules join the tap's latency series with this on the pod to compare the arms.",
            labels=["model"],
        )
        for model, speculating in sorted(state.speculating.items()):
            family.add_metric([model], 1.0 if speculating else 0.0)
        return family

    def _thresholds(self, assessment: Assessment) -> Iterator[GaugeMetricFamily]:
        """Each model's thresholds at its current load and where they come from: the rules compare with these."""
        s = self._settings
        break_even = GaugeMetricFamily(
            "specdec_break_even_acceptance_rate",
            "Acceptance rate at which speculation breaks even for the model at its current load: the calibrated "
            "draft cost c (calibration source measure) or --break-even (source default).",
            labels=["model"],
        )
        upper = GaugeMetricFamily(
            "specdec_near_break_even_upper_acceptance_rate",
            f"Acceptance rate where the modelled speed-up reaches 1 + {s.band:g} (calibrated) or "
            "--near-break-even-upper (default): at or above, verdict use.",
            labels=["model"],
        )
        info = GaugeMetricFamily(
            "specdec_calibration_info",
            "Which thresholds the model's verdicts use: source measure (a calibration.json from `specdec-sidecar "
            "measure`, with its method, k and time) or default (the configured thresholds). Value 1.",
            labels=["model", "source", "method", "k", "measured_at"],
        )
        schedule = GaugeMetricFamily(
            "specdec_recommended_schedule_info",
            "Calibrated models: the recommended vLLM num_speculative_tokens_per_batch_size (its JSON in the "
            "schedule label), the best k per calibrated load level for the acceptance seen live at that load "
            "(the calibration's own where the history holds too few drafts there). Value 1.",
            labels=["model", "schedule"],
        )
        for model, advice in sorted(assessment.schedules.items()):
            schedule.add_metric([model, advice.json], 1.0)
        bucket_break_even = GaugeMetricFamily(
            "specdec_bucket_break_even_acceptance_rate",
            "Calibrated models, per temperature bucket whose temperatures the calibration measured a draft cost of "
            "their own for: the break-even acceptance at the current load from those costs (sampling can cost the "
            "speculative server more per pass than greedy decoding). Other buckets use the model's.",
            labels=["model", "temperature_bucket"],
        )
        bucket_upper = GaugeMetricFamily(
            "specdec_bucket_near_break_even_upper_acceptance_rate",
            f"The same buckets: the acceptance rate where the bucket's modelled speed-up reaches 1 + {s.band:g}.",
            labels=["model", "temperature_bucket"],
        )
        for model, t in sorted(assessment.thresholds.items()):
            break_even.add_metric([model], t.break_even)
            upper.add_metric([model], t.near_upper)
            use = assessment.calibration[model]
            info.add_metric([model, use.source, use.method, use.k, use.measured_at], 1.0)
        for (model, bucket), t in sorted(assessment.bucket_thresholds.items()):
            bucket_break_even.add_metric([model, bucket], t.break_even)
            bucket_upper.add_metric([model, bucket], t.near_upper)
        yield break_even
        yield upper
        yield bucket_break_even
        yield bucket_upper
        yield info
        yield schedule

    def _buckets(self, tap: TapHealth | None, assessment: Assessment) -> Iterator[GaugeMetricFamily]:
        """Acceptance and verdict per (model, temperature bucket), as judged from the tap's numbers."""
        s = self._settings
        rate = GaugeMetricFamily(
            "specdec_bucket_acceptance_rate",
            "Accepted / drafted tokens per temperature bucket over the verdict window, summed over the requests "
            "vLLM reported per-request metrics for. Absent below --min-drafts verify steps.",
            labels=["model", "temperature_bucket", "window"],
        )
        verdict = GaugeMetricFamily(
            "specdec_bucket_verdict",
            f"Verdict per model and temperature bucket over the {format_duration(s.verdict_window)} window "
            "(StateSet: 1 for the current state), judged as specdec_verdict with the model's thresholds (with the "
            "bucket's own where specdec_bucket_break_even_acceptance_rate exists).",
            labels=["model", "temperature_bucket", "verdict"],
        )
        speedup = GaugeMetricFamily(
            "specdec_bucket_modelled_speedup",
            f"Modelled speed-up L / (1 + c*d) per model and temperature bucket over the "
            f"{format_duration(s.verdict_window)} window (calibrated models only): L the mean acceptance length, "
            "d the draft tokens per verify step, c the calibrated draft cost at the current load (the bucket's "
            "temperatures' own where the calibration measured them).",
            labels=["model", "temperature_bucket"],
        )
        # Over the verdict window only: 8 series per model instead of 8 per window (docs/scaling.md); any other
        # window is one rate() of the tap's counters away.
        if tap is not None:
            per_key = tap.windows.get(s.verdict_window, {})
            for (model, bucket), counts in per_key.items():
                value = counts.acceptance_rate(s.min_drafts)
                if value is not None:
                    rate.add_metric([model, bucket, format_duration(s.verdict_window)], value)
        for (model, bucket), judgement in sorted(assessment.buckets.items()):
            for state_name in VERDICTS:
                verdict.add_metric([model, bucket, state_name.value], 1.0 if state_name is judgement.verdict else 0.0)
            if judgement.modelled_speedup is not None:
                speedup.add_metric([model, bucket], judgement.modelled_speedup)
        yield rate
        yield verdict
        yield speedup

    def _render(self, state: MonitorState, assessment: Assessment) -> Iterator[GaugeMetricFamily]:
        health = state.health
        assert health is not None
        note = self._note

        coverage = GaugeMetricFamily(
            "specdec_window_span_seconds",
            "Seconds of history each window really covers (shorter than the window just after start)." + note,
            labels=["window"],
        )
        for window, span in sorted(health.spans.items()):
            coverage.add_metric([format_duration(window)], span)
        yield coverage

        # Per engine only where a model runs on several (data-parallel ranks): with one engine every
        # specdec_engine_* series would repeat its model's exactly (38 series of the budget, docs/scaling.md).
        engines_of = Counter(model for model, _ in health.engines)
        groups: list[tuple[str, list[str], list[tuple[list[str], GroupHealth]]]] = [
            ("specdec_", ["model"], [([m], g) for m, g in sorted(health.models.items())]),
            (
                "specdec_engine_",
                ["model", "engine"],
                [([m, e], g) for (m, e), g in sorted(health.engines.items()) if engines_of[m] > 1],
            ),
        ]
        for prefix, labels, items in groups:
            scope = "" if prefix == "specdec_" else " Per engine (data-parallel rank)."
            for suffix, text, getter in WINDOWED:
                family = GaugeMetricFamily(prefix + suffix, text + scope + note, labels=[*labels, "window"])
                for label_values, group in items:
                    for window, stats in sorted(group.windows.items()):
                        value = getter(stats)
                        if value is not None:
                            family.add_metric([*label_values, format_duration(window)], value)
                yield family
            positions = GaugeMetricFamily(
                prefix + "position_acceptance_rate",
                "Share of draft steps whose draft token at this position was accepted, over the window."
                + scope
                + note,
                labels=[*labels, "position", "window"],
            )
            for label_values, group in items:
                for window, stats in sorted(group.windows.items()):
                    for pos, rate in stats.position_acceptance.items():
                        positions.add_metric([*label_values, str(pos), format_duration(window)], rate)
            yield positions
            yield from self._pressure(prefix, labels, items, scope)

        yield from self._counters(health.totals)

        verdict = GaugeMetricFamily(
            "specdec_verdict",
            f"Speculative decoding verdict per model over the {format_duration(self._settings.verdict_window)} "
            "window (StateSet: 1 for the current state). Calibrated models: use (modelled speed-up >= 1 + band), "
            "near_break_even (within the band), disable (below 1 - band); others: use (acceptance >= "
            f"{self._settings.near_break_even_upper}), near_break_even (>= {self._settings.break_even}), disable "
            "(below); insufficient_data (too few drafts).",
            labels=["model", "verdict"],
        )
        modelled = GaugeMetricFamily(
            "specdec_modelled_speedup",
            f"Modelled speed-up L / (1 + c*d) per model over the {format_duration(self._settings.verdict_window)} "
            "window (calibrated models only): L the mean acceptance length, d the draft tokens per verify step, c "
            "the calibrated draft cost at the current load (vLLM's running requests).",
            labels=["model"],
        )
        compat = GaugeMetricFamily(
            "specdec_spec_decode_draft_acceptance_rate",
            "Draft acceptance rate per model over the "
            f"{format_duration(self._settings.verdict_window)} window, standing in for vLLM V0's "
            "vllm:spec_decode_draft_acceptance_rate gauge, which the V1 engine no longer exports.",
            labels=["model"],
        )
        for model, judgement in sorted(assessment.models.items()):
            for state_name in VERDICTS:
                verdict.add_metric([model, state_name.value], 1.0 if state_name is judgement.verdict else 0.0)
            if judgement.acceptance is not None:
                compat.add_metric([model], judgement.acceptance)
            if judgement.modelled_speedup is not None:
                modelled.add_metric([model], judgement.modelled_speedup)
        yield verdict
        yield compat
        yield modelled

        upstream_rate = GaugeMetricFamily(
            "specdec_upstream_reported_acceptance_rate",
            "vLLM V0's own vllm:spec_decode_draft_acceptance_rate gauge, passed through (V0 engines only).",
            labels=["model", "engine"],
        )
        upstream_eff = GaugeMetricFamily(
            "specdec_upstream_reported_efficiency",
            "vLLM V0's own vllm:spec_decode_efficiency gauge, passed through (V0 engines only).",
            labels=["model", "engine"],
        )
        for (model, engine), group in sorted(health.engines.items()):
            if group.v0_acceptance_rate is not None:
                upstream_rate.add_metric([model, engine], group.v0_acceptance_rate)
            if group.v0_efficiency is not None:
                upstream_eff.add_metric([model, engine], group.v0_efficiency)
        yield upstream_rate
        yield upstream_eff

    @staticmethod
    def _counters(totals: Mapping[str, Counts]) -> Iterator[CounterMetricFamily]:
        """vLLM's counters per model, summed over engines, counted since the sidecar started and carried
        across vLLM restarts: what fleet-level recording rules ``rate()`` and add up token-weighted."""
        note = (" Summed over engines; counted from the sidecar's start and carried across vLLM restarts "
                "(reset-adjusted), so rate() over it is safe.")
        for field, name, text in COUNTER_EXPORTS:
            family = CounterMetricFamily(name, text + note, labels=["model"])
            for model, counts in sorted(totals.items()):
                if field in counts.named:
                    family.add_metric([model], counts.named[field])
            yield family
        positions = CounterMetricFamily(
            "specdec_accepted_tokens_per_position",
            "vLLM's vllm:spec_decode_num_accepted_tokens_per_pos_total per model." + note,
            labels=["model", "position"],
        )
        for model, counts in sorted(totals.items()):
            for position, value in sorted(counts.positions.items()):
                positions.add_metric([model, str(position)], value)
        yield positions

    def _pressure(
        self, prefix: str, labels: list[str], items: list[tuple[list[str], GroupHealth]], scope: str
    ) -> Iterator[GaugeMetricFamily]:
        model_scope = " For a model: the fullest engine." if prefix == "specdec_" else ""
        specs = (
            ("kv_cache_usage_ratio", "KV cache in use, 0..1, at the last poll." + model_scope, "kv_usage"),
            ("requests_running", "Requests running in the engine at the last poll.", "running"),
            ("requests_waiting", "Requests waiting for a slot at the last poll.", "waiting"),
            (
                "kv_cache_capacity_tokens",
                "KV cache size in tokens (vllm:cache_config_info kv_cache_size_tokens).",
                "kv_capacity_tokens",
            ),
            (
                "kv_cache_capacity_bytes",
                "KV cache size in bytes (vllm:cache_config_info kv_cache_memory_bytes).",
                "kv_capacity_bytes",
            ),
        )
        for suffix, text, attr in specs:
            family = GaugeMetricFamily(prefix + suffix, text + scope, labels=labels)
            for label_values, group in items:
                value = getattr(group.pressure, attr)
                if value is not None:
                    family.add_metric(label_values, value)
            yield family
