"""``measure`` without a real engine: the break-even model, the cell arithmetic, the CLI over recorded streams."""

from __future__ import annotations

import asyncio
import json
import math
from dataclasses import replace
from datetime import datetime

import pytest
from aiohttp import web
from rich.console import Console

from sidecar import cli
from sidecar.buckets import TemperatureBuckets
from sidecar.calibration import load as load_calibration
from sidecar.commands.measure import MeasureSettings, num_spec_tokens, run_measure
from sidecar.commands.measure_prompts import load as load_prompts
from sidecar.commands.measure_stats import (
    BASELINE,
    HELPS,
    HURTS,
    NEUTRAL,
    SPEC,
    Cell,
    Interval,
    RequestRecord,
    Speedup,
    bootstrap_ratio,
    calibrate,
    compare,
    draft_cost_interval,
    fit_model,
    schedule,
    speedup_verdict,
    summarise,
    tokens_per_request_second,
)
from sidecar.decision import (
    alpha_from_mean_acceptance_length,
    best_num_speculative_tokens,
    break_even_acceptance_rate,
    break_even_alpha,
    expected_tokens_per_step,
    fit_draft_cost,
    sample_quantile,
    speculative_speedup,
)
from fakes import FIXTURES, serve_loopback

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- the break-even model -------------------------------------------------------------------------------

def test_expected_tokens_per_step_matches_the_closed_form():
    assert expected_tokens_per_step(0.0, 4) == 1.0
    assert expected_tokens_per_step(1.0, 4) == 5.0
    # 1 + a + a^2 + a^3 + a^4 at a = 0.5
    assert expected_tokens_per_step(0.5, 4) == pytest.approx(1.9375)
    assert expected_tokens_per_step(0.8, 3) == pytest.approx(1 + 0.8 + 0.64 + 0.512)


def test_speedup_and_break_even_agree():
    for k in (1, 3, 4, 8):
        for c in (0.02, 0.1, 0.3, 0.7):
            alpha = break_even_alpha(c, k)
            assert alpha is not None and 0 < alpha < 1
            assert speculative_speedup(alpha, k, c) == pytest.approx(1.0, abs=1e-9)
            assert speculative_speedup(min(1.0, alpha + 0.05), k, c) > 1.0
            assert speculative_speedup(max(0.0, alpha - 0.05), k, c) < 1.0
            # In vLLM's terms (accepted / drafted = (E - 1) / k) the break-even rate is c itself.
            assert (expected_tokens_per_step(alpha, k) - 1) / k == pytest.approx(break_even_acceptance_rate(c))
    assert break_even_alpha(0.0, 4) == 0.0
    assert break_even_alpha(1.0, 4) is None and break_even_acceptance_rate(1.2) is None


def test_alpha_inverts_mean_acceptance_length():
    for alpha in (0.0, 0.1, 0.5, 0.84, 0.99):
        assert alpha_from_mean_acceptance_length(expected_tokens_per_step(alpha, 4), 4) == pytest.approx(alpha, abs=1e-9)
    assert alpha_from_mean_acceptance_length(0.5, 4) == 0.0
    assert alpha_from_mean_acceptance_length(7.0, 4) == 1.0


def test_fit_draft_cost_recovers_c_from_noiseless_cells():
    for c in (0.05, 0.25, 0.6):
        cells = [(expected_tokens_per_step(a, 4), speculative_speedup(a, 4, c)) for a in (0.0, 0.3, 0.8)]
        assert fit_draft_cost(cells, 4) == pytest.approx(c)
    assert fit_draft_cost([], 4) is None
    assert fit_draft_cost([(float("nan"), 1.0)], 4) is None


def test_best_k_is_zero_when_drafts_do_not_pay_and_k_max_when_they_do():
    assert best_num_speculative_tokens(0.95, 0.02, 4) == 4
    assert best_num_speculative_tokens(0.05, 0.3, 4) == 0
    mid = best_num_speculative_tokens(0.6, 0.15, 8)
    assert 0 < mid < 8  # longer drafts stop paying before 8 at this acceptance


