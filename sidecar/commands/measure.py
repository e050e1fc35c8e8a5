"""``specdec-sidecar measure``: does speculative decoding pay off for this workload, at these temperatures and loads?

For every (temperature, concurrency) cell it streams ``--requests`` requests (``stream_options.include_usage``
and an explicit temperature) to the speculative server ``--url`` and, when given, the same number to
``--baseline-url`` (the same model without speculation). The servers take turns in ``--rounds`` rounds per
cell, the order flipping each round, so drift (a warming cache, a neighbour's load) hits both alike.

Per request it reads vLLM's ``metrics.speculative_decoding`` from the final usage chunk (vLLM run with
``--per-request-spec-decode-metrics summary``); without it, the stream-step estimate (accepted = completion
tokens - content chunks, labelled ``stream_steps``), and TTFT, TPOT, e2e, output tokens and errors. It
writes ``results.json``, ``requests.jsonl``, with a baseline ``calibration.json`` (the fitted cost of a draft
token per load level, for ``serve --calibration``) and PNG plots into ``--out``, prints a table, and exits
non-zero as a CI gate when asked (``--fail-if-hurts-at``).

Exit status (``ExitCode``): 0 done (gate passed); 1 the gate failed; 2 a bad setting; 3 a server could not be
measured (unreachable, or every request of a cell failed); 130 interrupted.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import aiohttp
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, SecretStr, field_validator, model_validator
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from sidecar import __version__
from sidecar.buckets import TemperatureBuckets
from sidecar.calibration import Calibration, CalibrationError, ModelCalibration, dumps
from sidecar.commands import measure_prompts
from sidecar.commands.measure_stats import (
    BASELINE,
    CONFIDENCE,
    HELPS,
    HURTS,
    SPEC,
    Cell,
    CellSummary,
    Interval,
    MeasureResults,
    RequestRecord,
    ResultThresholds,
    calibrate,
    compare,
    fit_model,
    summarise,
)
from sidecar.config import ExitCode, comma_list, http_url
from sidecar.decision import DEFAULT_BAND, DEFAULT_BREAK_EVEN, DEFAULT_NEAR_UPPER
from sidecar.tap.observe import Outcome, SseObserver, spec_from_vllm

TAIL_BYTES = 16384  # the final usage chunk with vLLM's per-request metrics is well under this
VERDICT_STYLE = {HELPS: "green", "neutral": "yellow", HURTS: "bold red"}
CALIBRATION_FILE = "calibration.json"
UNKNOWN_METHOD = "unknown"
# vLLM's own names for its methods (``--speculative-config '{"method": ...}'``); any other word is accepted too.
KNOWN_METHODS = ("ngram", "draft_model", "eagle", "eagle3", "medusa", "mlp_speculator", "mtp", "suffix")

Plotter = Callable[[MeasureResults, Path], list[Path]]
Temperature = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class MeasureSettings(BaseModel):
    """Everything ``measure`` can be told; each field is the flag of the same name (``--baseline-url`` ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    url: str = Field(description="base URL of the vLLM server with speculative decoding")
    baseline_url: str | None = Field(
        None, description="base URL of the same model served without speculative decoding")
    model: str | None = Field(None, description="model name to request (unset = the first one --url lists)")
    baseline_model: str | None = Field(None, description="model name on --baseline-url (unset = --model)")
    method: str | None = Field(
        None, description="speculative method of --url's server, for calibration.json (vLLM does not report it): "
        f"{', '.join(KNOWN_METHODS)}, ... (unset = {UNKNOWN_METHOD})")
    temperatures: list[Temperature] = Field(
        [0.0, 0.4, 0.8, 1.0], description="temperatures, comma separated")
    concurrency: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 4, 16], description="clients in the closed loop, comma separated")
    requests: int = Field(24, ge=1, description="measured requests per cell and server")
    warmup: int = Field(
        2, ge=0, description="unrecorded requests per cell and server first, at least one per client (0 = none)")
    rounds: int = Field(2, ge=1, description="turns per cell, servers alternating and the order flipping each turn")
    settle: float = Field(
        1.5, ge=0, le=60, allow_inf_nan=False,
        description="seconds of rest before a batch on one server after a batch on the other (vLLM busy-polls "
        "for 1 s after its last step, taking CPU from the other server where they share a host)",
        json_schema_extra={"metavar": "SECONDS"})
    max_tokens: int = Field(128, ge=2, description="max_tokens of each request")
    ignore_eos: bool = Field(False, description="send vLLM's ignore_eos so every completion runs to --max-tokens")
    prompts: Annotated[measure_prompts.PromptSet, PlainValidator(
        lambda v: v if isinstance(v, measure_prompts.PromptSet) else measure_prompts.load_set(str(v)))] = Field(
        "echo", description="echo, code, chat or a JSONL file", json_schema_extra={"metavar": "SET"})
    out: Path = Field(Path("measure-out"), description="output directory", json_schema_extra={"metavar": "DIR"})
    timeout: float = Field(300.0, gt=0, allow_inf_nan=False, description="seconds per request")
    api_key: SecretStr | None = Field(None, description="sent as 'Authorization: Bearer KEY' to both servers")
    break_even: float = Field(
        DEFAULT_BREAK_EVEN, gt=0, le=1, description="acceptance below this: verdict disable")
    near_break_even_upper: float = Field(
        DEFAULT_NEAR_UPPER, gt=0, le=1, description="acceptance from --break-even up to this: near_break_even")
    neutral_band: float = Field(
        DEFAULT_BAND, ge=0, lt=1,
        description="a speed-up within 1 +/- this is neutral even when its interval excludes 1")
    bootstrap: int = Field(1000, ge=100, description="bootstrap resamples")
    seed: int = Field(0, description="seed of the bootstrap")
    fail_if_hurts_at: list[Temperature] = Field(
        [], description="exit 1 if any cell at one of these comma-separated temperatures hurts",
        json_schema_extra={"metavar": "TEMPERATURES"})
    no_plots: bool = Field(False, description="skip the PNG plots")

    @field_validator("url", "baseline_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return None if value is None else http_url(value)

    @field_validator("temperatures", "concurrency", "fail_if_hurts_at", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return comma_list(value)

    @field_validator("temperatures", "concurrency")
    @classmethod
    def _distinct(cls, value: list) -> list:
        if not value:
            raise ValueError("give at least one value, comma separated")
        return list(dict.fromkeys(value))

    @field_validator("method")
    @classmethod
    def _method(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z][a-z0-9_]*", value):
            raise ValueError(f"a lowercase word such as {', '.join(KNOWN_METHODS[:3])}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MeasureSettings:
        if self.rounds > self.requests:
            raise ValueError(f"--rounds ({self.rounds}) is more than --requests ({self.requests})")
        if self.break_even > self.near_break_even_upper:
            raise ValueError(f"--break-even ({self.break_even:g}) is above --near-break-even-upper "
                             f"({self.near_break_even_upper:g})")
        if self.fail_if_hurts_at and not self.baseline_url:
            raise ValueError("--fail-if-hurts-at needs --baseline-url to compare against")
        if missing := [t for t in self.fail_if_hurts_at if t not in self.temperatures]:
            raise ValueError(f"--fail-if-hurts-at: {missing[0]:g} is not one of --temperatures")
        return self


class Unmeasurable(Exception):
    """A server could not be measured at all (``str()`` is one line saying which and why)."""


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


def _headers(settings: MeasureSettings) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if settings.api_key is not None:
        headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
    return headers


def client_tpot(outcome: Outcome) -> float | None:
    """Seconds per output token after the first, as this client received them. A response that arrived in one
    read shows no spacing between its tokens: its TPOT is unknown to this client (the reader or the network held
    it up), not 0, which would compare as infinitely fast."""
    tokens = outcome.completion_tokens or 0
    first, last = outcome.first_token_at, outcome.last_token_at
    if tokens > 1 and first is not None and last is not None and last > first:
        return (last - first) / (tokens - 1)
    return None


class Runner:
    def __init__(self, settings: MeasureSettings, model: str, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.model = model
        self.session = session
        self.headers = _headers(settings)
        self.last_server: str | None = None

    async def one(self, server: str, temperature: float, concurrency: int, round_: int, index: int) -> RequestRecord:
        settings = self.settings
        prompts = settings.prompts.prompts
        prompt_index = index % len(prompts)
        prompt = prompts[prompt_index]
        base = settings.url if server == SPEC else settings.baseline_url
        model = self.model if server == SPEC else (settings.baseline_model or self.model)
        body = {"model": model, **prompt.body(), "max_tokens": prompt.max_tokens or settings.max_tokens,
                "temperature": temperature, "stream": True, "stream_options": {"include_usage": True}}
        if settings.ignore_eos:
            body["ignore_eos"] = True
        record = RequestRecord(server=server, temperature=temperature, concurrency=concurrency, round=round_,
                               index=index, prompt=prompt_index)
        observer, outcome = SseObserver(), Outcome()
        tail = b""
        started = time.perf_counter()
        try:
            async with self.session.post(f"{base}{prompt.path}", json=body, headers=self.headers,
                                         timeout=aiohttp.ClientTimeout(total=settings.timeout)) as response:
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
            record.tpot_s = client_tpot(outcome)
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
        """Run ``indices`` with ``concurrency`` clients in a closed loop; returns records and wall seconds.

        After a batch on the other server it first rests ``--settle`` seconds: vLLM's engine and worker
        busy-poll their step queues for a second after the last step, and where both servers share CPUs
        (one host, a CPU build) that spin would slow this batch down and be billed to this server."""
        if self.last_server not in (None, server) and self.settings.settle:
            await asyncio.sleep(self.settings.settle)
        self.last_server = server
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
    """The first model ``url`` serves; ``Unmeasurable`` when it cannot be asked or lists none."""
    where = f"{url}/v1/models"
    try:
        async with session.get(where, headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as response:
            if response.status != 200:
                raise Unmeasurable(f"cannot list the models of {url}: {where} answered HTTP {response.status}")
            data = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as error:
        raise Unmeasurable(f"cannot reach {url}: {type(error).__name__}: {error}") from None
    except ValueError:
        raise Unmeasurable(f"cannot list the models of {url}: {where} did not answer JSON") from None
    models = data.get("data") if isinstance(data, dict) else None
    first = models[0] if isinstance(models, list) and models else None
    if not isinstance(first, dict) or not isinstance(first.get("id"), str):
        raise Unmeasurable(f"cannot list the models of {url}: {where} names no model; pass --model")
    return first["id"]


async def read_vllm_version(session: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> str | None:
    """vLLM's ``/version`` (``{"version": "0.32.0"}``) for calibration.json; None when it does not say."""
    try:
        async with session.get(f"{url}/version", headers=headers, timeout=aiohttp.ClientTimeout(total=10)) as response:
            if response.status != 200:
                return None
            data = await response.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None  # an older or proxied server without /version: the calibration says null
    version = data.get("version") if isinstance(data, dict) else None
    return version.strip() if isinstance(version, str) and version.strip() else None


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


Cells = dict[tuple[str, float, int], Cell]


def warmup_requests(settings: MeasureSettings, concurrency: int) -> int:
    """Unrecorded requests before a cell on one server: ``--warmup``, but at least one per client, so the
    first measured batch is not the first of its size the server runs."""
    return max(settings.warmup, concurrency) if settings.warmup else 0


async def measure_cells(settings: MeasureSettings, console: Console) -> tuple[str, Cells, str | None]:
    """Measure every cell; returns the model measured, the cells and the speculative server's vLLM version."""
    servers = [SPEC] + ([BASELINE] if settings.baseline_url else [])
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        headers = _headers(settings)
        model = settings.model or await discover_model(session, settings.url, headers)
        version = await read_vllm_version(session, settings.url, headers) if settings.baseline_url else None
        runner = Runner(settings, model, session)
        cells: Cells = {}
        total = sum((settings.requests + warmup_requests(settings, c)) * len(servers) * len(settings.temperatures)
                    for c in settings.concurrency)
        with Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console, transient=False) as progress:
            task = progress.add_task("measuring", total=total)
            advance = lambda: progress.advance(task)  # noqa: E731
            for concurrency in settings.concurrency:
                for temperature in settings.temperatures:
                    progress.update(task, description=f"T={temperature:g} C={concurrency}")
                    for server in servers:
                        cells[(server, temperature, concurrency)] = Cell(server, temperature, concurrency)
                        if warmup := warmup_requests(settings, concurrency):
                            await runner.batch(server, temperature, concurrency, -1, list(range(-warmup, 0)), advance)
                    next_index = 0
                    for round_, count in enumerate(_split(settings.requests, settings.rounds)):
                        indices = list(range(next_index, next_index + count))
                        next_index += count
                        order = servers if round_ % 2 == 0 else list(reversed(servers))
                        for server in order:
                            records, wall = await runner.batch(server, temperature, concurrency, round_, indices,
                                                               advance)
                            cell = cells[(server, temperature, concurrency)]
                            cell.records.extend(records)
                            cell.wall_seconds += wall
    return model, cells, version


def build_results(settings: MeasureSettings, model: str, cells: Cells) -> MeasureResults:
    buckets = TemperatureBuckets()
    rows: list[CellSummary] = []
    for (server, temperature, concurrency), cell in sorted(cells.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0] != SPEC)):
        row = summarise(cell, buckets, settings.break_even, settings.near_break_even_upper)
        if server == SPEC and (BASELINE, temperature, concurrency) in cells:
            seed = settings.seed + 7919 * len(rows)
            speedup = compare(cell, cells[(BASELINE, temperature, concurrency)], settings.neutral_band,
                              settings.bootstrap, seed)
            row = replace(row, speedup=speedup)
        rows.append(row)
    ks = {r.num_spec_tokens for r in rows if r.server == SPEC and r.num_spec_tokens}
    k = ks.pop() if len(ks) == 1 else None
    return MeasureResults(
        tool=f"specdec-sidecar measure {__version__}",
        url=settings.url,
        baseline_url=settings.baseline_url,
        model=model,
        prompts=settings.prompts.name,
        max_tokens=settings.max_tokens,
        ignore_eos=settings.ignore_eos,
        requests_per_cell=settings.requests,
        warmup_per_cell=settings.warmup,
        rounds=settings.rounds,
        settle_seconds=settings.settle,
        temperatures=list(settings.temperatures),
        concurrency=list(settings.concurrency),
        thresholds=ResultThresholds(settings.break_even, settings.near_break_even_upper, settings.neutral_band,
                                    CONFIDENCE, settings.bootstrap),
        num_spec_tokens=k,
        cells=tuple(rows),
        break_even_fit=fit_model(rows, k),
    )


def build_calibration(
    settings: MeasureSettings, results: MeasureResults, cells: Cells, vllm_version: str | None, measured_at: str
) -> tuple[ModelCalibration | None, list[str]]:
    """The run as ``calibration.json``'s entry for its model, or None with the reasons there is none."""
    if settings.baseline_url is None:
        return None, ["no --baseline-url: without one there is no speed-up to fit the cost of a draft token to"]
    if results.break_even_fit is None:
        if results.num_spec_tokens is None:
            return None, ["k is unknown: run --url's server with --per-request-spec-decode-metrics summary so "
                          "each response reports it"]
        return None, ["no paired cell had a TPOT speed-up and accepted tokens to fit"]
    calibration, notes = calibrate(
        results.break_even_fit, cells, model=results.model, method=settings.method or UNKNOWN_METHOD,
        vllm_version=vllm_version, measured_at=measured_at, resamples=settings.bootstrap, seed=settings.seed + 1)
    if calibration is not None:
        try:
            dumps(Calibration({calibration.model: calibration}))  # what the sidecar's load would refuse
        except CalibrationError as error:
            return None, [f"the fit is not a valid calibration ({error})"]
    return calibration, notes


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x * 100:.0f}%"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1000:.1f}"


def _speedup(s: Interval | None) -> str:
    if s is None or s.value is None:
        return "—"
    if s.ci_low is None:
        return f"{s.value:.2f}×"
    return f"{s.value:.2f}× [{s.ci_low:.2f}–{s.ci_high:.2f}]"


def render(results: MeasureResults, calibration: ModelCalibration | None = None) -> list[Any]:
    paired = results.baseline_url is not None
    table = Table(title=f"specdec-sidecar measure: {results.model} ({results.prompts} prompts, "
                        f"{results.max_tokens} tokens)", title_justify="left")
    columns = ["T", "C", "server", "req", "err", "accept.", "P10/P50/P90", "TTFT P50", "TPOT P50/P99", "tok/s"]
    if paired:
        columns += ["throughput speed-up [95% CI]", "TPOT speed-up [95% CI]", "verdict"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("server", "verdict") else "right")
    for row in results.cells:
        cells: list[Any] = [
            f"{row.temperature:g}", str(row.concurrency), row.server, str(row.requests),
            str(row.errors) if row.errors else "", _pct(row.acceptance_rate),
            "/".join(_pct(q) for q in (row.acceptance_p10, row.acceptance_p50, row.acceptance_p90))
            if row.acceptance_p50 is not None else "—",
            f"{_ms(row.ttft_p50_s)} ms", f"{_ms(row.tpot_p50_s)}/{_ms(row.tpot_p99_s)} ms",
            "—" if row.output_tokens_per_second is None else f"{row.output_tokens_per_second:.0f}",
        ]
        if paired:
            s = row.speedup
            cells += [_speedup(s and s.throughput), _speedup(s and s.tpot),
                      Text(s.verdict, style=VERDICT_STYLE[s.verdict]) if s else Text("")]
        table.add_row(*cells)
    out: list[Any] = [table]
    fit = results.break_even_fit
    if fit:
        intervals = {lv.concurrency: lv for lv in calibration.levels} if calibration else {}
        model = Table(title=f"Break-even model per load level (k={fit.k}; c = cost of a draft token "
                            "in target forward passes)", title_justify="left")
        for column in ("C", "fitted c", "c 95% CI", "break-even α", "break-even acceptance", "α (the mix)",
                       "model speed-up", "pays", "best k"):
            model.add_column(column, justify="right")
        for lv in fit.levels:
            cal = intervals.get(float(lv.concurrency))
            model.add_row(
                str(lv.concurrency), "—" if lv.draft_cost is None else f"{lv.draft_cost:.3f}",
                "—" if cal is None else f"{cal.draft_cost_low:.3f}–{cal.draft_cost_high:.3f}",
                "never" if lv.draft_cost is not None and lv.break_even_alpha is None else _pct(lv.break_even_alpha),
                _pct(lv.break_even_acceptance_rate), _pct(lv.alpha),
                "—" if lv.predicted_speedup is None else f"{lv.predicted_speedup:.2f}×",
                {True: "yes", False: "no", None: "—"}[lv.pays],
                "—" if lv.suggested_num_speculative_tokens is None else str(lv.suggested_num_speculative_tokens),
            )
        out.append(model)
        check = Table(title="Model vs measurement per cell (E = output tokens per target pass)", title_justify="left")
        for column in ("C", "T", "E", "α", "model speed-up", "measured throughput speed-up", "c of this cell"):
            check.add_column(column, justify="right")
        for lv in fit.levels:
            for entry in lv.per_temperature:
                check.add_row(str(lv.concurrency), f"{entry.temperature:g}", f"{entry.tokens_per_pass:.2f}",
                              _pct(entry.alpha), f"{entry.model_speedup:.2f}×",
                              f"{entry.measured_speedup:.2f}×",
                              "—" if entry.draft_cost is None else f"{entry.draft_cost:.3f}")
        out.append(check)
        if fit.schedule:
            out.append(Text(f"suggested --speculative-config entry: \"{fit.schedule.key}\": "
                            f"{json.dumps(fit.schedule.value)}"))
        stops = fit.stops_paying_at_concurrency
        out.append(Text(f"with k={fit.k}, speculation pays at every measured load for this mix of temperatures"
                        if stops is None else
                        f"with k={fit.k}, speculation does not pay for this mix of temperatures from concurrency {stops}"))
    return out


def gate_failures(results: MeasureResults, gate: list[float]) -> list[CellSummary]:
    return [r for r in results.cells
            if r.server == SPEC and r.temperature in gate and r.speedup and r.speedup.verdict == HURTS]


def find_plotter() -> Plotter | None:
    """The PNG writer when matplotlib (the ``[measure]`` extra) is installed, else None."""
    if importlib.util.find_spec("matplotlib") is None:
        return None
    from sidecar.commands.measure_plots import write_plots

    return write_plots


def write_outputs(
    settings: MeasureSettings, results: MeasureResults, records: list[RequestRecord],
    calibration: ModelCalibration | None, plotter: Plotter | None,
) -> list[Path]:
    """results.json, requests.jsonl, calibration.json (when there is one) and the plots; the paths written."""
    out = settings.out
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.json", out / "requests.jsonl"]
    written[0].write_text(json.dumps(results.to_json(), indent=2) + "\n")
    with open(written[1], "w") as handle:
        for record in records:
            handle.write(json.dumps(record.to_json()) + "\n")
    if calibration is not None:
        text = dumps(Calibration({calibration.model: calibration}))
        (out / CALIBRATION_FILE).write_text(text)
        written.append(out / CALIBRATION_FILE)
    if plotter is not None and not settings.no_plots:
        written += plotter(results, out)
    return written


def run_measure(settings: MeasureSettings, console: Console, plotter: Plotter | None) -> ExitCode:
    """Measure, write, report. ``plotter`` None: no matplotlib, so the plots are skipped with a note."""
    measured_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    try:
        model, cells, version = asyncio.run(measure_cells(settings, console))
    except Unmeasurable as error:
        console.print(Text(f"cannot measure: {error}", style="bold red"))
        return ExitCode.UNMEASURABLE
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    records = [r for c in cells.values() for r in c.records]
    results = build_results(settings, model, cells)
    dead = [r for r in results.cells if r.requests == 0]
    calibration, notes = (None, ["a cell had no successful request"]) if dead else build_calibration(
        settings, results, cells, version, measured_at)
    written = write_outputs(settings, results, records, calibration, plotter)
    for item in render(results, calibration):
        console.print(item)
    console.print(Text("wrote " + ", ".join(str(p) for p in written)))
    if plotter is None and not settings.no_plots:
        console.print(Text("plots skipped: matplotlib is not installed (pip install 'specdec-sidecar[measure]' "
                           "for them, or pass --no-plots)"))
    if settings.baseline_url is not None:
        if calibration is None:
            console.print(Text(f"no {CALIBRATION_FILE}: {'; '.join(notes)}", style="yellow"))
        else:
            for note in notes:
                console.print(Text(f"{CALIBRATION_FILE}: left out {note}", style="yellow"))
            if settings.method is None:
                console.print(Text(f"{CALIBRATION_FILE}: method {UNKNOWN_METHOD} (vLLM does not report it; pass "
                                   f"--method {'|'.join(KNOWN_METHODS[:3])}|...)", style="yellow"))
    stale = settings.out / CALIBRATION_FILE
    if calibration is None and stale.exists():
        console.print(Text(f"note: {stale} is from an earlier run; this run wrote none", style="yellow"))
    if dead:
        first = dead[0]
        errors = [rec.error for rec in records if rec.server == first.server and not rec.ok]
        console.print(Text(f"every request failed in {len(dead)} cell(s), e.g. {first.server} "
                           f"T={first.temperature:g} C={first.concurrency}: {errors[0] if errors else ''}",
                           style="bold red"))
        return ExitCode.UNMEASURABLE
    if failed := gate_failures(results, settings.fail_if_hurts_at):
        where = ", ".join(f"T={r.temperature:g} C={r.concurrency}" for r in failed)
        console.print(Text(f"gate failed: speculation hurts at {where}", style="bold red"))
        return ExitCode.GATE_FAILED
    return ExitCode.OK


def run(settings: MeasureSettings) -> ExitCode:
    """The command: a console as wide as the tables when output goes to a log, the plots when possible."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=170)  # logs and CI: the table's full width rather than ellipses
    return run_measure(settings, console, find_plotter())
