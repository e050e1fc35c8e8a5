"""The one verdict: thresholds from a calibration at the current load, or the configured defaults."""

import math
from types import MappingProxyType

import pytest

from sidecar.calibration import Calibration, Level, ModelCalibration, TemperatureCost
from sidecar.config import build_settings
from sidecar.decision import (
    Verdict,
    calibrated_thresholds,
    default_thresholds,
    judge,
    modelled_speedup,
    speculative_speedup,
)
from sidecar.export.assessment import assess
from sidecar.tap.windows import BucketCounts, TapHealth
from sidecar.upstream.derive import GroupHealth, Health, Pressure, WindowStats
from sidecar.upstream.monitor import MonitorState

WINDOW = 60.0


def settings(**kw):
    return build_settings(windows=[WINDOW], verdict_window=WINDOW, scrape_interval=5, min_drafts=10, **kw)


def level(concurrency, cost, best_k=2):
    return Level(concurrency, cost, max(0.0, cost - 0.01), cost + 0.01, min(1.0, cost), best_k)


def calibration(model="m", levels=(level(1, 0.12),), k=4):
    return Calibration({model: ModelCalibration(model, "ngram", k, tuple(levels), "0.32.0", "2026-12-04T19:00:00Z")})


def stats(accepted, drafted, steps):
    return WindowStats(window=WINDOW, span=WINDOW, drafts=steps, draft_tokens=drafted, accepted_tokens=accepted,
                       generation_tokens=None, preemptions=None, enough_drafts=True,
                       acceptance_rate=accepted / drafted)


def upstream(model="m", accepted=35.0, drafted=100.0, steps=25.0, running=1.0):
    group = GroupHealth(MappingProxyType({WINDOW: stats(accepted, drafted, steps)}),
                        Pressure(0.1, running, 0.0, None, None))
    health = Health(MappingProxyType({model: group}), MappingProxyType({}), MappingProxyType({WINDOW: WINDOW}))
    return MonitorState(up=True, health=health, scrapes=3, load=MappingProxyType({model: running}))


def test_uncalibrated_model_keeps_the_rule_of_thumb():
    result = assess(upstream(accepted=35), None, None, settings())
    assert result.models["m"].verdict is Verdict.DISABLE
    assert result.thresholds["m"].source == "default"
    assert (result.thresholds["m"].break_even, result.thresholds["m"].near_upper) == (0.5, 0.65)
    assert result.models["m"].modelled_speedup is None
    assert result.calibration["m"].source == "default"


def test_acceptance_0_35_is_healthy_when_break_even_is_0_12():
    result = assess(upstream(accepted=35), None, calibration(levels=(level(1, 0.12),)), settings())
    judgement = result.models["m"]
    assert judgement.verdict is Verdict.USE
    assert result.thresholds["m"].break_even == pytest.approx(0.12)
    # k = 4 drafts every step: (1 + 4*0.35) / (1 + 4*0.12)
    assert judgement.modelled_speedup == pytest.approx((1 + 4 * 0.35) / (1 + 4 * 0.12))
    assert judgement.modelled_speedup == pytest.approx(speculative_speedup(0.0, 0, 0) * 2.4 / 1.48)
    assert result.calibration["m"].source == "measure" and result.calibration["m"].k == "4"


def test_acceptance_0_55_is_below_break_even_0_6():
    result = assess(upstream(accepted=55), None, calibration(levels=(level(1, 0.6),)), settings())
    assert result.models["m"].verdict is Verdict.DISABLE  # (1 + 2.2) / (1 + 2.4) = 0.94 < 0.95
    assert result.models["m"].modelled_speedup == pytest.approx(3.2 / 3.4)
    assert result.thresholds["m"].break_even == pytest.approx(0.6)


def test_break_even_follows_the_load_between_levels_and_clamps_at_the_ends():
    cal = calibration(levels=(level(1, 0.1), level(8, 0.5)))
    at = {running: assess(upstream(running=running), None, cal, settings()).thresholds["m"].break_even
          for running in (0, 1, 4.5, 8, 64)}
    assert at == pytest.approx({0: 0.1, 1: 0.1, 4.5: 0.3, 8: 0.5, 64: 0.5})


