"""``specdec-sidecar measure``: does speculative decoding pay off for this workload, at these temperatures and loads?

For every (temperature, concurrency) cell it streams ``--requests`` requests (``stream_options.include_usage``
and an explicit temperature) to the speculative server ``--url`` and, when given, the same number to
``--baseline-url`` (the same model without speculation). The servers take turns in ``--rounds`` rounds per
cell, the order flipping each round, so drift (a warming cache, a neighbour's load) hits both alike.

Per request it reads vLLM's ``metrics.speculative_decoding`` from the final usage chunk (vLLM run with
``--per-request-spec-decode-metrics summary``); without it, the stream-step estimate (accepted = completion
tokens - content chunks, labelled ``stream_steps``), and TTFT, TPOT, e2e, output tokens and errors. It
writes ``results.json``, ``requests.jsonl`` and PNG plots into ``--out``, prints a table, and exits
non-zero as a CI gate when asked (``--fail-if-hurts-at``).

Exit status: 0 done (gate passed); 1 the gate failed; 2 a bad setting; 3 a server could not be measured
(unreachable, or every request of a cell failed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from sidecar import __version__
from sidecar.buckets import TemperatureBuckets
from sidecar.commands import measure_prompts
from sidecar.commands.measure_stats import (
    BASELINE,
    HELPS,
    HURTS,
    SPEC,
    Cell,
    RequestRecord,
    compare,
    fit_model,
    summarise,
)
from sidecar.decision import DEFAULT_BREAK_EVEN, DEFAULT_NEAR_UPPER
from sidecar.tap.observe import Outcome, SseObserver, spec_from_vllm

EXIT_OK, EXIT_GATE, EXIT_BAD_SETTING, EXIT_UNMEASURABLE = 0, 1, 2, 3
TAIL_BYTES = 16384  # the final usage chunk with vLLM's per-request metrics is well under this
VERDICT_STYLE = {HELPS: "green", "neutral": "yellow", HURTS: "bold red"}


class SettingError(ValueError):
    """A bad flag: the message names it."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="base URL of the vLLM server with speculative decoding")
    parser.add_argument("--baseline-url", help="base URL of the same model served without speculative decoding")
    parser.add_argument("--model", help="model name to request (default: the first one --url lists)")
    parser.add_argument("--baseline-model", help="model name on --baseline-url (default: --model)")
    parser.add_argument("--temperatures", default="0,0.4,0.8,1.0", help="comma-separated (default 0,0.4,0.8,1.0)")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=24, help="measured requests per cell and server (default 24)")
    parser.add_argument("--warmup", type=int, default=2, help="unrecorded requests per cell and server first (default 2)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="turns per cell, servers alternating and the order flipping each turn (default 2)")
    parser.add_argument("--max-tokens", type=int, default=128, help="max_tokens of each request (default 128)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="send vLLM's ignore_eos so every completion runs to --max-tokens")
    parser.add_argument("--prompts", default="echo", help="echo, code, chat or a JSONL file (default echo)")
    parser.add_argument("--out", default="measure-out", help="output directory (default ./measure-out)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' to both servers")
    parser.add_argument("--break-even", type=float, default=DEFAULT_BREAK_EVEN,
                        help=f"acceptance below this: verdict disable (default {DEFAULT_BREAK_EVEN})")
    parser.add_argument("--near-break-even-upper", type=float, default=DEFAULT_NEAR_UPPER,
                        help=f"acceptance from --break-even up to this: near_break_even (default {DEFAULT_NEAR_UPPER})")
    parser.add_argument("--neutral-band", type=float, default=0.05,
                        help="a speed-up within 1 +/- this is neutral even when its interval excludes 1 (default 0.05)")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default 0)")
    parser.add_argument("--fail-if-hurts-at", metavar="TEMPERATURES",
                        help="exit 1 if any cell at one of these comma-separated temperatures hurts")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")


def _floats(name: str, text: str, minimum: float = 0.0) -> list[float]:
    try:
        values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise SettingError(f"invalid setting {name}: {text!r} is not a comma-separated list of numbers") from None
    if not values or any(not math.isfinite(v) or v < minimum for v in values):
        raise SettingError(f"invalid setting {name}: {text!r} needs finite numbers >= {minimum:g}")
    return list(dict.fromkeys(values))


@dataclass
class Plan:
    url: str
    baseline_url: str | None
    model: str | None
    baseline_model: str | None
    temperatures: list[float]
    concurrency: list[int]
    requests: int
    warmup: int
    rounds: int
    max_tokens: int
    ignore_eos: bool
    prompts: list[measure_prompts.Prompt]
    prompts_name: str
    out: Path
    timeout: float
    api_key: str | None
    break_even: float
    near_upper: float
    band: float
    bootstrap: int
    seed: int
    gate: list[float]
    plots: bool


def plan_from(args: argparse.Namespace) -> Plan:
    """Validate every flag; raises SettingError naming the first bad one."""
    for name in ("url", "baseline_url"):
        value = getattr(args, name)
        if value is not None and not value.startswith(("http://", "https://")):
            raise SettingError(f"invalid setting --{name.replace('_', '-')}: {value!r} is not an http(s) URL")
    concurrency = _floats("--concurrency", args.concurrency, 1)
    if any(c != int(c) for c in concurrency):
        raise SettingError(f"invalid setting --concurrency: {args.concurrency!r} needs whole numbers")
    for name, minimum in (("requests", 1), ("warmup", 0), ("rounds", 1), ("max_tokens", 2), ("bootstrap", 100)):
        if getattr(args, name) < minimum:
            raise SettingError(f"invalid setting --{name.replace('_', '-')}: must be at least {minimum}")
    if args.rounds > args.requests:
        raise SettingError("invalid setting --rounds: more rounds than --requests")
    if not 0 < args.break_even <= args.near_break_even_upper <= 1:
        raise SettingError("invalid setting --break-even / --near-break-even-upper: need 0 < break-even <= upper <= 1")
    if not 0 <= args.neutral_band < 1:
        raise SettingError("invalid setting --neutral-band: must be in [0, 1)")
    if not args.timeout > 0:
        raise SettingError("invalid setting --timeout: must be positive")
    try:
        prompts = measure_prompts.load(args.prompts)
    except ValueError as error:
        raise SettingError(f"invalid setting --prompts: {error}") from None
    temperatures = _floats("--temperatures", args.temperatures)
    gate = _floats("--fail-if-hurts-at", args.fail_if_hurts_at) if args.fail_if_hurts_at else []
    if gate and not args.baseline_url:
        raise SettingError("invalid setting --fail-if-hurts-at: needs --baseline-url to compare against")
    if missing := [t for t in gate if t not in temperatures]:
        raise SettingError(f"invalid setting --fail-if-hurts-at: {missing[0]:g} is not one of --temperatures")
    return Plan(
        url=args.url.rstrip("/"), baseline_url=args.baseline_url.rstrip("/") if args.baseline_url else None,
        model=args.model, baseline_model=args.baseline_model, temperatures=temperatures,
        concurrency=[int(c) for c in concurrency], requests=args.requests, warmup=args.warmup, rounds=args.rounds,
        max_tokens=args.max_tokens, ignore_eos=args.ignore_eos, prompts=prompts, prompts_name=args.prompts,
        out=Path(args.out), timeout=args.timeout, api_key=args.api_key, break_even=args.break_even,
        near_upper=args.near_break_even_upper, band=args.neutral_band, bootstrap=args.bootstrap, seed=args.seed,
        gate=gate, plots=not args.no_plots,
    )


def num_spec_tokens(tail: bytes) -> int | None:
    """k from the last ``metrics.speculative_decoding`` in the end of a stream (the final usage chunk)."""
    for line in reversed(tail.split(b"\n")):
        if b'"speculative_decoding"' not in line or not line.startswith(b"data:"):
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:
            return None
        if spec_from_vllm(event) is None:
            return None
        k = event["metrics"]["speculative_decoding"].get("num_spec_tokens")
        return k if isinstance(k, int) and not isinstance(k, bool) and k > 0 else None
    return None


class Runner:
    def __init__(self, plan: Plan, session: aiohttp.ClientSession) -> None:
        self.plan = plan
        self.session = session
        self.counter = 0

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.plan.api_key:
            headers["Authorization"] = f"Bearer {self.plan.api_key}"
        return headers

    async def one(self, server: str, temperature: float, concurrency: int, round_: int, index: int) -> RequestRecord:
        plan = self.plan
        prompt_index = index % len(plan.prompts)
        prompt = plan.prompts[prompt_index]
        base = plan.url if server == SPEC else plan.baseline_url
        model = plan.model if server == SPEC else (plan.baseline_model or plan.model)
        body = {"model": model, **prompt.body(), "max_tokens": prompt.max_tokens or plan.max_tokens,
                "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
        if plan.ignore_eos:
            body["ignore_eos"] = True
        record = RequestRecord(server=server, temperature=temperature, concurrency=concurrency, round=round_,
                               index=index, prompt=prompt_index)
        observer, outcome = SseObserver(), Outcome()
        tail = b""
        started = time.perf_counter()
        try:
            async with self.session.post(base + prompt.path, json=body, headers=self._headers(),
                                         timeout=aiohttp.ClientTimeout(total=plan.timeout)) as response:
                record.status = response.status
                if response.status != 200:
                    text = (await response.read())[:300].decode("utf-8", "replace")
                    record.error = f"HTTP {response.status}: {text}"
                    return record
                async for chunk in response.content.iter_any():
                    observer.feed(chunk, time.perf_counter(), outcome)
                    tail = (tail + chunk)[-TAIL_BYTES:]
            end = time.perf_counter()
            observer.finish(end, outcome)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
            record.error = f"{type(error).__name__}: {error}"[:300]
            return record
        record.e2e_s = end - started
        record.output_tokens = outcome.completion_tokens
        record.content_chunks = outcome.content_chunks
        if outcome.first_token_at is not None:
            record.ttft_s = outcome.first_token_at - started
            tokens = outcome.completion_tokens or 0
            if tokens > 1 and outcome.last_token_at is not None:
                record.tpot_s = (outcome.last_token_at - outcome.first_token_at) / (tokens - 1)
        if outcome.stream_error:
            record.error = "vLLM sent an error event in the stream"
            return record
        if outcome.completion_tokens is None:
            record.error = "no usage in the stream (is stream_options.include_usage honoured?)"
            return record
        if outcome.spec is not None:
            record.accepted_tokens = outcome.spec.accepted
            record.draft_tokens = outcome.spec.drafted
            record.spec_steps = outcome.spec.steps
            record.acceptance_rate = outcome.spec.acceptance_rate
            record.acceptance_source = outcome.spec.source
            record.num_spec_tokens = num_spec_tokens(tail)
        record.ok = True
        return record

    async def batch(self, server: str, temperature: float, concurrency: int, round_: int, indices: list[int],
                    on_done=None) -> tuple[list[RequestRecord], float]:
        """Run ``indices`` with ``concurrency`` clients in a closed loop; returns records and wall seconds."""
        queue = list(reversed(indices))
        records: list[RequestRecord] = []

        async def client() -> None:
            while queue:
                index = queue.pop()
                records.append(await self.one(server, temperature, concurrency, round_, index))
                if on_done:
                    on_done()

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(min(concurrency, len(indices)))))
        return sorted(records, key=lambda r: r.index), time.perf_counter() - started


