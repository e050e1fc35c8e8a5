"""Derivation: vLLM's own definitions, windows, counter resets, absent-not-zero, verdicts."""

from types import MappingProxyType

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sidecar.config import build_settings
from sidecar.export.assessment import assess
from sidecar.upstream.derive import advance, base_point, derive
from sidecar.upstream.monitor import MonitorState
from sidecar.decision import Verdict, decide
from sidecar.upstream.vllm_metrics import EngineSample, VllmSnapshot


def snap(**engines: dict) -> VllmSnapshot:
    """snap(**{"m/0": dict(drafts=..., ...)}) -> snapshot keyed (model, engine)."""
    out = {}
    for key, fields in engines.items():
        model, engine = key.split("/")
        fields = dict(fields)
        if "pos" in fields:
            fields["accepted_per_position"] = MappingProxyType(dict(enumerate(fields.pop("pos"))))
        out[(model, engine)] = EngineSample(**fields)
    return VllmSnapshot(engines=MappingProxyType(out))


def history(*snapshots, step=5.0):
    points = []
    for i, s in enumerate(snapshots):
        points.append(advance(points[-1] if points else None, i * step, s))
    return points


def verdict_of(health, model="m", min_drafts=1, window=10.0):
    """The model's verdict as the sidecar judges it: the assessment over the upstream snapshot."""
    settings = build_settings(windows=[window], verdict_window=window, scrape_interval=1, min_drafts=min_drafts)
    return assess(MonitorState(up=True, health=health), None, None, settings).models[model].verdict


def run(points, windows=(10.0,), min_drafts=1, **kw):
    return derive(
        points, windows, min_drafts=min_drafts, **kw
    )


def c(drafts, draft_tokens, accepted, generated, pos=None, **extra):
    fields = dict(drafts=drafts, draft_tokens=draft_tokens, accepted_tokens=accepted, generation_tokens=generated)
    if pos is not None:
        fields["pos"] = pos
    fields.update(extra)
    return fields


def test_vllm_definitions_over_a_window():
    points = history(
        snap(**{"m/0": c(100, 400, 200, 1000, pos=[80, 60, 40, 20])}),
        snap(**{"m/0": c(150, 600, 290, 1300, pos=[120, 85, 55, 30])}),
        snap(**{"m/0": c(200, 800, 380, 1600, pos=[160, 110, 70, 40])}),
    )
    health = run(points)
    w = health.models["m"].windows[10.0]
    assert w.span == 10.0
    assert w.acceptance_rate == pytest.approx(180 / 400)
    assert w.mean_acceptance_length == pytest.approx(1 + 180 / 100)
    assert dict(w.position_acceptance) == pytest.approx({0: 0.8, 1: 0.5, 2: 0.3, 3: 0.2})
    assert w.accepted_token_ratio == pytest.approx(180 / 600)
    assert w.draft_tokens_per_second == pytest.approx(40.0)
    assert w.accepted_tokens_per_second == pytest.approx(18.0)
    assert w.wasted_draft_tokens_per_second == pytest.approx(22.0)
    assert verdict_of(health) is Verdict.DISABLE


def test_model_sums_engines_token_weighted_not_average_of_ratios():
    points = history(
        snap(**{"m/0": c(0, 0, 0, 0), "m/1": c(0, 0, 0, 0)}),
        snap(**{"m/0": c(100, 400, 400, 500), "m/1": c(10, 40, 0, 40)}),
    )
    health = run(points, windows=(5.0,))
    assert health.engines[("m", "0")].windows[5.0].acceptance_rate == 1.0
    assert health.engines[("m", "1")].windows[5.0].acceptance_rate == 0.0
    assert health.models["m"].windows[5.0].acceptance_rate == pytest.approx(400 / 440)


def test_restart_counts_from_zero_instead_of_going_negative():
    points = history(
        snap(**{"m/0": c(1000, 4000, 3000, 9000)}),
        snap(**{"m/0": c(1100, 4400, 3300, 9500)}),
        # vLLM restarted: every counter starts again from zero
        snap(**{"m/0": c(50, 200, 60, 300)}),
    )
    assert points[-1].resets == 1
    w = run(points).models["m"].windows[10.0]
    assert w.draft_tokens == 400 + 200
    assert w.accepted_tokens == 300 + 60
    assert w.acceptance_rate == pytest.approx(360 / 600)


def test_restart_detected_when_only_some_counters_went_down():
    # Accepted fell (reset) while draft tokens happened to climb past their old value: still one restart.
    points = history(snap(**{"m/0": c(10, 100, 90, 200)}), snap(**{"m/0": c(40, 150, 80, 300)}))
    w = run(points, windows=(5.0,)).models["m"].windows[5.0]
    assert w.draft_tokens == 150 and w.accepted_tokens == 80
    assert 0 <= w.acceptance_rate <= 1