def test_sample_quantile_interpolates_like_numpy():
    values = [4.0, 1.0, 3.0, 2.0]
    assert sample_quantile(0.0, values) == 1.0 and sample_quantile(1.0, values) == 4.0
    assert sample_quantile(0.5, values) == 2.5
    assert sample_quantile(0.1, values) == pytest.approx(1.3)
    assert sample_quantile(0.5, []) is None


# --- cells ----------------------------------------------------------------------------------------------

def _record(server=SPEC, accepted=0, drafted=0, steps=1, tokens=10, e2e=1.0, tpot=0.1, k=4, ok=True, **kw):
    return RequestRecord(server=server, temperature=0.0, concurrency=1, round=0, index=0, prompt=0, ok=ok,
                         status=200, ttft_s=0.05, tpot_s=tpot, e2e_s=e2e, output_tokens=tokens,
                         accepted_tokens=accepted, draft_tokens=drafted, spec_steps=steps, num_spec_tokens=k,
                         acceptance_rate=accepted / drafted if drafted else None,
                         acceptance_source="vllm" if drafted else None, **kw)


def test_cell_acceptance_is_token_weighted_not_a_mean_of_ratios():
    cell = Cell(SPEC, 0.0, 1, [_record(accepted=1, drafted=1), _record(accepted=0, drafted=99),
                               _record(ok=False, accepted=50, drafted=50)], wall_seconds=2.0)
    row = summarise(cell, TemperatureBuckets())
    assert row.acceptance_rate == pytest.approx(1 / 100)  # a mean of ratios would say 0.5
    assert (row.accepted_tokens, row.draft_tokens, row.requests, row.errors) == (1, 100, 2, 1)
    assert row.acceptance_p50 == pytest.approx(0.5)
    assert row.acceptance_verdict == "disable"
    assert row.temperature_bucket == "0"
    assert row.output_tokens_per_second == pytest.approx(20 / 2.0)
    assert row.num_spec_tokens == 4


def test_stream_step_estimates_count_accepted_tokens_but_never_the_acceptance_rate():
    estimate = _record(accepted=30, drafted=0, steps=10)
    estimate.draft_tokens, estimate.acceptance_source = None, "stream_steps"
    row = summarise(Cell(SPEC, 0.0, 1, [estimate], 1.0), TemperatureBuckets())
    assert row.acceptance_source == "stream_steps"
    assert row.acceptance_rate is None and row.accepted_tokens == 30
    assert row.mean_acceptance_length == pytest.approx(4.0)
    assert row.acceptance_verdict == "insufficient_data"


def test_a_cell_serialises_to_the_results_json_keys():
    row = summarise(Cell(SPEC, 0.0, 1, [_record(accepted=1, drafted=2)], 1.0), TemperatureBuckets())
    assert list(row.to_json()) == [
        "server", "temperature", "temperature_bucket", "concurrency", "requests", "errors", "output_tokens",
        "wall_seconds", "output_tokens_per_second", "accepted_tokens", "draft_tokens", "spec_steps",
        "acceptance_source", "acceptance_rate", "mean_acceptance_length", "acceptance_verdict", "acceptance_p10",
        "acceptance_p50", "acceptance_p90", "ttft_p50_s", "ttft_p95_s", "ttft_p99_s", "tpot_p50_s", "tpot_p95_s",
        "tpot_p99_s", "e2e_p50_s", "e2e_p95_s", "e2e_p99_s", "num_spec_tokens", "speedup"]
    speedup = Speedup(Interval(2.0, 1.5, 2.5), Interval(1.8, 1.2, 2.2), HELPS)
    assert replace(row, speedup=speedup).to_json()["speedup"] == {
        "tpot": {"value": 2.0, "ci_low": 1.5, "ci_high": 2.5},
        "throughput": {"value": 1.8, "ci_low": 1.2, "ci_high": 2.2}, "verdict": "helps", "basis": "throughput"}


