"""Fleet scale: a real Prometheus, loading the project's rule files, scraping N sidecar pages.

    .venv/bin/python bench/bench_fleet.py [--pods 50,200,500] [--duration 150] [--interval 5]
                                          [--write docs/scaling.md]

1. One real sidecar page: the app (``create_app``, proxy included) runs against the loopback vLLM replay of
   ``tests/conftest.py`` (whose ``/metrics`` walks through the recorded vLLM captures) and gets requests in
   every temperature bucket, streamed and not; once every derived family is rendered, its ``/metrics`` text
   is captured.
2. N synthetic sidecars: one aiohttp server serves that page on N paths. Every counter, histogram bucket,
   ``_sum`` and ``_count`` grows with time at a rate of its own per pod, so ``rate()`` and
   ``histogram_quantile`` in the rules have real work to do; gauges stay as captured.
3. A real Prometheus (Debian ``prometheus``) on loopback, fresh TSDB per N, with ``alerts/recording-rules.yaml``
   and ``alerts/alerts.yaml`` unmodified, scrape job ``specdec-sidecar`` with one target per pod carrying
   ``namespace``, ``pod`` and ``instance`` labels as Kubernetes service discovery would, scrape and evaluation
   interval ``--interval`` seconds.
4. Every interval, from Prometheus's own ``/metrics``: ``prometheus_tsdb_head_series``,
   ``prometheus_rule_group_last_duration_seconds`` per group and ``process_resident_memory_bytes``; at the end,
   from its query API, how many targets are up and how many series the recording rules produced.

Figures for the last two thirds of each run (after the head has filled) are printed as a Markdown table and,
with ``--write``, replace the block between the ``bench_fleet`` markers in the given file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from devstack.vllm_server import free_port  # noqa: E402
from fakes import ProgressingVllm, feed  # noqa: E402

GROWING = ("_total", "_bucket", "_sum", "_count")
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")
BEGIN, END = "<!-- bench_fleet:begin -->", "<!-- bench_fleet:end -->"


# --- 1. one real sidecar page ------------------------------------------------------------------------------

async def capture_page() -> str:
    from prometheus_client import CollectorRegistry

    from sidecar.app import PROXY_PORT, create_app
    from sidecar.config import build_settings

    upstream = ProgressingVllm()
    await upstream.start()
    settings = build_settings(upstream=upstream.url, scrape_interval="0.1s", scrape_timeout="0.1s",
                              proxy_port=0, proxy_host="127.0.0.1", models="tiny-target", min_drafts=1,
                              log_level="warning")
    runner = web.AppRunner(create_app(settings, CollectorRegistry()))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    metrics_url = f"http://127.0.0.1:{runner.addresses[0][1]}/metrics"
    try:
        async with aiohttp.ClientSession() as session:
            await feed(session, f"http://127.0.0.1:{runner.app[PROXY_PORT]}")
            deadline = time.monotonic() + 30
            while True:
                async with session.get(metrics_url) as r:
                    text = await r.text()
                complete = (text.count("specdec_bucket_verdict{") == 32
                            and text.count("specdec_position_acceptance_rate{") == 12)
                if complete:
                    return text
                if time.monotonic() > deadline:
                    raise TimeoutError("the sidecar page never showed every derived family")
                await asyncio.sleep(0.2)
    finally:
        await runner.cleanup()
        await upstream.stop()


# --- 2. N synthetic sidecars ---------------------------------------------------------------------------------

@dataclass
class Page:
    """The captured page split once: comment lines as they are, samples as (text before the value, base
    value, grows with time)."""

    lines: list[str | tuple[str, float, bool]] = field(default_factory=list)

    @property
    def samples(self) -> list[tuple[str, float, bool]]:
        return [line for line in self.lines if isinstance(line, tuple)]

    @classmethod
    def parse(cls, text: str) -> Page:
        page = cls()
        for line in text.splitlines():
            if not line or line.startswith("#"):
                page.lines.append(line)
                continue
            match = SAMPLE.match(line)
            if match is None:
                raise ValueError(f"unexpected line: {line!r}")
            name, labels, value = match.groups()
            page.lines.append((f"{name}{labels or ''} ", float(value), name.endswith(GROWING)))
        return page

    def render(self, factor: float) -> bytes:
        out = []
        for line in self.lines:
            if isinstance(line, str):
                out.append(line)
                continue
            prefix, value, grows = line
            v = value * factor if grows else value
            out.append(prefix + (repr(v) if math.isfinite(v) else ("NaN" if math.isnan(v) else "+Inf")))
        return ("\n".join(out) + "\n").encode()


def pods_app(page: Page, pods: int, started: float, interval: int) -> web.Application:
    """Pod i's counters grow at one of 8 speeds (doubling every 30 s to 2 min), stepping once per interval;
    a page is rendered once per (speed, step) and served to every pod sharing it, so the page server stays
    cheap next to Prometheus."""
    rng = random.Random(pods)
    speeds = [rng.randrange(8) for _ in range(pods)]
    cache: dict[tuple[int, int], bytes] = {}

    async def handle(request: web.Request) -> web.Response:
        i = int(request.match_info["pod"])
        step = int((time.monotonic() - started) // interval)
        key = (speeds[i], step)
        if key not in cache:
            if len(cache) > 64:
                cache.clear()
            cache[key] = page.render(1.0 + (0.5 + speeds[i] * 1.5 / 7) / 60 * step * interval)
        return web.Response(body=cache[key], content_type="text/plain", charset="utf-8")

    app = web.Application()
    app.router.add_get("/pods/{pod:\\d+}/metrics", handle)
    return app


# --- 3. Prometheus ----------------------------------------------------------------------------------------

def write_config(workdir: Path, port: int, pods: int, interval: int, idle: bool = False) -> Path:
    """The fleet's scrape job and the project's rule files; ``idle``: neither (to measure queries alone)."""
    groups = [
        {"targets": [f"127.0.0.1:{port}"],
         "labels": {"__metrics_path__": f"/pods/{i}/metrics", "namespace": "ml", "pod": f"vllm-{i:04d}",
                    "instance": f"10.{i // 250}.{i % 250}.1:9464"}}
        for i in range(pods)
    ]
    config = {
        "global": {"scrape_interval": f"{interval}s", "scrape_timeout": f"{interval}s",
                   "evaluation_interval": f"{interval}s"},
        "rule_files": [] if idle else [str(ROOT / "alerts" / name) for name in ("recording-rules.yaml", "alerts.yaml")],
        "scrape_configs": [] if idle else [{"job_name": "specdec-sidecar", "static_configs": groups}],
    }
    path = workdir / "prometheus.yml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return path


def read_self_metrics(url: str) -> dict[str, float]:
    wanted = {}
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.split(" ")[0] in ("prometheus_tsdb_head_series", "process_resident_memory_bytes",
                                      "process_cpu_seconds_total"):
                name, value = line.split(" ")
                wanted[name] = float(value)
            elif line.startswith("prometheus_rule_group_iterations_missed_total{"):
                wanted["missed"] = wanted.get("missed", 0.0) + float(line.rsplit(" ", 1)[1])
            elif line.startswith("prometheus_rule_group_last_duration_seconds{"):
                group = re.search(r'rule_group="[^"]*;([^"]+)"', line).group(1)
                wanted["rule:" + group] = float(line.rsplit(" ", 1)[1])
    return wanted


def query(url: str, expr: str) -> float | None:
    with urllib.request.urlopen(url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}), timeout=60) as r:
        result = json.loads(r.read())["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def rule_expressions() -> list[str]:
    import yaml

    return [rule["expr"] for name in ("recording-rules.yaml", "alerts.yaml")
            for group in yaml.safe_load((ROOT / "alerts" / name).read_text())["groups"] for rule in group["rules"]]


def rule_cost(url: str) -> tuple[float, float]:
    """Samples read and Prometheus CPU seconds spent evaluating every rule expression once, through the query
    API, with scraping and rule evaluation switched off (so the CPU is the queries' own, whatever else
    the machine runs)."""
    samples = 0.0
    cpu_before = read_self_metrics(url)["process_cpu_seconds_total"]
    for expr in rule_expressions():
        params = urllib.parse.urlencode({"query": expr, "stats": "all"})
        with urllib.request.urlopen(url + "/api/v1/query?" + params, timeout=120) as r:
            stats = json.loads(r.read())["data"]["stats"]
        samples += stats["samples"]["totalQueryableSamples"]
    return samples, read_self_metrics(url)["process_cpu_seconds_total"] - cpu_before


@dataclass
class Run:
    pods: int
    head_series: float
    rss_mb: float
    rule_ms: dict[str, tuple[float, float]]  # group -> (median, max) of the last evaluation duration, ms
    up: float
    scraped_per_target: float
    recorded: float
    samples_per_cycle: float  # samples all rule expressions read once (machine-independent cost)
    cycle_cpu: float  # Prometheus CPU seconds those queries took
    missed: float  # rule-group iterations Prometheus skipped because the previous one overran
    data_seconds: float  # how much history the [5m] windows had at the end (the run's length, at most 300)
    cpu_cores: float  # Prometheus's CPU seconds per second over the steady part
    load: float  # median 1-minute load average of the machine during the steady part


async def run_one(page: Page, pods: int, duration: float, interval: int, prometheus: str) -> Run:
    started = time.monotonic()
    runner = web.AppRunner(pods_app(page, pods, started, interval), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=2048).start()
    port = runner.addresses[0][1]
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-fleet-{pods}-"))
    prom_port = free_port()
    url = f"http://127.0.0.1:{prom_port}"
    log = open(workdir / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [prometheus, f"--config.file={write_config(workdir, port, pods, interval)}", "--web.enable-lifecycle",
         f"--storage.tsdb.path={workdir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    samples: list[tuple[float, dict[str, float]]] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                await asyncio.to_thread(urllib.request.urlopen, url + "/-/ready", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Prometheus did not start; see {workdir / 'prometheus.log'}") from None
                await asyncio.sleep(0.3)
        t0 = time.monotonic()
        while (elapsed := time.monotonic() - t0) < duration:
            await asyncio.sleep(interval)
            point = await asyncio.to_thread(read_self_metrics, url)
            point["load"] = os.getloadavg()[0]
            samples.append((elapsed, point))
            print(f"  N={pods} t={elapsed:5.0f}s head={samples[-1][1].get('prometheus_tsdb_head_series', 0):8.0f} "
                  f"rss={samples[-1][1].get('process_resident_memory_bytes', 0) / 2**20:6.0f} MB", flush=True)
        up = await asyncio.to_thread(query, url, 'count(up{job="specdec-sidecar"} == 1)') or 0.0
        scraped = await asyncio.to_thread(query, url, 'avg(scrape_samples_scraped{job="specdec-sidecar"})') or 0.0
        recorded = await asyncio.to_thread(
            query, url, 'count({__name__=~"namespace_.*:.*|specdec:.*"})') or 0.0
        missed = (await asyncio.to_thread(read_self_metrics, url)).get("missed", 0.0)
        data_seconds = min(300.0, time.monotonic() - t0)
        write_config(workdir, port, pods, interval, idle=True)
        await asyncio.to_thread(urllib.request.urlopen, urllib.request.Request(url + "/-/reload", method="POST"))
        await asyncio.sleep(2 * interval)  # let a running scrape or evaluation finish
        samples_per_cycle, cycle_cpu = await asyncio.to_thread(rule_cost, url)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        await runner.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)
    timed = [(t, s) for t, s in samples if t >= duration / 3] or samples
    steady = [s for _, s in timed]
    (t_first, first), (t_last, last) = timed[0], timed[-1]
    cpu = ((last.get("process_cpu_seconds_total", 0.0) - first.get("process_cpu_seconds_total", 0.0))
           / (t_last - t_first)) if t_last > t_first else float("nan")
    groups = sorted({k[5:] for s in steady for k in s if k.startswith("rule:")})
    rule_ms = {}
    for group in groups:
        values = [s["rule:" + group] * 1000 for s in steady if "rule:" + group in s]
        rule_ms[group] = (statistics.median(values), max(values))
    return Run(
        pods=pods,
        head_series=steady[-1].get("prometheus_tsdb_head_series", 0.0),
        rss_mb=max(s.get("process_resident_memory_bytes", 0.0) for s in steady) / 2**20,
        rule_ms=rule_ms,
        up=up,
        scraped_per_target=scraped,
        recorded=recorded,
        samples_per_cycle=samples_per_cycle,
        cycle_cpu=cycle_cpu,
        missed=missed,
        data_seconds=data_seconds,
        cpu_cores=cpu,
        load=statistics.median(s["load"] for s in steady),
    )


def table(runs: list[Run], page_series: int, interval: int, duration: float) -> str:
    groups = sorted({g for r in runs for g in r.rule_ms})
    head = ["pods", "targets up", "samples per scrape", "head series", "head series per pod", "recorded series",
            *[f"`{g}` eval ms (median / max)" for g in groups], "missed rule iterations",
            "samples read per rule cycle", "Prometheus CPU s per rule cycle",
            "Prometheus CPU (cores)",
            "Prometheus RSS (peak, MB)", "RSS per head series", "machine load (1 min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        row = [str(r.pods), f"{r.up:.0f}", f"{r.scraped_per_target:.0f}", f"{r.head_series:,.0f}",
               f"{r.head_series / r.pods:.0f}", f"{r.recorded:.0f}",
               *[f"{r.rule_ms[g][0]:.1f} / {r.rule_ms[g][1]:.1f}" if g in r.rule_ms else "—" for g in groups],
               f"{r.missed:.0f}", f"{r.samples_per_cycle / 1e6:.2f} M", f"{r.cycle_cpu:.2f}",
               f"{r.cpu_cores:.2f}", f"{r.rss_mb:.0f}", f"{r.rss_mb * 2**20 / max(r.head_series, 1) / 1024:.1f} KB",
               f"{r.load:.1f}"]
        lines.append("| " + " | ".join(row) + " |")
    version = subprocess.run([shutil.which("prometheus") or "prometheus", "--version"], capture_output=True,
                             text=True).stdout.splitlines()[0]
    note = (f"Page: {page_series} sample lines. {version}; scrape and evaluation every {interval} s; "
            f"{duration:.0f} s per run, figures over the last two thirds; {os.cpu_count()} cores "
            f"({platform.machine()}), shared with the page server. A rule cycle is every rule expression "
            f"evaluated once through the query API with scraping and rules switched off, over "
            f"{min(runs[0].data_seconds, 300):.0f} s of history (a full [5m] window reads up to "
            f"{300 / min(runs[0].data_seconds, 300):.1f}x the samples).")
    return "\n".join(lines) + "\n\n" + note + "\n"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", default="50,200,500", help="comma-separated fleet sizes")
    parser.add_argument("--duration", type=float, default=150.0, help="seconds per fleet size")
    parser.add_argument("--interval", type=int, default=5, help="scrape and rule evaluation interval, seconds")
    parser.add_argument("--write", type=Path, help="replace the bench_fleet block in this Markdown file")
    args = parser.parse_args()
    try:
        sizes = [int(p) for p in args.pods.split(",")]
        if not sizes or min(sizes) < 1 or args.duration < 3 * args.interval or args.interval < 1:
            raise ValueError
    except ValueError:
        parser.exit(2, f"{parser.prog}: invalid setting --pods/--duration/--interval\n")
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        parser.exit(2, f"{parser.prog}: prometheus is not installed (make system-deps)\n")

    text = await capture_page()
    page = Page.parse(text)
    print(f"captured a sidecar page of {len(page.samples)} sample lines", flush=True)
    runs = []
    for pods in sizes:
        runs.append(await run_one(page, pods, args.duration, args.interval, prometheus))
    result = table(runs, len(page.samples), args.interval, args.duration)
    print("\n" + result)
    if args.write:
        doc = args.write.read_text()
        block = f"{BEGIN}\n{result}{END}"
        if BEGIN in doc and END in doc:
            doc = doc[: doc.index(BEGIN)] + block + doc[doc.index(END) + len(END):]
        else:
            doc = doc.rstrip("\n") + "\n\n" + block + "\n"
        args.write.write_text(doc)
        print(f"written to {args.write}")


if __name__ == "__main__":
    asyncio.run(main())