def test_too_few_drafts_gives_absent_acceptance_and_insufficient_data():
    points = history(snap(**{"m/0": c(0, 0, 0, 0)}), snap(**{"m/0": c(5, 20, 20, 30)}))
    health = run(points, windows=(5.0,), min_drafts=10)
    w = health.models["m"].windows[5.0]
    assert w.acceptance_rate is None and w.mean_acceptance_length is None and not w.position_acceptance
    assert w.draft_tokens_per_second == 4.0  # throughput is still known
    assert verdict_of(health, min_drafts=10, window=5.0) is Verdict.INSUFFICIENT_DATA


def test_single_point_has_no_windows():
    health = run(history(snap(**{"m/0": c(5, 20, 20, 30)})))
    assert health.models["m"].windows == {}
    assert verdict_of(health) is Verdict.INSUFFICIENT_DATA


def test_partial_window_uses_oldest_point_and_reports_its_span():
    points = history(*[snap(**{"m/0": c(i * 10, i * 40, i * 30, i * 50)}) for i in range(4)])
    health = run(points, windows=(60.0,))
    assert health.spans[60.0] == 15.0
    assert health.models["m"].windows[60.0].acceptance_rate == 0.75


def test_base_point_picks_newest_point_at_least_a_window_old():
    points = history(*[snap(**{"m/0": c(i, i, i, i)}) for i in range(10)])  # t = 0..45
    assert base_point(points, 20.0, tolerance=2.5).t == 25.0
    assert base_point(points, 20.0, tolerance=0).t == 25.0
    assert base_point(points, 22.0, tolerance=0).t == 20.0


def test_new_engine_and_new_position_start_at_zero():
    points = history(
        snap(**{"m/0": c(10, 40, 20, 50, pos=[10, 10])}),
        snap(**{"m/0": c(20, 80, 40, 100, pos=[20, 20]), "m/1": c(500, 2000, 1000, 3000)}),
        snap(**{"m/0": c(30, 120, 60, 150, pos=[30, 30]), "m/1": c(510, 2040, 1030, 3050)}),
    )
    w = run(points).models["m"].windows[10.0]
    assert w.draft_tokens == 80 + 40  # engine 1 contributes only what it did while watched
    assert w.accepted_tokens == 40 + 30


def test_kv_pressure_model_takes_fullest_engine_and_sums_queues():
    engines = {
        "m/0": dict(kv_usage=0.2, running=3, waiting=0, kv_capacity_tokens=1000, kv_capacity_bytes=4096),
        "m/1": dict(kv_usage=0.9, running=5, waiting=2, kv_capacity_tokens=1000, kv_capacity_bytes=4096),
    }
    p = run(history(snap(**engines))).models["m"].pressure
    assert (p.kv_usage, p.running, p.waiting, p.kv_capacity_tokens, p.kv_capacity_bytes) == (0.9, 8, 2, 2000, 8192)


def test_v0_gpu_cache_usage_is_read_as_kv_usage():
    p = run(history(snap(**{"m/0": dict(kv_usage_v0=0.4)}))).models["m"].pressure
    assert p.kv_usage == 0.4


def test_v0_without_draft_step_counter_gates_on_draft_tokens():
    points = history(
        snap(**{"m/0": dict(draft_tokens=0, accepted_tokens=0, emitted_tokens=0)}),
        snap(**{"m/0": dict(draft_tokens=400, accepted_tokens=300, emitted_tokens=380)}),
    )
    w = run(points, windows=(5.0,), min_drafts=100).models["m"].windows[5.0]
    assert w.acceptance_rate == 0.75
    assert w.mean_acceptance_length is None  # needs the draft-step counter V0 does not have


@pytest.mark.parametrize(
    ("acceptance", "verdict"),
    [(None, "insufficient_data"), (0.0, "disable"), (0.4999, "disable"), (0.5, "near_break_even"),
     (0.6499, "near_break_even"), (0.65, "use"), (1.0, "use"), (float("nan"), "insufficient_data")],
)
def test_decision_framework_edges(acceptance, verdict):
    assert decide(acceptance, 0.5, 0.65).value == verdict


# --- properties -------------------------------------------------------------------------------------

counter_step = st.one_of(
    st.integers(0, 500).map(lambda d: ("inc", d)),
    st.just(("reset", 0)),
    st.integers(0, 50).map(lambda v: ("reset", v)),
)