def test_bootstrap_interval_brackets_the_point_and_verdicts_follow_it():
    fast = [_record(e2e=0.5 + 0.01 * i, tpot=0.02) for i in range(20)]
    slow = [_record(server=BASELINE, e2e=1.0 + 0.01 * i, tpot=0.04) for i in range(20)]
    interval = bootstrap_ratio(fast, slow, tokens_per_request_second, resamples=300)
    assert interval.ci_low < interval.value < interval.ci_high
    assert interval.value == pytest.approx(sum(r.e2e_s for r in slow) / sum(r.e2e_s for r in fast))
    assert speedup_verdict(interval, 0.05) == HELPS
    result = compare(Cell(SPEC, 0, 1, fast), Cell(BASELINE, 0, 1, slow), band=0.05, resamples=300)
    assert result.verdict == HELPS and result.tpot.value == pytest.approx(2.0)
    assert compare(Cell(SPEC, 0, 1, slow), Cell(BASELINE, 0, 1, fast), 0.05, 300).verdict == HURTS
    same = compare(Cell(SPEC, 0, 1, fast), Cell(BASELINE, 0, 1, list(fast)), 0.05, 300)
    assert same.verdict == NEUTRAL and same.throughput.ci_low <= 1.0 <= same.throughput.ci_high
    assert speedup_verdict(Interval(1.03, 1.01, 1.05), 0.05) == NEUTRAL  # inside the band


def _cell_row(concurrency, temperature, alpha, c, k=4, tokens=100_000):
    passes = tokens / expected_tokens_per_step(alpha, k)
    s = speculative_speedup(alpha, k, c)
    row = summarise(Cell(SPEC, temperature, concurrency, [_record()]), TemperatureBuckets())
    # a drafter that proposes k tokens on every pass (a draft model): D = k
    return replace(row, output_tokens=tokens, accepted_tokens=tokens - passes, draft_tokens=k * passes,
                   speedup=Speedup(Interval(s, None, None), Interval(s, None, None), HURTS if s < 1 else HELPS))


def test_fit_finds_each_load_levels_cost_break_even_and_schedule():
    costs = {1: 0.05, 4: 0.1, 16: 0.6}
    rows = [_cell_row(cc, t, a, c) for cc, c in costs.items() for t, a in ((0.0, 0.8), (1.0, 0.05))]
    fit = fit_model(rows, 4)
    levels = {lv.concurrency: lv for lv in fit.levels}
    for concurrency, c in costs.items():
        assert levels[concurrency].draft_cost == pytest.approx(c, rel=1e-6)
        assert levels[concurrency].break_even_acceptance_rate == pytest.approx(c, rel=1e-6)
        assert levels[concurrency].break_even_alpha == pytest.approx(break_even_alpha(c, 4), rel=1e-6)
    # The mix (half greedy at 0.8, half at 0.05) pays at low load and stops at 16.
    assert levels[1].pays and not levels[16].pays
    assert fit.stops_paying_at_concurrency == 16
    assert fit.stops_paying_at_concurrency_by_temperature == {"0": 16, "1": 1}
    assert fit.measured_hurts_from_concurrency_by_temperature == {"0": 16, "1": 1}
    value = fit.schedule.value
    assert fit.schedule.key == "num_speculative_tokens_per_batch_size"
    assert fit.to_json()["levels"][0]["per_temperature"][0]["temperature"] == 0.0  # results.json's shape
    # vLLM's rules: inclusive [start, end, k], first start 1, sorted, non-overlapping, k >= 0.
    assert value[0][0] == 1 and value[-1][2] == 0
    for (s1, e1, k1), (s2, e2, k2) in zip(value, value[1:]):
        assert s1 <= e1 < s2 <= e2 and k1 != k2
    assert all(k >= 0 for _, _, k in value)


def test_schedule_merges_equal_neighbours():
    assert schedule([(1, 4), (4, 4), (16, 2)]).value == [[1, 15, 4], [16, 16, 2]]
    assert schedule([(1, None), (4, 3)]).value == [[1, 4, 3]]  # a level without a fit is left out
    assert schedule([(1, None)]) is None