def test_near_upper_is_where_the_modelled_speedup_reaches_one_plus_band():
    t = calibrated_thresholds(0.2, 4, band=0.05)
    assert (1 + 4 * t.near_upper) / (1 + 4 * 0.2) == pytest.approx(1.05)
    assert (1 + 4 * t.break_even) / (1 + 4 * 0.2) == pytest.approx(1.0)


def test_speedup_crosses_one_exactly_at_acceptance_equal_to_cost():
    for c in (0.0, 0.05, 0.3, 0.9):
        for d in (1.0, 2.5, 4.0):
            steps = 100.0
            drafted = d * steps
            assert modelled_speedup(c * drafted, drafted, steps, c) == pytest.approx(1.0)


@pytest.mark.parametrize(("speedup", "verdict"), [(1.05, "use"), (1.0499, "near_break_even"), (0.95, "near_break_even"),
                                                  (0.9499, "disable")])
def test_band_edges(speedup, verdict):
    # one draft per step, c = 0: the modelled speed-up is 1 + r
    r = speedup - 1.0
    if r < 0:  # below 1 needs a cost: (1 + r') / (1 + c) with r' = 0
        c = 1.0 / speedup - 1.0
        t = calibrated_thresholds(c, 1.0)
        assert judge(0.0, 100.0, 100.0, 1, t).verdict.value == verdict
    else:
        t = calibrated_thresholds(0.0, 1.0)
        assert judge(r * 100.0, 100.0, 100.0, 1, t).verdict.value == verdict


def test_too_few_drafts_is_insufficient_whatever_the_thresholds():
    for t in (default_thresholds(), calibrated_thresholds(0.1, 4)):
        j = judge(3.0, 8.0, 2.0, 10, t)
        assert j.verdict is Verdict.INSUFFICIENT_DATA and j.acceptance is None and j.modelled_speedup is None


def test_buckets_use_their_models_thresholds_and_their_own_drafts_per_step():
    tap = TapHealth(MappingProxyType({WINDOW: MappingProxyType({
        ("m", "0"): BucketCounts(requests=20, accepted=140, drafted=200, steps=50),
        ("m", "0.7-1.0"): BucketCounts(requests=20, accepted=2, drafted=200, steps=50),
        ("other", "0"): BucketCounts(requests=20, accepted=120, drafted=200, steps=50),
        ("m", "unread"): BucketCounts(requests=3),
    })}), MappingProxyType({WINDOW: WINDOW}), judged=frozenset({("m", "0"), ("m", "0.7-1.0"), ("other", "0")}))
    result = assess(upstream(), tap, calibration(levels=(level(1, 0.12),)), settings())
    assert result.buckets[("m", "0")].verdict is Verdict.USE
    assert result.buckets[("m", "0.7-1.0")].verdict is Verdict.DISABLE
    assert result.buckets[("m", "0")].modelled_speedup == pytest.approx((1 + 140 / 50) / (1 + 0.12 * 4))
    assert ("m", "unread") not in result.buckets  # never had vLLM's per-request metrics: no verdict at all
    # a model the calibration does not name keeps the defaults: 0.6 is near break-even
    assert result.buckets[("other", "0")].verdict is Verdict.NEAR_BREAK_EVEN
    assert result.thresholds["other"].source == "default"