@st.composite
def histories(draw):
    n = draw(st.integers(2, 25))
    engines = draw(st.integers(1, 3))
    fields = ("drafts", "draft_tokens", "accepted_tokens", "generation_tokens", "preemptions")
    state = {(e, f): 0.0 for e in range(engines) for f in fields}
    pos_state = {(e, p): 0.0 for e in range(engines) for p in range(3)}
    snaps = []
    for _ in range(n):
        engines_now = {}
        for e in range(engines):
            for key in [k for k in state if k[0] == e] + [k for k in pos_state if k[0] == e]:
                kind, amount = draw(counter_step)
                table = state if key in state else pos_state
                table[key] = table[key] + amount if kind == "inc" else float(amount)
            fields_now = {f: state[(e, f)] for f in fields}
            fields_now["pos"] = [pos_state[(e, p)] for p in range(3)]
            engines_now[f"m/{e}"] = fields_now
        snaps.append(snap(**engines_now))
    gaps = draw(st.lists(st.floats(0.5, 30), min_size=n, max_size=n))
    return snaps, gaps


@given(histories())
@settings(max_examples=300, deadline=None)
def test_rates_stay_in_range_and_throughput_non_negative(data):
    snaps, gaps = data
    points, t = [], 0.0
    for s, gap in zip(snaps, gaps):
        t += gap
        points.append(advance(points[-1] if points else None, t, s))
        health = run(points, windows=(10.0, 60.0, 600.0))
        groups = list(health.models.values()) + list(health.engines.values())
        for group in groups:
            for w in group.windows.values():
                for ratio in (w.acceptance_rate, w.accepted_token_ratio, *w.position_acceptance.values()):
                    assert ratio is None or 0.0 <= ratio <= 1.0
                if w.mean_acceptance_length is not None:
                    assert 1.0 <= w.mean_acceptance_length <= 1.0 + 3
                for rate in (w.draft_tokens_per_second, w.accepted_tokens_per_second,
                             w.wasted_draft_tokens_per_second, w.preemptions_per_second):
                    assert rate is None or rate >= 0.0
                for delta in (w.drafts, w.draft_tokens, w.accepted_tokens, w.generation_tokens):
                    assert delta is None or delta >= 0.0
        for engine in points[-1].engines.values():
            assert all(v >= 0 for v in (*engine.totals.named.values(), *engine.totals.positions.values()))


@given(st.lists(st.integers(0, 1000), min_size=2, max_size=30), st.integers(1, 29))
def test_monotone_history_window_delta_is_exact(increments, reset_at):
    # With one restart at a known point, the adjusted total equals the sum of true increments.
    raw, truth, snaps = 0, 0, []
    for i, inc in enumerate(increments):
        if i == reset_at:
            assume(inc < raw)  # a restart is only visible when the counter went down
            raw = inc  # restarted, then counted `inc` since
        else:
            raw += inc
        if i > 0:
            truth += inc
        snaps.append(snap(**{"m/0": c(raw, raw, 0, raw)}))
    points = history(*snaps)
    w = run(points, windows=(1e6,)).models["m"].windows[1e6]
    assert w.draft_tokens == truth


# --- gaps: a counter or an engine missing from a poll is not a restart ----------------------------------


def test_counter_missing_from_one_poll_keeps_acceptance_and_verdict():
    full = c(100, 400, 300, 1000, pos=[90, 80, 70, 60])
    lacking = {k: v for k, v in c(150, 600, 450, 1500, pos=[135, 120, 105, 90]).items() if k != "accepted_tokens"}
    points = history(
        snap(**{"m/0": full}),
        snap(**{"m/0": lacking}),  # accepted_tokens missing from this page only
        snap(**{"m/0": c(200, 800, 600, 2000, pos=[180, 160, 140, 120])}),
    )
    assert points[1].resets == 0 and points[2].resets == 0
    health = run(points, windows=(10.0,))
    w = health.models["m"].windows[10.0]
    assert w.acceptance_rate == pytest.approx(300 / 400)
    assert verdict_of(health) is Verdict.USE
    # The re-exported total is what vLLM really counted since the first poll.
    assert health.totals["m"].named["accepted_tokens"] == 300
    # The poll that lacked a counter is held back whole: no ratio mixes a fresh count with a stale one.
    mid = run(points[:2], windows=(10.0,))
    assert mid.totals["m"].named == {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0, "generation_tokens": 0}
    assert mid.models["m"].windows[10.0].acceptance_rate is None  # nothing new to judge, never a 0