async def discover_model(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> str:
    async with session.get(url + "/v1/models", headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as response:
        response.raise_for_status()
        data = await response.json()
    return data["data"][0]["id"]


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def run(plan: Plan, console: Console) -> tuple[dict, list[RequestRecord]]:
    servers = [SPEC] + ([BASELINE] if plan.baseline_url else [])
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        runner = Runner(plan, session)
        if plan.model is None:
            plan.model = await discover_model(session, plan.url, runner._headers())
        cells: dict[tuple[str, float, int], Cell] = {}
        per_cell = (plan.requests + plan.warmup) * len(servers)
        total = per_cell * len(plan.temperatures) * len(plan.concurrency)
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=False) as progress:
            task = progress.add_task("measuring", total=total)
            advance = lambda: progress.advance(task)  # noqa: E731
            for concurrency in plan.concurrency:
                for temperature in plan.temperatures:
                    progress.update(task, description=f"T={temperature:g} C={concurrency}")
                    for server in servers:
                        cells[(server, temperature, concurrency)] = Cell(server, temperature, concurrency)
                        if plan.warmup:
                            await runner.batch(server, temperature, concurrency, -1,
                                               list(range(-plan.warmup, 0)), advance)
                    next_index = 0
                    for round_, count in enumerate(_split(plan.requests, plan.rounds)):
                        indices = list(range(next_index, next_index + count))
                        next_index += count
                        order = servers if round_ % 2 == 0 else list(reversed(servers))
                        for server in order:
                            records, wall = await runner.batch(server, temperature, concurrency, round_, indices,
                                                               advance)
                            cell = cells[(server, temperature, concurrency)]
                            cell.records.extend(records)
                            cell.wall_seconds += wall
    return build_results(plan, cells), [r for c in cells.values() for r in c.records]


def build_results(plan: Plan, cells: dict[tuple[str, float, int], Cell]) -> dict:
    buckets = TemperatureBuckets()
    rows = []
    for (server, temperature, concurrency), cell in sorted(cells.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0] != SPEC)):
        row = summarise(cell, buckets, plan.break_even, plan.near_upper)
        if server == SPEC and (BASELINE, temperature, concurrency) in cells:
            seed = plan.seed + 7919 * len(rows)
            row["speedup"] = compare(cell, cells[(BASELINE, temperature, concurrency)], plan.band,
                                     plan.bootstrap, seed)
        rows.append(row)
    ks = {r["num_spec_tokens"] for r in rows if r["server"] == SPEC and r["num_spec_tokens"]}
    k = ks.pop() if len(ks) == 1 else None
    return {
        "tool": f"specdec-sidecar measure {__version__}",
        "url": plan.url,
        "baseline_url": plan.baseline_url,
        "model": plan.model,
        "prompts": plan.prompts_name,
        "max_tokens": plan.max_tokens,
        "ignore_eos": plan.ignore_eos,
        "requests_per_cell": plan.requests,
        "warmup_per_cell": plan.warmup,
        "rounds": plan.rounds,
        "temperatures": plan.temperatures,
        "concurrency": plan.concurrency,
        "thresholds": {"break_even": plan.break_even, "near_break_even_upper": plan.near_upper,
                       "neutral_band": plan.band, "confidence": 0.95, "bootstrap_resamples": plan.bootstrap},
        "num_spec_tokens": k,
        "cells": rows,
        "break_even_fit": fit_model(rows, k),
    }


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.0f}%"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1000:.1f}"


