"""The baseline arm on real vLLM: live ratios from Prometheus beside a paired ``measure`` of the same two servers.

1. Two real vLLM servers (CPU build, the project's tiny target): n-gram speculation (k = 4, with per-request
   metrics) and none (the baseline arm, without ``--per-request-spec-decode-metrics``, which vLLM refuses
   there). Each computes on a core of its own (``--cpus``), as two replicas have a machine each: sharing the
   cores, each server's compute slows down by how busy the other is, and the two arms are then compared at
   different speeds of the machine, unlike in ``measure``, which runs them in turn. Both wait on their step
   queues without spinning (devstack/no_busy_poll; ``--busy-poll`` to keep vLLM's spin): spinning, two CPU
   servers on 2 cores take the cores from each other and one arm starves for whole phases.
2. One sidecar in front of each (``--speculative auto``: each detects its arm from vLLM's page), proxies on
   their own ports, as two pods behind one Service.
3. A real Prometheus scraping both (labels ``namespace``, ``pod``) with the shipped rule files, copied with
   shorter windows: every ``[5m]`` and ``[30m]`` becomes ``--window``, every ``for:`` becomes ``--for``, and
   the per-arm minimum ``specdec:baseline_min_requests:threshold`` becomes ``--min-requests`` (the shipped
   files are unchanged).
4. A load generator: ``--clients-per-server`` x 2 clients in a closed loop, each request streamed to one of
   the two proxies chosen at random (as a Service spreads it), the echo prompts at temperature 0 and at
   ``--hot-temperature`` taking turns every ``--turn`` seconds (on vLLM 0.32's CPU build a greedy request
   sharing a batch with sampled ones accepts far fewer drafts; ``--mix random`` mixes them request by
   request instead). Per level, ``--phase`` seconds; at the end of each, while the load still runs, the
   window holds that level alone and the recorded ratios, counts, load per replica and firing alerts are read.
5. ``specdec-sidecar measure`` of the same two servers: the same prompts, temperatures, max_tokens, with each
   server at the per-server concurrency of the levels (a level of C clients per server sends 2C clients over
   both): TPOT speed-up (baseline P50 / speculative P50, the statistic the rules record) with its 95% interval.
6. An arm disappearing: the baseline's sidecar is stopped; the ratios must be absent and no new alert may
   fire.

Everything binds to 127.0.0.1 and is stopped at the end. Writes ``--out/summary.json`` and prints a table.
Run under the machine-wide lock, one heavy run at a time:

    flock /tmp/heavy.lock .venv/bin/python tools/baseline_proof.py --out baseline-run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devstack.alerting_stack import LoopbackPrometheus as Prometheus  # noqa: E402
from devstack.vllm_server import VllmServer, free_port, ngram_config  # noqa: E402
from sidecar.buckets import TemperatureBuckets  # noqa: E402
from sidecar.commands.measure_prompts import builtin  # noqa: E402
from sidecar.config import parse_duration  # noqa: E402
from sidecar.decision import sample_quantile  # noqa: E402

MODEL = "tiny-target"
NAMESPACE = "proof"
PODS = {"speculative": "vllm-spec-0", "baseline": "vllm-baseline-0"}
RATIOS = ("tpot:p50", "tpot:p99", "ttft:p50", "ttft:p99")


def rules_copy(text: str, window: str, for_: str, min_requests: int) -> str:
    """A test copy of a shipped rule file: shorter windows and ``for:``, the per-arm minimum changed."""
    text = re.sub(r"\[(5m|30m)\]", f"[{window}]", text)
    text = re.sub(r"for: \d+m", f"for: {for_}", text)
    # the minimum is the one `vector(100)` under its record name; nothing else in the files is vector(100)
    text, n = re.subn(r"(record: specdec:baseline_min_requests:threshold\n\s+expr: )vector\(\d+\)",
                      rf"\g<1>vector({min_requests})", text)
    if "record: specdec:baseline_min_requests:threshold" in text and n != 1:
        raise ValueError("the baseline minimum rule changed shape")
    return text


class PinnedVllm(VllmServer):
    """A vLLM server whose compute threads have a core of their own (``VLLM_CPU_OMP_THREADS_BIND``): two replicas
    are two machines, and by default vLLM's CPU build binds its threads to every core, so two servers on 2 cores
    slow each other down in the live run and not in ``measure``, which runs them in turn (seen: with both on
    both cores the live arms' TPOTs were 1.3x and 1.8x ``measure``'s, and the greedy ratio 1.80 live against
    1.29; each on its own core, 1.46 against 1.52). With
    ``whole=True`` every process of the server is confined to that core (``taskset``); its API server then
    competes with its own compute (seen: the baseline's TPOT 5x what ``measure`` found, next to a sidecar, a
    load generator and Prometheus)."""

    def __init__(self, cpu: str, whole: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.cpu = cpu
        self.whole = whole

    def command(self) -> list[str]:
        return ["taskset", "-c", self.cpu, *super().command()] if self.cpu and self.whole else super().command()

    def environment(self) -> dict[str, str]:
        # in the server's own environment, not this process's: start_servers starts both at once, in threads
        env = super().environment()
        if self.cpu:
            env["VLLM_CPU_OMP_THREADS_BIND"] = self.cpu
        return env


class SidecarProc:
    """``python -m sidecar serve`` in front of one vLLM, as in its pod."""

    def __init__(self, upstream: str, log: Path, speculative: str = "auto") -> None:
        self.metrics_port, self.proxy_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "sidecar", "serve", "--upstream", upstream, "--metrics-host", "127.0.0.1",
               "--metrics-port", str(self.metrics_port), "--proxy-host", "127.0.0.1", "--proxy-port",
               str(self.proxy_port), "--scrape-interval", "1s", "--models", MODEL, "--speculative", speculative]
        self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/readyz", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("sidecar not ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


async def load(proxies: dict[str, str], clients: int, seconds: float, temperatures: tuple[float, ...], turn: float,
               mix: str, max_tokens: int, seed: int, routing: str = "random",
               timings: list[tuple[str, float, float, float]] | None = None,
               spans: list[list] | None = None) -> Counter:
    """*clients* closed-loop clients for *seconds*. ``random``: each request to a random arm, as a Service
    spreads them (the slower arm then holds more of the clients: Little's law); ``balanced``: half the
    clients to each arm, so both run at the same concurrency, as ``measure`` compares them. Returns answered
    requests per (arm, temperature) and failures; appends (arm, temperature, finished at, TPOT as this client
    received the tokens, the way ``measure`` times them) to *timings*, and [arm, temperature, started, ended] of
    every request to *spans* (ended None while it runs)."""
    import aiohttp

    from sidecar.commands.measure import client_tpot
    from sidecar.tap.observe import Outcome, SseObserver

    prompts = builtin("echo")
    rng = random.Random(seed)
    done: Counter = Counter()
    start = time.monotonic()
    deadline = start + seconds
    arms = sorted(proxies)

    async def client(session: aiohttp.ClientSession, c: int) -> None:
        i = c
        while time.monotonic() < deadline:
            if mix == "random":
                temperature = rng.choice(temperatures)
            else:
                temperature = temperatures[int((time.monotonic() - start) / turn) % len(temperatures)]
            arm = rng.choice(arms) if routing == "random" else arms[c % len(arms)]
            prompt = prompts[i % len(prompts)]
            body = {"model": MODEL, **prompt.body(), "max_tokens": max_tokens, "temperature": temperature,
                    "stream": True, "stream_options": {"include_usage": True}}
            observer, outcome = SseObserver(), Outcome()
            span = [arm, temperature, time.monotonic(), None]
            if spans is not None:
                spans.append(span)
            try:
                async with session.post(proxies[arm] + prompt.path, json=body) as r:
                    async for chunk in r.content.iter_any():
                        observer.feed(chunk, time.monotonic(), outcome)
                    now = time.monotonic()
                    observer.finish(now, outcome)
                    done[(arm, temperature) if r.status == 200 else ("failed", r.status)] += 1
                    tpot = client_tpot(outcome)
                    if r.status == 200 and tpot is not None and timings is not None:
                        timings.append((arm, temperature, now, tpot))
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                done[("failed", type(error).__name__)] += 1
            span[3] = time.monotonic()
            i += clients

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(client(session, c) for c in range(clients)))
    return done


def read_level(prom: Prometheus) -> dict:
    """The recorded baseline series and firing alerts now, per bucket."""
    out: dict = {"buckets": {}, "model": {}, "running": {}, "alerts": []}
    for ratio in RATIOS:
        metric, q = ratio.split(":")
        for level, key in (("namespace_model_temperature_bucket", "buckets"), ("namespace_model", "model")):
            for r in prom.query(f"{level}:specdec_speedup_vs_baseline_{metric}:{q}"):
                value = float(r["value"][1])
                if key == "buckets":
                    out["buckets"].setdefault(r["metric"]["temperature_bucket"], {})[ratio] = value
                else:
                    out["model"][ratio] = value
    for r in prom.query("namespace_model_temperature_bucket_arm:specdec_streamed_requests:increase30m"):
        out["buckets"].setdefault(r["metric"]["temperature_bucket"], {})[f"requests_{r['metric']['arm']}"] = \
            round(float(r["value"][1]))
    for kind in ("tpot", "ttft"):
        for q in ("p50", "p99"):
            for r in prom.query(f"namespace_model_temperature_bucket_arm:specdec_request_{kind}_seconds:{q}_rate30m"):
                out["buckets"].setdefault(r["metric"]["temperature_bucket"], {})[
                    f"{r['metric']['arm']}_{kind}_{q}_s"] = float(r["value"][1])
    for r in prom.query("namespace_model_arm:specdec_requests_running:avg"):
        out["running"][r["metric"]["arm"]] = float(r["value"][1])
    for r in prom.query("namespace_model_arm:specdec_replicas:count"):
        out.setdefault("replicas", {})[r["metric"]["arm"]] = float(r["value"][1])
    for r in prom.query('ALERTS{alertname=~"SpecDecode.*", alertstate="firing"}'):
        m = r["metric"]
        out["alerts"].append({k: m[k] for k in ("alertname", "temperature_bucket") if k in m})
    return out


def seconds_of(duration: str) -> float:
    """A duration of one unit (``60s``, ``2m``) in seconds: the unit is required, as in PromQL, where the
    window goes too."""
    if not re.fullmatch(r"\d+(?:\.\d+)?(?:ms|s|m|h)", duration):
        raise ValueError(f"not a duration: {duration!r}")
    return parse_duration(duration)


def mean_in_flight(spans: list[list], start: float, end: float) -> dict[str, dict[str, float]]:
    """The load each arm really carried over [start, end], from this load generator's own requests (vLLM's running
    gauge is a sample at each poll): per bucket, each arm's requests of that bucket in flight, averaged over the
    time any request of the bucket was in flight (with temperature turns, over the bucket's turns); under
    ``model``, all requests averaged over the whole window. A Service's random spread gives the arm that is
    slower for a bucket more of that bucket's clients."""
    buckets = TemperatureBuckets()
    busy: dict[str, dict[str, float]] = {}
    intervals: dict[str, list[tuple[float, float]]] = {}
    for arm, temperature, began, ended in spans:
        low, high = max(began, start), min(end if ended is None else ended, end)
        if high <= low:
            continue
        for key in (buckets.bucket(temperature), "model"):
            busy.setdefault(key, dict.fromkeys(PODS, 0.0))[arm] += high - low
        intervals.setdefault(buckets.bucket(temperature), []).append((low, high))
    spent = {"model": end - start}
    for bucket, spans_of in intervals.items():  # the union of the bucket's intervals
        total, reach = 0.0, start
        for low, high in sorted(spans_of):
            if high > reach:
                total += high - max(low, reach)
                reach = high
        spent[bucket] = total
    return {key: {arm: seconds / spent[key] for arm, seconds in arms.items()} for key, arms in busy.items()}


def client_quantiles(timings: list[tuple[str, float, float, float]], temperatures: tuple[float, ...]) -> dict:
    """What the load generator itself saw over the rules' window, per bucket: each arm's exact TPOT P50 and P99
    over the requests it received, and the exact P50 ratio. Beside the recorded ratio it tells the histogram's
    share of a difference from ``measure`` (interpolation inside a bucket) from the live arms' own."""
    buckets = TemperatureBuckets()
    out: dict = {}
    for temperature in temperatures:
        bucket = buckets.bucket(temperature)
        row: dict = {}
        for arm in PODS:
            values = [t[3] for t in timings if t[0] == arm and buckets.bucket(t[1]) == bucket]
            row[f"{arm}_requests"] = len(values)
            if values:
                row[f"{arm}_tpot_p50_s"] = sample_quantile(0.5, values)
                row[f"{arm}_tpot_p99_s"] = sample_quantile(0.99, values)
        if "baseline_tpot_p50_s" in row and "speculative_tpot_p50_s" in row:
            row["tpot:p50"] = row["baseline_tpot_p50_s"] / row["speculative_tpot_p50_s"]
            row["tpot:p99"] = row["baseline_tpot_p99_s"] / row["speculative_tpot_p99_s"]
        out[bucket] = row
    return out


def own_cores() -> str:
    """The first two cores this process may run on (``"0,1"`` on a 2-core machine), or ``""`` with fewer."""
    import os

    cores = sorted(os.sched_getaffinity(0))
    return f"{cores[0]},{cores[1]}" if len(cores) >= 2 else ""


def start_servers(out: Path, cpus: str | None = None, whole: bool = False,
                  busy_poll: bool = False) -> tuple[PinnedVllm, PinnedVllm]:
    """The speculative (n-gram, k = 4) and the baseline vLLM, started side by side, each computing on its own core
    of *cpus* (by default ``own_cores()``; "" = vLLM's default binding, both on every core), waiting without
    spinning unless *busy_poll*."""
    import threading

    cpus = own_cores() if cpus is None else cpus
    pinned = cpus.split(",") if cpus else ["", ""]
    spec = PinnedVllm(pinned[0], whole, speculative=ngram_config(4), log_path=out / "vllm-spec.log",
                      busy_poll=busy_poll)
    base = PinnedVllm(pinned[1], whole, speculative=None, log_path=out / "vllm-baseline.log", busy_poll=busy_poll)
    errors: list[BaseException] = []

    def start(server: PinnedVllm) -> None:
        try:
            server.start()
        except BaseException as error:  # noqa: BLE001 (re-raised below, after both tried)
            errors.append(error)

    threads = [threading.Thread(target=start, args=(server,)) for server in (spec, base)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        spec.stop()
        base.stop()
        raise errors[0]
    return spec, base


class Arms:
    """A sidecar in front of each server and a Prometheus scraping both with the shortened rule copies."""

    def __init__(self, spec: VllmServer, base: VllmServer, out: Path, window: str, for_: str, min_requests: int):
        self.window_s = seconds_of(window)
        self.sidecars = {"speculative": SidecarProc(spec.url, out / "sidecar-spec.log"),
                         "baseline": SidecarProc(base.url, out / "sidecar-baseline.log")}
        self.prom: Prometheus | None = None
        try:
            for s in self.sidecars.values():
                s.wait_ready()
            self.prom = Prometheus(out / "prometheus", {PODS[a]: s.metrics_port for a, s in self.sidecars.items()},
                                   lambda text: rules_copy(text, window, for_, min_requests), NAMESPACE)
            self.prom.wait_ready()
            deadline = time.monotonic() + 30
            while arms_seen(self.prom) != {PODS["speculative"]: 1.0, PODS["baseline"]: 0.0}:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"arms not detected: {arms_seen(self.prom)}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    @property
    def proxies(self) -> dict[str, str]:
        return {arm: s.proxy for arm, s in self.sidecars.items()}

    def level(self, clients_per_server: int, seconds: float, temperatures: tuple[float, ...], turn: float, mix: str,
              max_tokens: int, seed: int, routing: str = "random") -> dict:
        """One load level: 2 x *clients_per_server* clients for *seconds*; read 2 s before the end, while the
        load still runs, so the window holds this level alone."""
        assert self.prom is not None
        prom = self.prom

        timings: list[tuple[str, float, float, float]] = []
        spans: list[list] = []

        async def phase() -> tuple[Counter, dict]:
            task = asyncio.create_task(load(self.proxies, 2 * clients_per_server, seconds, temperatures, turn, mix,
                                            max_tokens, seed, routing, timings, spans))
            await asyncio.sleep(seconds - 2)
            read_at = time.monotonic()
            reading = await asyncio.to_thread(read_level, prom)
            reading["client"] = client_quantiles([t for t in timings if t[2] > read_at - self.window_s], temperatures)
            reading["in_flight"] = mean_in_flight(spans, max(read_at - self.window_s, spans[0][2] if spans else 0),
                                                  read_at)
            return await task, reading

        started = time.monotonic()
        sent, reading = asyncio.run(phase())
        reading["clients_per_server"] = clients_per_server
        reading["routing"] = routing
        reading["sent"] = {f"{k[0]}@{k[1]}": v for k, v in sorted(sent.items(), key=str)}
        reading["seconds"] = round(time.monotonic() - started, 1)
        return reading

    def drop_baseline(self, wait: float = 6.0) -> dict:
        """The baseline arm disappears (its sidecar stops): what is recorded and firing before and after."""
        assert self.prom is not None
        before = read_level(self.prom)
        self.sidecars["baseline"].stop()
        time.sleep(wait)
        after = read_level(self.prom)

        def names(reading: dict) -> set[str]:
            return {a["alertname"] + (f"{{{a['temperature_bucket']}}}" if "temperature_bucket" in a else "")
                    for a in reading["alerts"]}

        ratios = {b: {k: v for k, v in d.items() if ":" in k} for b, d in after["buckets"].items()}
        return {
            "ratios_left": {b: r for b, r in ratios.items() if r} | ({"model": after["model"]} if after["model"] else {}),
            "alerts_before": sorted(names(before)), "alerts_after": sorted(names(after)),
            "new_alerts": sorted(names(after) - names(before)), "replicas": after.get("replicas"),
        }

    def stop(self) -> None:
        if self.prom is not None:
            self.prom.stop()
        for s in self.sidecars.values():
            s.stop()


def arms_seen(prom: Prometheus) -> dict[str, float]:
    return {r["metric"]["pod"]: float(r["value"][1]) for r in prom.query("specdec_speculation_enabled")}


def run_measure(spec: str, base: str, out: Path, temperatures: str, concurrency: str, requests: int,
                max_tokens: int) -> dict:
    cmd = [sys.executable, "-m", "sidecar", "measure", "--url", spec, "--baseline-url", base, "--method", "ngram",
           "--prompts", "echo", "--temperatures", temperatures, "--concurrency", concurrency,
           "--requests", str(requests), "--warmup", "2", "--rounds", "2", "--max-tokens", str(max_tokens),
           "--out", str(out), "--no-plots"]
    print("+ specdec-sidecar", " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=False)
    return json.loads((out / "results.json").read_text())


def measured(results: dict) -> dict:
    """measure's TPOT and throughput speed-ups per (bucket, concurrency)."""
    out = {}
    for cell in results["cells"]:
        if cell["server"] != "spec" or not cell.get("speedup"):
            continue
        s = cell["speedup"]
        out[(cell["temperature_bucket"], cell["concurrency"])] = {
            "tpot": s["tpot"], "throughput": s["throughput"], "verdict": s["verdict"],
            "acceptance": cell.get("acceptance_rate"),
        }
    return out


def tpot_verdict(interval: dict, band: float) -> str | None:
    """helps / hurts where the TPOT interval excludes 1 (and the point is outside the band), else neutral."""
    value, low, high = interval.get("value"), interval.get("ci_low"), interval.get("ci_high")
    if value is None or low is None or high is None:
        return None
    if low > 1 and value >= 1 + band:
        return "helps"
    if high < 1 and value <= 1 - band:
        return "hurts"
    return "neutral"


def compare(level: dict, measure_cells: dict, concurrency: int, band: float) -> list[dict]:
    rows = []
    for (bucket, c), m in sorted(measure_cells.items()):
        if c != concurrency:
            continue
        live = level["buckets"].get(bucket, {})
        ratio = live.get("tpot:p50")
        verdict = tpot_verdict(m["tpot"], band)
        live_verdict = None if ratio is None else (
            "helps" if ratio >= 1 + band else "hurts" if ratio <= 1 - band else "neutral")
        rows.append({
            "bucket": bucket, "concurrency_per_server": c, "live_tpot_p50_ratio": ratio,
            "live_tpot_p99_ratio": live.get("tpot:p99"), "live_ttft_p50_ratio": live.get("ttft:p50"),
            "client_tpot_p50_ratio": level.get("client", {}).get(bucket, {}).get("tpot:p50"),
            "in_flight": level.get("in_flight", {}).get(bucket),
            "requests_speculative": live.get("requests_speculative"), "requests_baseline": live.get("requests_baseline"),
            "measure_tpot": m["tpot"], "measure_throughput": m["throughput"], "measure_acceptance": m["acceptance"],
            "measure_tpot_verdict": verdict, "live_verdict": live_verdict,
            "same_verdict": None if verdict in (None, "neutral") else verdict == live_verdict,
            "within_25pct": None if ratio is None or not m["tpot"]["value"]
            else abs(ratio / m["tpot"]["value"] - 1) <= 0.25,
        })
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("baseline-run"))
    parser.add_argument("--clients-per-server", default="1,4", help="load levels, comma separated")
    parser.add_argument("--phase", type=float, default=66.0, help="seconds of load per level and routing")
    parser.add_argument("--window", default="60s", help="rate window of the rule copies (shipped: 5m and 30m)")
    parser.add_argument("--for", dest="for_", default="5s", help="for: of the alert copies")
    parser.add_argument("--min-requests", type=int, default=20, help="per-arm minimum of the rule copies (shipped: 100)")
    parser.add_argument("--hot-temperature", type=float, default=1.0)
    parser.add_argument("--turn", type=float, default=10.0, help="seconds per temperature turn")
    parser.add_argument("--mix", choices=("turns", "random"), default="turns")
    parser.add_argument("--routing", default="random,balanced",
                        help="per level, one phase per routing: random (as a Service) and/or balanced (equal concurrency)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--measure-requests", type=int, default=16, help="measure's requests per cell and server")
    parser.add_argument("--skip-measure", action="store_true")
    parser.add_argument("--band", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpus", default=own_cores(),
                        help="cores the speculative and the baseline server compute on, one each (default: the "
                             "first two this process may use; '' = vLLM's default, every core for both)")
    parser.add_argument("--taskset", action="store_true", help="confine each server's every process to its core")
    parser.add_argument("--busy-poll", action="store_true",
                        help="keep vLLM's spin on its step queues (by default its readers wait without spinning, "
                             "devstack/no_busy_poll: spinning, two servers on a small machine starve each other)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    levels = [int(c) for c in args.clients_per_server.split(",")]
    temperatures = (0.0, args.hot_temperature)
    buckets = TemperatureBuckets()
    summary: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "buckets": {str(t): buckets.bucket(t) for t in temperatures}, "levels": []}
    t0 = time.monotonic()
    spec, base = start_servers(args.out, args.cpus, args.taskset, args.busy_poll)
    arms = None
    try:
        print(f"vLLM up after {time.monotonic() - t0:.0f}s: spec {spec.url}, baseline {base.url}", flush=True)
        arms = Arms(spec, base, args.out, args.window, args.for_, args.min_requests)
        summary["arms_detected"] = arms_seen(arms.prom)
        print(f"arms detected: {summary['arms_detected']}", flush=True)
        for level in levels:
            for routing in args.routing.split(","):
                reading = arms.level(level, args.phase, temperatures, args.turn, args.mix, args.max_tokens,
                                     args.seed + level, routing)
                summary["levels"].append(reading)
                print(json.dumps(reading, indent=1), flush=True)
        if not args.skip_measure:
            results = run_measure(spec.url, base.url, args.out / "measure", ",".join(f"{t:g}" for t in temperatures),
                                  args.clients_per_server, args.measure_requests, args.max_tokens)
            cells = measured(results)
            summary["comparison"] = [row | {"routing": reading["routing"]} for reading in summary["levels"]
                                     for row in compare(reading, cells, reading["clients_per_server"], args.band)]
        # an arm disappears: the baseline's sidecar goes; its counters stay in the window, the ratios must not
        summary["arm_gone"] = arms.drop_baseline()
        print("arm gone:", json.dumps(summary["arm_gone"]), flush=True)
    finally:
        if arms is not None:
            arms.stop()
        spec.stop()
        base.stop()
    summary["seconds"] = round(time.monotonic() - t0)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    for row in summary.get("comparison", []):
        m = row["measure_tpot"]
        live = row["live_tpot_p50_ratio"]
        print(f"bucket {row['bucket']:>8} C/server {row['concurrency_per_server']} {row['routing']:>8}: live TPOT P50 ratio "
              f"{'—' if live is None else f'{live:.2f}'} (exact at the client "
              f"{'—' if row['client_tpot_p50_ratio'] is None else format(row['client_tpot_p50_ratio'], '.2f')}; "
              f"in flight {'/'.join(format(v, '.1f') for v in (row['in_flight'] or {}).values())}; "
              f"requests {row['requests_speculative']}/"
              f"{row['requests_baseline']}); measure TPOT {m['value'] or 0:.2f} [{m['ci_low'] or 0:.2f}-"
              f"{m['ci_high'] or 0:.2f}] {row['measure_tpot_verdict']}; live {row['live_verdict']}; "
              f"same verdict {row['same_verdict']}, within 25% {row['within_25pct']}")
    print(f"done in {summary['seconds']}s; {args.out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