def test_counter_gone_for_good_does_not_freeze_the_engine():
    polls = [c(100, 400, 300, 1000)] + [
        {"drafts": 100 + 10 * i, "draft_tokens": 400 + 40 * i, "generation_tokens": 1000 + 100 * i} for i in range(1, 7)
    ]
    points = history(*(snap(**{"m/0": p}) for p in polls))
    totals = run(points, windows=(1e6,)).totals["m"].named
    assert totals["accepted_tokens"] == 0  # carried, never lowered
    # Three polls were held back, then the engine moved on without the lost counter; nothing was lost.
    assert totals["draft_tokens"] == 240
    assert [e.gap_polls for p in points for e in p.engines.values()] == [0, 1, 2, 3, 3, 3, 3]


def test_engine_missing_from_a_poll_never_lowers_model_totals():
    points = history(
        snap(**{"m/0": c(100, 400, 200, 1000), "m/1": c(100, 400, 200, 1000)}),
        snap(**{"m/0": c(200, 800, 400, 2000), "m/1": c(200, 800, 400, 2000)}),
        snap(**{"m/0": c(300, 1200, 600, 3000)}),  # engine 1 vanished from this page
        snap(**{"m/0": c(400, 1600, 800, 4000), "m/1": c(300, 1200, 600, 3000)}),  # back, still counting
    )
    seen = []
    for i in range(1, len(points) + 1):
        health = run(points[:i], windows=(100.0,))
        seen.append(health.totals["m"].named["accepted_tokens"])
        if i == 3:
            assert set(health.engines) == {("m", "0")}  # no per-engine series for the vanished engine
    assert seen == sorted(seen)
    assert seen[-1] == (800 - 200) + (600 - 200)
    assert all(p.resets == 0 for p in points)


def test_real_restart_after_a_gap_is_still_a_restart():
    points = history(
        snap(**{"m/0": c(100, 400, 200, 1000)}),
        snap(**{"m/0": {"drafts": 150, "draft_tokens": 600, "generation_tokens": 1500}}),
        snap(**{"m/0": c(10, 40, 20, 100)}),  # vLLM restarted meanwhile
    )
    assert points[2].resets == 1
    health = run(points, windows=(100.0,))
    assert health.totals["m"].named["accepted_tokens"] == 20
    assert health.totals["m"].named["draft_tokens"] == 200 + 40


@given(st.lists(st.tuples(st.integers(0, 50), st.booleans(), st.booleans()), min_size=2, max_size=25))
@settings(max_examples=200, deadline=None)
def test_totals_never_go_down_with_random_gaps(steps):
    raw, first, snaps = 0, None, []
    for inc, drop_counter, drop_engine in steps:
        raw += inc
        engines = {"m/1": c(raw, raw, raw, raw)}
        if not drop_engine:
            fields = c(raw, raw, raw, raw)
            if drop_counter:
                del fields["accepted_tokens"]
            engines["m/0"] = fields
        snaps.append(snap(**engines))
    points = history(*snaps)
    previous = {}
    for i in range(1, len(points) + 1):
        totals = run(points[:i], windows=(1e6,)).totals["m"].named
        for name, value in totals.items():
            assert value >= previous.get(name, 0.0), name
        previous = dict(totals)
    assert all(p.resets == 0 for p in points)


def test_window_load_is_the_load_the_windows_drafts_ran_at():
    """The calibrated break-even is read at the running requests the verdict window's drafts ran at, weighted
    by draft tokens: one poll's running requests (0 between two polls of busy clients) would move it."""
    from sidecar.upstream.derive import window_load
    from sidecar.upstream.vllm_metrics import read_vllm_metrics

    def page(running: int, drafted: int, accepted: int) -> str:
        return (f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}\n'
                f'vllm:spec_decode_num_draft_tokens_total{{engine="0",model_name="m"}} {drafted}\n'
                f'vllm:spec_decode_num_accepted_tokens_total{{engine="0",model_name="m"}} {accepted}\n'
                f'vllm:spec_decode_num_drafts_total{{engine="0",model_name="m"}} {drafted // 4}\n')

    points, previous = [], None
    # 100 s at 4 running drafting 400 tokens per poll, then a poll at 1 running with 100 more, then 0 running
    for t, (running, drafted) in enumerate([(4, 0), (4, 400), (4, 800), (1, 900), (0, 900)]):
        previous = advance(previous, float(t * 10), read_vllm_metrics(page(running, drafted, drafted // 2)))
        points.append(previous)
    assert window_load(points, 0.0)["m"] == pytest.approx((4 * 800 + 1 * 100) / 900)
    assert window_load(points, 25.0)["m"] == pytest.approx(1.0)  # only the interval ending at t=30 drafted
    assert window_load(points, 35.0) == {}  # no drafts in the window: no load from it