def test_k_comes_from_the_final_usage_chunk():
    assert num_spec_tokens((FIXTURES / "completion-stream.sse").read_bytes()[-4000:]) == 4
    assert num_spec_tokens((FIXTURES / "completion-stream-no-spec-metrics.sse").read_bytes()) is None


def test_prompt_files_are_checked(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "def f("}\n\n{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}\n')
    prompts = load_prompts(str(good))
    assert [p.path for p in prompts] == ["/v1/completions", "/v1/chat/completions"] and prompts[1].max_tokens == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_prompts(str(bad))
    assert len(load_prompts("echo")) >= 3


# --- the command over recorded vLLM streams -------------------------------------------------------------

class RecordedStreams:
    """Loopback server answering every completion with one recorded vLLM stream, event by event."""

    def __init__(self, fixture: str, version: str | None = None, models: tuple[str, ...] = ("tiny-target",),
                 burst: bool = False) -> None:
        self.events = (FIXTURES / fixture).read_bytes().split(b"\n\n")
        self.burst = burst  # the whole stream in one write, as a held-up server or reader receives it
        self.bodies: list[dict] = []
        self.spans: list[tuple[float, float]] = []  # (request read, response ended), event-loop time
        self.version = version  # vLLM's /version answer; None: the route is absent (404)
        self.served = models

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self.bodies.append(await request.json())
        started = asyncio.get_running_loop().time()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        if self.burst:
            await asyncio.sleep(0.02)
            await response.write(b"".join(e + b"\n\n" for e in self.events if e.strip()))
        else:
            for event in self.events:
                if event.strip():
                    await response.write(event + b"\n\n")
                    await asyncio.sleep(0.002)  # one engine step: TPOT is never zero
        await response.write_eof()
        self.spans.append((started, asyncio.get_running_loop().time()))
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.served]})

    async def version_route(self, request: web.Request) -> web.Response:
        if self.version is None:
            raise web.HTTPNotFound()
        return web.json_response({"version": self.version})

    async def __aenter__(self) -> str:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/version", self.version_route)
        self.runner, port = await serve_loopback(app)
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc) -> None:
        await self.runner.cleanup()


def _spec_line(fixture: str) -> dict:
    for event in (FIXTURES / fixture).read_bytes().split(b"\n\n"):
        if b'"speculative_decoding"' in event:
            return json.loads(event.removeprefix(b"data: "))["metrics"]["speculative_decoding"]
    raise AssertionError("no metrics in fixture")


async def _main(*argv: str) -> int:
    # The command runs its own event loop; the loopback servers run on the test's.
    return await asyncio.to_thread(cli.main, list(argv))