def _speedup(s: dict | None) -> str:
    if not s or s["value"] is None:
        return "—"
    if s["ci_low"] is None:
        return f"{s['value']:.2f}×"
    return f"{s['value']:.2f}× [{s['ci_low']:.2f}–{s['ci_high']:.2f}]"


def render(results: dict) -> list:
    paired = results["baseline_url"] is not None
    table = Table(title=f"specdec-sidecar measure: {results['model']} ({results['prompts']} prompts, "
                        f"{results['max_tokens']} tokens)", title_justify="left")
    columns = ["T", "C", "server", "req", "err", "accept.", "P10/P50/P90", "TTFT P50", "TPOT P50/P99", "tok/s"]
    if paired:
        columns += ["throughput speed-up [95% CI]", "TPOT speed-up [95% CI]", "verdict"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("server", "verdict") else "right")
    for row in results["cells"]:
        cells = [
            f"{row['temperature']:g}", str(row["concurrency"]), row["server"], str(row["requests"]),
            str(row["errors"]) if row["errors"] else "", _pct(row["acceptance_rate"]),
            "/".join(_pct(row[f"acceptance_p{q}"]) for q in (10, 50, 90)) if row["acceptance_p50"] is not None else "—",
            f"{_ms(row['ttft_p50_s'])} ms", f"{_ms(row['tpot_p50_s'])}/{_ms(row['tpot_p99_s'])} ms",
            "—" if row["output_tokens_per_second"] is None else f"{row['output_tokens_per_second']:.0f}",
        ]
        if paired:
            s = row["speedup"]
            cells += [_speedup(s and s["throughput"]), _speedup(s and s["tpot"]),
                      Text(s["verdict"], style=VERDICT_STYLE[s["verdict"]]) if s else Text("")]
        table.add_row(*cells)
    out: list = [table]
    fit = results.get("break_even_fit")
    if fit:
        model = Table(title=f"Break-even model per load level (k={fit['k']}; c = cost of a draft token "
                            "in target forward passes)", title_justify="left")
        for column in ("C", "fitted c", "break-even α", "break-even acceptance", "α (the mix)",
                       "model speed-up", "pays", "best k"):
            model.add_column(column, justify="right")
        for lv in fit["levels"]:
            model.add_row(
                str(lv["concurrency"]), "—" if lv["draft_cost"] is None else f"{lv['draft_cost']:.3f}",
                "never" if lv["draft_cost"] is not None and lv["break_even_alpha"] is None
                else _pct(lv["break_even_alpha"]),
                _pct(lv["break_even_acceptance_rate"]), _pct(lv["alpha"]),
                "—" if lv["predicted_speedup"] is None else f"{lv['predicted_speedup']:.2f}×",
                {True: "yes", False: "no", None: "—"}[lv["pays"]],
                "—" if lv["suggested_num_speculative_tokens"] is None else str(lv["suggested_num_speculative_tokens"]),
            )
        out.append(model)
        check = Table(title="Model vs measurement per cell (E = output tokens per target pass)", title_justify="left")
        for column in ("C", "T", "E", "α", "model speed-up", "measured TPOT speed-up"):
            check.add_column(column, justify="right")
        for lv in fit["levels"]:
            for entry in lv["per_temperature"]:
                check.add_row(str(lv["concurrency"]), f"{entry['temperature']:g}", f"{entry['tokens_per_pass']:.2f}",
                              _pct(entry["alpha"]), f"{entry['model_speedup']:.2f}×",
                              f"{entry['measured_tpot_speedup']:.2f}×")
        out.append(check)
        if fit["schedule"]:
            out.append(Text(f"suggested --speculative-config entry: \"{fit['schedule']['key']}\": "
                            f"{json.dumps(fit['schedule']['value'])}"))
        stops = fit["stops_paying_at_concurrency"]
        out.append(Text(f"with k={fit['k']}, speculation pays at every measured load for this mix of temperatures"
                        if stops is None else
                        f"with k={fit['k']}, speculation does not pay for this mix of temperatures from concurrency {stops}"))
    return out


