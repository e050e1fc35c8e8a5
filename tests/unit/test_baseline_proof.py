"""tools/baseline_proof.py's own arithmetic: the rule copies, the load generator's exact quantiles, the comparison
with ``measure`` (the live run itself is tests/live/test_baseline_vllm.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.baseline_proof import client_quantiles, compare, mean_in_flight, rules_copy, seconds_of, tpot_verdict

REPO = Path(__file__).resolve().parents[2]


def test_the_rule_copy_shortens_every_window_and_for_and_changes_only_the_minimum():
    shipped = "\n".join(p.read_text() for p in sorted((REPO / "alerts").glob("*.yaml")))
    copy = rules_copy(shipped, "40s", "2s", 15)
    assert "[5m]" not in copy and "[30m]" not in copy and "[40s]" in copy
    assert "for: 2s" in copy and "for: 15m" not in copy
    assert "vector(15)" in copy and "vector(100)" not in copy
    assert copy.count("\n") == shipped.count("\n")


def test_a_minimum_rule_of_another_shape_is_refused():
    changed = "- record: specdec:baseline_min_requests:threshold\n  expr: vector(100) * 2 + 0\n  labels: {}\n"
    assert rules_copy(changed, "1m", "5s", 20).count("vector(20)") == 1
    with pytest.raises(ValueError, match="changed shape"):
        rules_copy("- record: specdec:baseline_min_requests:threshold\n  expr: scalar(vector(100))\n", "1m", "5s", 20)


@pytest.mark.parametrize(("text", "seconds"), [("60s", 60), ("2m", 120), ("1.5h", 5400), ("250ms", 0.25)])
def test_durations(text, seconds):
    assert seconds_of(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "60", "1m30s", "-5s", "5d"])
def test_a_duration_it_cannot_read_is_an_error(text):
    with pytest.raises(ValueError, match="not a duration"):
        seconds_of(text)


def test_client_quantiles_are_exact_per_bucket_and_arm():
    # the baseline's greedy TPOTs 10..19 ms (median 14.5), the speculative arm's 5..9 ms (median 7): ratio 2.07
    timings = [("baseline", 0.0, 1.0, (10 + i) / 1000) for i in range(10)]
    timings += [("speculative", 0.0, 1.0, (5 + i) / 1000) for i in range(5)]
    timings += [("speculative", 1.0, 1.0, 0.02)]  # hot bucket: one arm only, so no ratio there
    out = client_quantiles(timings, (0.0, 1.0))
    assert out["0"]["baseline_requests"] == 10 and out["0"]["speculative_requests"] == 5
    assert out["0"]["baseline_tpot_p50_s"] == pytest.approx(0.0145)
    assert out["0"]["speculative_tpot_p50_s"] == pytest.approx(0.007)
    assert out["0"]["tpot:p50"] == pytest.approx(14.5 / 7)
    assert out["0.7-1.0"]["baseline_requests"] == 0 and "tpot:p50" not in out["0.7-1.0"]


def _interval(value, low, high):
    return {"value": value, "ci_low": low, "ci_high": high}


@pytest.mark.parametrize(("interval", "verdict"), [
    (_interval(1.4, 1.2, 1.6), "helps"),
    (_interval(0.7, 0.6, 0.8), "hurts"),
    (_interval(1.2, 0.9, 1.5), "neutral"),   # interval holds 1
    (_interval(1.03, 1.01, 1.05), "neutral"),  # excludes 1, inside the band
    (_interval(None, None, None), None),
])
def test_measures_verdict_counts_only_where_its_interval_excludes_one(interval, verdict):
    assert tpot_verdict(interval, 0.05) == verdict


def test_compare_reads_the_live_ratio_beside_measures_point():
    level = {"buckets": {"0": {"tpot:p50": 1.41, "requests_speculative": 203, "requests_baseline": 139},
                         "0.7-1.0": {"tpot:p50": 0.97, "requests_speculative": 100, "requests_baseline": 143}},
             "client": {"0": {"tpot:p50": 1.46}}}
    cells = {("0", 4): {"tpot": _interval(1.52, 1.39, 1.68), "throughput": None, "verdict": "helps", "acceptance": 0.7},
             ("0.7-1.0", 4): {"tpot": _interval(0.68, 0.66, 0.75), "throughput": None, "verdict": "hurts",
                              "acceptance": 0.1},
             ("0", 2): {"tpot": _interval(2.0, 1.8, 2.2), "throughput": None, "verdict": "helps", "acceptance": 0.7}}
    rows = {r["bucket"]: r for r in compare(level, cells, 4, 0.05)}
    assert set(rows) == {"0", "0.7-1.0"}  # only the level's concurrency
    greedy, hot = rows["0"], rows["0.7-1.0"]
    assert greedy["same_verdict"] and greedy["within_25pct"] and greedy["client_tpot_p50_ratio"] == 1.46
    assert hot["live_verdict"] == "neutral" and hot["same_verdict"] is False and hot["within_25pct"] is False
    assert hot["client_tpot_p50_ratio"] is None


def test_mean_in_flight_per_bucket_over_the_buckets_own_time_and_per_model_over_the_window():
    spans = [["baseline", 0.0, 0.0, 10.0],      # greedy, the whole window
             ["baseline", 0.0, 5.0, None],      # greedy, still running at the end: half the window
             ["speculative", 0.0, -5.0, 2.0],   # greedy, began before the window: 2 s of it
             ["speculative", 1.0, 12.0, 20.0],  # after the window: none
             ["speculative", 1.0, 4.0, 6.0],    # sampled, 2 s: the only sampled time in the window
             ["baseline", 1.0, 5.0, 6.0]]
    out = mean_in_flight(spans, 0.0, 10.0)
    # greedy requests ran for the whole 10 s: baseline 15 s of requests, speculative 2 s
    assert out["0"] == pytest.approx({"speculative": 0.2, "baseline": 1.5})
    # sampled ones for 2 s (4-6): speculative 2 s, baseline 1 s of them
    assert out["0.7-1.0"] == pytest.approx({"speculative": 1.0, "baseline": 0.5})
    assert out["model"] == pytest.approx({"speculative": 0.4, "baseline": 1.6})