async def test_measure_cli_writes_results_requests_and_plots(tmp_path):
    spec_server = RecordedStreams("completion-stream.sse", version="0.32.0")
    base_server = RecordedStreams("completion-stream-no-spec-metrics.sse")
    async with spec_server as spec_url, base_server as base_url:
        out = tmp_path / "out"
        code = await _main("measure", "--url", spec_url, "--baseline-url", base_url, "--temperatures", "0,1",
                           "--concurrency", "1,3", "--requests", "6", "--warmup", "1", "--rounds", "2",
                           "--max-tokens", "24", "--bootstrap", "200", "--out", str(out), "--fail-if-hurts-at", "0",
                           "--method", "ngram", "--settle", "0")
    assert code in (0, 1)  # the gate depends on timing noise between two identical replays; checked below
    results = json.loads((out / "results.json").read_text())
    truth = _spec_line("completion-stream.sse")
    cells = results["cells"]
    assert len(cells) == 2 * 2 * 2
    for cell in cells:
        assert {"server", "temperature", "concurrency", "requests", "accepted_tokens", "draft_tokens",
                "acceptance_rate", "ttft_p50_s", "tpot_p99_s", "speedup"} <= set(cell)
        assert cell["requests"] == 6 and cell["errors"] == 0
        if cell["server"] == SPEC:
            assert cell["acceptance_source"] == "vllm"
            assert cell["accepted_tokens"] == 6 * truth["num_accepted_draft_tokens"]
            assert cell["draft_tokens"] == 6 * truth["num_draft_tokens"]
            assert cell["acceptance_rate"] == pytest.approx(truth["num_accepted_draft_tokens"] / truth["num_draft_tokens"])
            for kind in ("tpot", "throughput"):
                s = cell["speedup"][kind]
                assert s["ci_low"] <= s["value"] <= s["ci_high"]
        else:
            assert cell["speedup"] is None and cell["acceptance_source"] == "stream_steps"
            assert cell["draft_tokens"] == 0 and cell["acceptance_rate"] is None
    assert results["num_spec_tokens"] == 4 and results["break_even_fit"]["k"] == 4
    hurts_at_0 = any(c["speedup"] and c["speedup"]["verdict"] == HURTS and c["temperature"] == 0 for c in cells)
    assert code == (1 if hurts_at_0 else 0)
    lines = (out / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 2 * 2 * 2 * 6  # warm-up requests are not recorded
    assert {json.loads(line)["acceptance_source"] for line in lines} == {"vllm", "stream_steps"}
    for name in ("measure-acceptance.png", "measure-speedup.png"):
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
    # Every request asked for usage in the stream, an explicit temperature and the chosen length.
    sent = spec_server.bodies + base_server.bodies
    # Warm-up: --warmup 1, but at least one request per client (3 at concurrency 3).
    assert len(sent) == 2 * 2 * ((6 + 1) + (6 + 3))
    assert all(b["stream"] is True and b["stream_options"] == {"include_usage": True} and b["max_tokens"] == 24
               and b["temperature"] in (0.0, 1.0) and b["model"] == "tiny-target" for b in sent)
    # A run with a baseline writes a calibration the sidecar accepts, holding the fit of results.json.
    calibration = load_calibration(out / "calibration.json").models["tiny-target"]
    assert (calibration.method, calibration.k, calibration.vllm_version) == ("ngram", 4, "0.32.0")
    assert datetime.fromisoformat(calibration.measured_at).utcoffset().total_seconds() == 0
    fitted = {lv["concurrency"]: lv for lv in results["break_even_fit"]["levels"]}
    assert [lv.concurrency for lv in calibration.levels] == [1.0, 3.0] == sorted(fitted)
    for level in calibration.levels:
        fit = fitted[level.concurrency]
        assert level.draft_cost == pytest.approx(max(0.0, fit["draft_cost"]))
        assert level.draft_cost_low <= level.draft_cost <= level.draft_cost_high
        assert level.break_even == min(1.0, level.draft_cost)
        assert level.best_k == fit["suggested_num_speculative_tokens"]
        own = {e["temperature"]: e["draft_cost"] for e in fit["per_temperature"] if e["draft_cost"] is not None}
        assert {t.temperature: t.draft_cost for t in level.by_temperature} == pytest.approx(
            {t: max(0.0, c) for t, c in own.items()})
    assert any(level.by_temperature for level in calibration.levels)


async def test_a_batch_on_one_server_starts_settle_seconds_after_the_other_servers_last_response(tmp_path):
    """vLLM busy-polls for a second after its last step; two servers sharing CPUs measured back to back billed
    that spin to whichever ran next (on real vLLM: whole batches 0.5-1 s late, speed-ups swinging from 0.15x
    to 2.45x between identical runs). Switching servers waits --settle; batches on the same server do not."""
    spec_server = RecordedStreams("completion-stream.sse", version="0.32.0")
    base_server = RecordedStreams("completion-stream-no-spec-metrics.sse")
    async with spec_server as spec_url, base_server as base_url:
        out = tmp_path / "out"
        code = await _main("measure", "--url", spec_url, "--baseline-url", base_url, "--temperatures", "0",
                           "--concurrency", "2", "--requests", "4", "--warmup", "1", "--rounds", "2",
                           "--bootstrap", "100", "--out", str(out), "--no-plots", "--settle", "0.4")
    assert code in (0, 1)
    assert json.loads((out / "results.json").read_text())["settle_seconds"] == 0.4
    spans = sorted([(a, b, SPEC) for a, b in spec_server.spans] + [(a, b, BASELINE) for a, b in base_server.spans])
    # Batches in order: spec warm-up, baseline warm-up, round 0 spec then baseline, round 1 baseline then spec;
    # each warm-up sends 2 requests (at least one per client), each round 2 per server.
    assert [server for _, _, server in spans] == [SPEC] * 2 + [BASELINE] * 2 + [SPEC] * 2 + [BASELINE] * 4 + [SPEC] * 2
    switches = [i for i in range(1, len(spans)) if spans[i][2] != spans[i - 1][2]]
    assert len(switches) == 4
    for i in switches:
        rest = spans[i][0] - max(end for _, end, server in spans[:i] if server == spans[i - 1][2])
        assert rest >= 0.4
    # Round 0's baseline batch and round 1's (the order flips) run back to back: no rest between them.
    same = spans[8][0] - spans[7][1]
    assert same < 0.4


async def test_a_response_that_arrived_in_one_read_has_no_tpot(tmp_path):
    """Seen on two vLLM servers sharing 2 cores: every baseline request of a cell arrived in one read, their
    TPOT was 0 and the cell's TPOT speed-up divided by 0. No spacing between tokens: no TPOT, and no TPOT
    comparison for the cell; its throughput comparison, which needs none, stays."""
    spec_server = RecordedStreams("completion-stream.sse", version="0.32.0")
    base_server = RecordedStreams("completion-stream-no-spec-metrics.sse", burst=True)
    async with spec_server as spec_url, base_server as base_url:
        out = tmp_path / "out"
        code = await _main("measure", "--url", spec_url, "--baseline-url", base_url, "--temperatures", "0",
                           "--concurrency", "1", "--requests", "4", "--warmup", "0", "--rounds", "1",
                           "--bootstrap", "100", "--out", str(out), "--no-plots", "--method", "ngram", "--settle", "0")
    assert code == 0
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert {r["server"]: r["tpot_s"] is None for r in records} == {SPEC: False, BASELINE: True}
    assert all(r["ttft_s"] > 0 and r["output_tokens"] > 1 for r in records)
    spec_cell = next(c for c in json.loads((out / "results.json").read_text())["cells"] if c["server"] == SPEC)
    assert spec_cell["speedup"]["tpot"]["value"] is None
    assert spec_cell["speedup"]["throughput"]["value"] > 0


async def test_without_a_baseline_no_calibration_and_without_matplotlib_the_results_still(tmp_path):
    """No --baseline-url: nothing to fit c to, so no calibration.json. No matplotlib: the results are written
    and one line says the plots were skipped and how to get them; with --no-plots that line is not needed."""
    async with RecordedStreams("completion-stream.sse", version="0.32.0") as url:
        for no_plots in (False, True):
            out = tmp_path / f"out-{no_plots}"
            settings = MeasureSettings(url=url, temperatures="0", concurrency="1", requests=2, warmup=0, rounds=1,
                                       max_tokens=24, bootstrap=100, out=out, no_plots=no_plots)
            console = Console(record=True, width=200)
            code = await asyncio.to_thread(run_measure, settings, console, None)
            text = console.export_text()
            assert code == 0
            assert sorted(p.name for p in out.iterdir()) == ["requests.jsonl", "results.json"]
            assert json.loads((out / "results.json").read_text())["cells"][0]["requests"] == 2
            assert text.count("plots skipped") == (0 if no_plots else 1)
            if not no_plots:
                assert "pip install 'specdec-sidecar[measure]'" in text and "--no-plots" in text
            assert "calibration" not in text  # no baseline, nothing said about a calibration


async def test_with_a_baseline_but_k_unknown_no_calibration_and_it_says_why(tmp_path):
    """Without vLLM's per-request metrics k is unknown and c cannot be fitted: no calibration.json, one line
    saying why and what to change; a calibration.json an earlier run left is kept and pointed out."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "calibration.json").write_text("{}")
    async with RecordedStreams("completion-stream-no-spec-metrics.sse") as spec, \
            RecordedStreams("completion-stream-no-spec-metrics.sse") as base:
        settings = MeasureSettings(url=spec, baseline_url=base, temperatures="0", concurrency="1", requests=2,
                                   warmup=0, rounds=1, max_tokens=24, bootstrap=100, out=out, no_plots=True)
        console = Console(record=True, width=300)
        assert await asyncio.to_thread(run_measure, settings, console, None) == 0
    text = console.export_text()
    assert "no calibration.json: k is unknown" in text and "--per-request-spec-decode-metrics summary" in text
    assert "calibration.json is from an earlier run; this run wrote none" in text
    assert (out / "calibration.json").read_text() == "{}"


async def test_a_server_that_lists_no_model_cannot_be_measured(tmp_path, capsys):
    async with RecordedStreams("completion-stream.sse", models=()) as url:
        code = await _main("measure", "--url", url, "--out", str(tmp_path / "out"), "--no-plots")
    assert code == 3
    out = capsys.readouterr().out
    assert "/v1/models names no model; pass --model" in out
    assert not (tmp_path / "out").exists()


# --- the draft cost's interval and calibration.json ------------------------------------------------------

def _paired_cells(c: float | dict[float, float], k: int = 4, n: int = 30, seed: int = 1,
                  concurrency: int = 1) -> dict:
    """Paired cells at two temperatures whose TPOTs and request times follow the model for draft cost c (one
    for both, or one per temperature), with +-10% noise."""
    import random

    rng = random.Random(seed)
    cells = {}
    costs = c if isinstance(c, dict) else {0.0: c, 1.0: c}
    for temperature, alpha in ((0.0, 0.8), (1.0, 0.1)):
        e = expected_tokens_per_step(alpha, k)
        c = costs[temperature]
        spec, base = [], []
        for i in range(n):
            base_tpot = 0.02 * (1 + rng.uniform(-0.1, 0.1))
            spec_tpot = 0.02 * (k * c + 1) / e * (1 + rng.uniform(-0.1, 0.1))
            accepted = round(100 - 100 / e)
            # whole requests take their decode time: the throughput speed-up follows the model too
            spec.append(_record(accepted=accepted, drafted=k * (100 - accepted), tokens=100, tpot=spec_tpot,
                                e2e=100 * spec_tpot))
            base.append(_record(server=BASELINE, tokens=100, tpot=base_tpot, k=None, e2e=100 * base_tpot))
        cells[(SPEC, temperature, concurrency)] = Cell(SPEC, temperature, concurrency, spec, 1.0)
        cells[(BASELINE, temperature, concurrency)] = Cell(BASELINE, temperature, concurrency, base, 1.0)
    return cells


def _fit(cells: dict, k: int = 4):
    rows = []
    for (server, temperature, concurrency), cell in cells.items():
        row = summarise(cell, TemperatureBuckets())
        if server == SPEC:
            row = replace(row, speedup=compare(cell, cells[(BASELINE, temperature, concurrency)], 0.05, 200))
        rows.append(row)
    return fit_model(rows, k)


def test_draft_cost_interval_brackets_the_true_cost_and_narrows_with_more_requests():
    widths = []
    for n in (8, 120):
        cells = _paired_cells(0.2, n=n)
        pairs = [(cells[(SPEC, t, 1)], cells[(BASELINE, t, 1)]) for t in (0.0, 1.0)]
        low, high = draft_cost_interval(pairs, 4, resamples=400, seed=3)
        assert low < 0.2 < high
        widths.append(high - low)
    assert widths[1] < widths[0] / 2  # about 1/sqrt(15) as wide with 15x the requests
    assert draft_cost_interval([], 4, resamples=100, seed=0) is None


def test_calibrate_holds_the_fit_and_clamps_a_negative_cost_to_zero():
    cells = _paired_cells(0.2)
    fit = _fit(cells)
    calibration, skipped = calibrate(fit, cells, model="m", method="ngram", vllm_version=None,
                                     measured_at="2026-11-25T15:22:00Z", resamples=200, seed=0)
    [level] = calibration.levels
    assert skipped == [] and level.concurrency == 1.0
    assert level.draft_cost == pytest.approx(fit.levels[0].draft_cost) == pytest.approx(0.2, abs=0.05)
    assert level.draft_cost_low <= level.draft_cost <= level.draft_cost_high and level.break_even == level.draft_cost
    assert level.best_k == fit.levels[0].suggested_num_speculative_tokens
    # Faster than E alone explains (the noise of a tiny draft): the fit says c < 0, the calibration 0.
    cells = _paired_cells(-0.1)
    fit = _fit(cells)
    assert fit.levels[0].draft_cost < 0
    calibration, _ = calibrate(fit, cells, model="m", method="ngram", vllm_version=None,
                               measured_at="2026-11-25T15:22:00Z", resamples=200, seed=0)
    level = calibration.levels[0]
    assert level.draft_cost == 0.0 == level.draft_cost_low == level.break_even and level.draft_cost_high >= 0.0
    assert math.isfinite(level.draft_cost_high)


def test_calibrate_keeps_each_temperatures_own_cost():
    """Sampling costs the speculative server more per pass than greedy decoding (seen on vLLM 0.32's CPU build):
    one c per level fits the mix, and each temperature's own c, with its interval, goes beside it."""
    cells = _paired_cells({0.0: 0.1, 1.0: 0.6}, n=60)
    fit = _fit(cells)
    calibration, skipped = calibrate(fit, cells, model="m", method="ngram", vllm_version=None,
                                     measured_at="2026-11-25T15:22:00Z", resamples=200, seed=0)
    [level] = calibration.levels
    assert skipped == [] and [t.temperature for t in level.by_temperature] == [0.0, 1.0]
    greedy, hot = level.by_temperature
    assert greedy.draft_cost == pytest.approx(0.1, abs=0.03) and hot.draft_cost == pytest.approx(0.6, abs=0.1)
    for own in (greedy, hot):
        assert own.draft_cost_low <= own.draft_cost <= own.draft_cost_high and own.break_even == own.draft_cost
    assert greedy.draft_cost < level.draft_cost < hot.draft_cost
    assert [e.draft_cost for e in fit.levels[0].per_temperature] == pytest.approx([greedy.draft_cost, hot.draft_cost])


@pytest.mark.parametrize(
    "argv, names",
    [
        (["--url", "localhost:8000"], "--url"),
        (["--url", "http://x", "--temperatures", "0,hot"], "--temperatures"),
        (["--url", "http://x", "--concurrency", "0"], "--concurrency"),
        (["--url", "http://x", "--concurrency", "1.5"], "--concurrency"),
        (["--url", "http://x", "--requests", "0"], "--requests"),
        (["--url", "http://x", "--prompts", "nonexistent.jsonl"], "--prompts"),
        (["--url", "http://x", "--fail-if-hurts-at", "0"], "--fail-if-hurts-at"),
        (["--url", "http://x", "--baseline-url", "http://y", "--fail-if-hurts-at", "0.3"], "--fail-if-hurts-at"),
        (["--url", "http://x", "--break-even", "0.9"], "--break-even"),
    ],
)
def test_bad_settings_exit_2_with_one_line_naming_them(argv, names, capsys):
    assert cli.main(["measure", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and names in err[0]


def test_unreachable_server_exits_3(tmp_path, unused_tcp_port):
    code = cli.main(["measure", "--url", f"http://127.0.0.1:{unused_tcp_port}", "--model", "m", "--requests", "1",
                     "--warmup", "0", "--rounds", "1", "--temperatures", "0", "--concurrency", "1",
                     "--out", str(tmp_path), "--no-plots", "--timeout", "5"])
    assert code == 3
    assert json.loads((tmp_path / "results.json").read_text())["cells"][0]["errors"] == 1