def gate_failures(results: dict, gate: list[float]) -> list[dict]:
    return [r for r in results["cells"]
            if r["server"] == SPEC and r["temperature"] in gate and r["speedup"] and r["speedup"]["verdict"] == HURTS]


def write_outputs(plan: Plan, results: dict, records: list[RequestRecord]) -> list[Path]:
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    with open(plan.out / "requests.jsonl", "w") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json()) + "\n")
    if not plan.plots:
        return []
    from sidecar.commands.measure_plots import write_plots

    return write_plots(results, plan.out)


def run_measure(args: argparse.Namespace, console: Console | None = None) -> int:
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=170)  # logs and CI: the table's full width rather than ellipses
    try:
        plan = plan_from(args)
    except SettingError as error:
        print(f"specdec-sidecar: {error}", file=sys.stderr)
        return EXIT_BAD_SETTING
    if plan.plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("specdec-sidecar: invalid setting --no-plots: plots need matplotlib "
                  "(pip install 'specdec-sidecar[measure]') or pass --no-plots", file=sys.stderr)
            return EXIT_BAD_SETTING
    try:
        results, records = asyncio.run(run(plan, console))
    except (aiohttp.ClientError, OSError, KeyError, IndexError, ValueError) as error:
        console.print(Text(f"cannot measure {plan.url}: {error}", style="bold red"))
        return EXIT_UNMEASURABLE
    except KeyboardInterrupt:
        return 130
    plots = write_outputs(plan, results, records)
    for item in render(results):
        console.print(item)
    console.print(f"wrote {plan.out / 'results.json'}, {plan.out / 'requests.jsonl'}"
                  + "".join(f", {p}" for p in plots))
    dead = [r for r in results["cells"] if r["requests"] == 0]
    if dead:
        first = dead[0]
        errors = [rec.error for rec in records if rec.server == first["server"] and not rec.ok]
        console.print(Text(f"every request failed in {len(dead)} cell(s), e.g. {first['server']} "
                           f"T={first['temperature']:g} C={first['concurrency']}: {errors[0] if errors else ''}",
                           style="bold red"))
        return EXIT_UNMEASURABLE
    if failed := gate_failures(results, plan.gate):
        cells = ", ".join(f"T={r['temperature']:g} C={r['concurrency']}" for r in failed)
        console.print(Text(f"gate failed: speculation hurts at {cells}", style="bold red"))
        return EXIT_GATE
    return EXIT_OK