def test_a_bucket_with_measured_temperatures_is_judged_by_their_own_costs():
    """The model's c (0.4, the mix measure ran) would call greedy traffic accepting 35% a loss; greedy requests
    alone cost 0.1 per draft token, so they pay. Sampled ones cost 0.9: 60% acceptance does not pay there. A
    bucket without a measured temperature keeps the model's c."""
    temps = (TemperatureCost(0, 0.1, 0.05, 0.15, 0.1), TemperatureCost(1, 0.9, 0.7, 1.2, 0.9))
    cal = calibration(levels=(Level(1, 0.4, 0.3, 0.5, 0.4, 2, temps),))
    tap = TapHealth(MappingProxyType({WINDOW: MappingProxyType({
        ("m", "0"): BucketCounts(requests=20, accepted=70, drafted=200, steps=50),
        ("m", "0.7-1.0"): BucketCounts(requests=20, accepted=120, drafted=200, steps=50),
        ("m", "0.3-0.5"): BucketCounts(requests=20, accepted=70, drafted=200, steps=50),
    })}), MappingProxyType({WINDOW: WINDOW}), judged=frozenset({("m", "0"), ("m", "0.7-1.0"), ("m", "0.3-0.5")}))
    result = assess(upstream(), tap, cal, settings())
    assert result.buckets[("m", "0")].verdict is Verdict.USE
    assert result.buckets[("m", "0")].modelled_speedup == pytest.approx((1 + 70 / 50) / (1 + 0.1 * 4))
    assert result.buckets[("m", "0.7-1.0")].verdict is Verdict.DISABLE
    assert result.buckets[("m", "0.3-0.5")].verdict is Verdict.DISABLE  # 35% against the model's 0.4
    assert result.bucket_thresholds[("m", "0")].break_even == pytest.approx(0.1)
    assert result.bucket_thresholds[("m", "0.7-1.0")].break_even == pytest.approx(0.9)
    assert ("m", "0.3-0.5") not in result.bucket_thresholds
    # the status page's and top's rows carry the bucket's own break-even
    from sidecar.export.view import view_from_snapshots

    rows = {r.bucket: r for r in view_from_snapshots(upstream(), tap, result, settings()).buckets}
    assert rows["0"].break_even == pytest.approx(0.1) and rows["0.3-0.5"].break_even is None


def test_tap_verdicts_keep_the_last_load_while_vllm_is_unreachable():
    tap = TapHealth(MappingProxyType({WINDOW: MappingProxyType({
        ("m", "0"): BucketCounts(requests=20, accepted=30, drafted=200, steps=50)})}), MappingProxyType({}),
        judged=frozenset({("m", "0")}))
    down = MonitorState(up=False, scrapes=9, load=MappingProxyType({"m": 8.0}))
    cal = calibration(levels=(level(1, 0.05), level(8, 0.3)))
    result = assess(down, tap, cal, settings())
    assert "m" not in result.models  # vLLM's series are absent, not frozen
    assert result.thresholds["m"].break_even == pytest.approx(0.3)
    assert result.buckets[("m", "0")].verdict is Verdict.DISABLE  # 0.15 acceptance against 0.3 at load 8
    assert not math.isnan(result.buckets[("m", "0")].modelled_speedup)


def test_live_schedule_takes_each_levels_own_acceptance_and_falls_back_to_the_calibration():
    from sidecar.export.assessment import live_schedule
    from sidecar.upstream.derive import LoadCell

    cal = calibration(levels=(Level(1, 0.02, 0.0, 0.05, 0.02, 2), Level(4, 0.1, 0.05, 0.15, 0.1, 2),
                              Level(16, 0.6, 0.5, 0.7, 0.6, 3)), k=4)
    profile = {
        1: LoadCell(accepted=380, drafted=400, drafts=100),   # load 1-3: nearly every draft accepted
        2: LoadCell(accepted=380, drafted=400, drafts=100),
        6: LoadCell(accepted=10, drafted=400, drafts=100),    # load 4-15: 2.5% accepted at c = 0.1: k=0
        # nothing ran at 16 or more: the calibration's k for that level
    }
    advice = live_schedule(cal.models["m"], profile, min_drafts=50)
    assert [(a.source, a.best_k) for a in advice.levels] == [("live", 4), ("live", 0), ("calibration", 3)]
    assert advice.levels[0].acceptance == pytest.approx(0.95)
    assert advice.entries == ((1, 3, 4), (4, 15, 0), (16, 16, 3))
    assert advice.json == "[[1,3,4],[4,15,0],[16,16,3]]"
    # too few drafts anywhere: the calibration's schedule as measure wrote it
    thin = live_schedule(cal.models["m"], {1: LoadCell(10, 10, 5)}, min_drafts=50)
    assert thin.entries == ((1, 15, 2), (16, 16, 3))


def test_the_modelled_speedup_counts_every_target_pass_not_only_draft_steps():
    """An n-gram drafter proposes nothing on most passes: 25 draft steps among 365 passes. Per draft step the
    model would claim (1 + 35/25) / (1 + 0.12 * 4) = 1.62x; over every pass it is what the drafts can save."""
    state = upstream(accepted=35, drafted=100, steps=25)
    group = state.health.models["m"]
    stats = group.windows[WINDOW]
    from dataclasses import replace as dc_replace

    with_output = dc_replace(stats, generation_tokens=400.0)
    health = dc_replace(state.health, models=MappingProxyType({"m": dc_replace(group, windows=MappingProxyType(
        {WINDOW: with_output}))}))
    result = assess(dc_replace(state, health=health), None, calibration(levels=(level(1, 0.12),)), settings())
    passes = 400 - 35
    assert result.models["m"].modelled_speedup == pytest.approx((1 + 35 / passes) / (1 + 0.12 * 100 / passes))
    assert result.models["m"].verdict is Verdict.USE  # 1.061
    assert result.thresholds["m"].break_even == pytest.approx(0.12)  # r = c whatever the passes
    # the same totals at c = 0.3: below 1 - band
    worse = assess(dc_replace(state, health=health), None, calibration(levels=(level(1, 0.3),)), settings())
    assert worse.models["m"].verdict is Verdict.NEAR_BREAK_EVEN  # (1 + 35/365) / (1 + 30/365) = 1.013


def test_measures_fit_and_the_sidecars_model_are_one_model():
    """fit_draft_cost with the drafts per pass recovers the cost that modelled_speedup then reproduces; a fit
    that assumed k drafts on every pass would call an n-gram drafter's tokens several times cheaper."""
    from sidecar.decision import fit_draft_cost

    c = 0.3
    cells = []
    for accepted, drafted, output in ((45, 64, 96), (3, 40, 96), (60, 120, 96)):
        passes = output - accepted
        s = modelled_speedup(accepted, drafted, passes, c)
        cells.append((output / passes, s, drafted / passes))
    assert fit_draft_cost(cells, 4) == pytest.approx(c)
    assert fit_draft_cost([(e, s) for e, s, _ in cells], 4) < c / 2


def test_top_says_which_verdicts_the_calibration_changed_or_that_none_did():
    from sidecar.export.view import ModelRow, Row, View, calibration_notes

    model = ModelRow("m", acceptance=0.4, verdict="use", source="measure", break_even=0.2, running=4.0,
                     modelled_speedup=1.3)
    greedy = Row("m", "0", acceptance=0.6, verdict="use", modelled_speedup=1.4, break_even=0.1)
    hot = Row("m", "0.7-1.0", acceptance=0.05, verdict="disable", modelled_speedup=0.5, break_even=0.9)
    notes = calibration_notes(View(True, [model], [greedy, hot]))
    assert notes == [
        "m: use by calibration (break-even 20% at its load, modelled 1.30x) where the fixed 50% rule says disable "
        "at 40% acceptance",
        "m 0: use by calibration (break-even 10% at its load, modelled 1.40x) where the fixed 50% rule says "
        "near_break_even at 60% acceptance",
    ]
    # the same verdicts the rule of thumb gives: one line saying so, with the thresholds used
    agreeing = ModelRow("m", acceptance=0.4, verdict="disable", source="measure", break_even=0.78, running=4.0,
                        modelled_speedup=0.6)
    greedy_use = Row("m", "0", acceptance=0.7, verdict="use", modelled_speedup=1.3, break_even=0.4)
    assert calibration_notes(View(True, [agreeing], [greedy_use, hot])) == [
        "m: calibrated (break-even 78% at its load; by temperature 0 40%, 0.7-1.0 90%): every verdict agrees "
        "with the fixed 50% rule here"]
    # uncalibrated models, or nothing judged yet: no line
    assert calibration_notes(View(True, [ModelRow("m", acceptance=0.4, verdict="disable")], [])) == []
    assert calibration_notes(View(True, [ModelRow("m", source="measure", break_even=0.2)], [])) == []
