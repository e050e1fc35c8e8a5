"""The calibrated verdict on a real vLLM, end to end: calibrate with ``measure``, then judge live traffic with and
without the calibration, then check the verdict against a paired measurement of that same traffic.

1. Two real vLLM servers (CPU build, the project's tiny target): n-gram speculation (k = 4) and none.
2. ``specdec-sidecar measure`` on both (``--calibrate-*`` grid) writes ``calibration.json``.
3. Two sidecars in a chain in front of the speculative server, so both taps see every request and both poll
   the same vLLM: client -> uncalibrated sidecar's proxy -> calibrated sidecar's proxy -> vLLM.
4. The workload (``--prompts`` at ``--temperature``, ``--clients`` at a time) runs for ``--seconds``; then both
   sidecars' verdicts, acceptance, break-even and modelled speed-up are read from their /metrics.
5. A paired ``measure`` of the same workload (same prompts, temperature and concurrency) gives the measured
   speed-up and its 95% interval.

Everything binds to 127.0.0.1 and is stopped at the end. The summary goes to ``--out/summary.json`` and the
terminal. Takes about 10 minutes on 2 cores.

    .venv/bin/python tools/calibrated_verdict.py --out calibrated-run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from devstack.vllm_server import VllmServer, free_port, ngram_config  # noqa: E402
from sidecar.commands.measure_prompts import builtin  # noqa: E402
from sidecar.upstream.exposition import parse  # noqa: E402

MODEL = "tiny-target"
MAX_TOKENS = [96]  # --max-tokens, for the workload and both measure runs
READ = frozenset({
    "specdec_verdict", "specdec_spec_decode_draft_acceptance_rate", "specdec_break_even_acceptance_rate",
    "specdec_modelled_speedup", "specdec_calibration_info", "specdec_requests_running",
    "specdec_recommended_schedule_info", "specdec_bucket_verdict", "specdec_bucket_acceptance_rate",
    "specdec_bucket_modelled_speedup",
})


def measure(spec: str, baseline: str, out: Path, prompts: str, temperatures: str, concurrency: str,
            requests: int) -> dict:
    cmd = [sys.executable, "-m", "sidecar", "measure", "--url", spec, "--baseline-url", baseline,
           "--method", "ngram", "--prompts", prompts, "--temperatures", temperatures, "--concurrency", concurrency,
           "--requests", str(requests), "--warmup", "2", "--rounds", "2", "--max-tokens", str(MAX_TOKENS[0]),
           "--out", str(out),
           "--no-plots"]
    print("+", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)
    return json.loads((out / "results.json").read_text())


def sidecar(upstream: str, metrics_port: int, proxy_port: int, calibration: Path | None, log: Path,
            windows: str = "1m,2m") -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sidecar", "serve", "--upstream", upstream, "--metrics-host", "127.0.0.1",
           "--metrics-port", str(metrics_port), "--proxy-host", "127.0.0.1", "--proxy-port", str(proxy_port),
           "--scrape-interval", "2s", "--windows", windows, "--verdict-window", windows.split(",")[-1],
           "--min-drafts", "100",
           "--models", MODEL, "--log-format", "json"]
    if calibration is not None:
        cmd += ["--calibration", str(calibration)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_ready(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"sidecar on :{port} not ready")


def workload(base: str, temperature: float | list[float], prompts: str, clients: int,
             seconds: float, requests: int | None = None) -> tuple[int, int]:
    """*clients* closed-loop clients for *seconds* (or until *requests* were sent, as ``measure``'s cells);
    with several temperatures, each request takes the next one."""
    chosen = builtin(prompts)
    temperatures = temperature if isinstance(temperature, list) else [temperature]
    stop = time.monotonic() + seconds
    done = [0, 0]  # answered, failed
    sent = [0]
    lock = threading.Lock()

    def take() -> bool:
        with lock:
            if requests is not None and sent[0] >= requests:
                return False
            sent[0] += 1
            return True

    def client(i: int) -> None:
        n = i
        while time.monotonic() < stop and take():
            prompt = chosen[n % len(chosen)]
            body = {"model": MODEL, **prompt.body(), "max_tokens": MAX_TOKENS[0],
                    "temperature": temperatures[(n // len(chosen)) % len(temperatures)]}
            req = urllib.request.Request(base + prompt.path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=120) as r:
                    r.read()
                ok = 0
            except OSError:
                ok = 1
            with lock:
                done[ok] += 1
            n += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return done[0], done[1]


def read_page(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        samples = parse(r.read().decode(), READ).samples
    out: dict = {"buckets": {}}
    for s in samples:
        if s.label("model") != MODEL:
            continue
        bucket = s.label("temperature_bucket")
        if s.name == "specdec_verdict" and s.value == 1:
            out["verdict"] = s.label("verdict")
        elif s.name == "specdec_spec_decode_draft_acceptance_rate":
            out["acceptance"] = s.value
        elif s.name == "specdec_break_even_acceptance_rate":
            out["break_even"] = s.value
        elif s.name == "specdec_modelled_speedup":
            out["modelled_speedup"] = s.value
        elif s.name == "specdec_calibration_info":
            out["source"] = s.label("source")
        elif s.name == "specdec_requests_running":
            out["running"] = s.value
        elif s.name == "specdec_recommended_schedule_info":
            out["schedule"] = s.label("schedule")
        elif s.name == "specdec_bucket_verdict" and s.value == 1:
            out["buckets"].setdefault(bucket, {})["verdict"] = s.label("verdict")
        elif s.name == "specdec_bucket_acceptance_rate":
            out["buckets"].setdefault(bucket, {})["acceptance"] = s.value
        elif s.name == "specdec_bucket_modelled_speedup":
            out["buckets"].setdefault(bucket, {})["modelled_speedup"] = s.value
    return out


def schedule_check(spec: str, calibration: Path, args: argparse.Namespace, processes: list) -> dict:
    """The calibration's workload live, level by level, through a sidecar that loads the calibration: the k
    schedule it recommends from the live acceptance at each load beside the one measure derived offline."""
    from sidecar.calibration import load as load_calibration
    from sidecar.decision import speculation_schedule

    model_cal = load_calibration(calibration).models[MODEL]
    offline = speculation_schedule([(level.concurrency, level.best_k) for level in model_cal.levels])
    metrics, proxy = free_port(), free_port()
    # a longest window that holds every level's traffic when the last level ends
    processes.append(sidecar(spec, metrics, proxy, calibration, args.out / "sidecar-schedule.log",
                             windows="1m,1h"))
    wait_ready(metrics)
    temperatures = [float(t) for t in args.calibrate_temperatures.split(",")]
    levels = []
    for level in model_cal.levels:
        answered = 0
        for temperature in temperatures:  # one temperature at a time, as measure's cells
            answered += workload(f"http://127.0.0.1:{proxy}", temperature, args.calibrate_prompts,
                                 int(level.concurrency), 1200.0, requests=args.schedule_check)[0]
        levels.append({"concurrency": level.concurrency, "answered": answered,
                       "draft_cost": level.draft_cost, "measure_best_k": level.best_k})
    time.sleep(5)  # two more polls, so the last interval is in the profile
    page = read_page(metrics)
    live = json.loads(page["schedule"]) if page.get("schedule") else None
    return {"measure_schedule": offline, "live_schedule": live, "agree": live == offline, "levels": levels,
            "page": page}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("calibrated-run"))
    parser.add_argument("--calibrate-prompts", default="code")
    parser.add_argument("--calibrate-temperatures", default="0,0.3,1")
    parser.add_argument("--calibrate-concurrency", default="1,4")
    parser.add_argument("--calibrate-requests", type=int, default=16)
    parser.add_argument("--prompts", default="code", help="the live workload's prompt set")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--confirm-requests", type=int, default=32)
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens of the n-gram server")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--calibrate-only", action="store_true",
                        help="stop after step 2 (e.g. to record a calibration for the demo's server)")
    parser.add_argument("--calibration", type=Path,
                        help="use this calibration.json (written by measure for the same server) instead of step 2")
    parser.add_argument("--schedule-check", type=int, default=0, metavar="REQUESTS",
                        help="instead of steps 3-5: replay the calibration workload live through a calibrated "
                             "sidecar at each calibrated concurrency (REQUESTS per temperature and level, the "
                             "temperatures in turn, as measure's cells) and compare the sidecar's live k schedule "
                             "with measure's")
    args = parser.parse_args(argv)
    MAX_TOKENS[0] = args.max_tokens
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"workload": {"prompts": args.prompts, "temperature": args.temperature, "clients": args.clients,
                                  "seconds": args.seconds}}
    spec = VllmServer(speculative=ngram_config(args.k), log_path=args.out / "vllm-spec.log")
    base = VllmServer(per_request_metrics=False, log_path=args.out / "vllm-baseline.log")
    processes: list[subprocess.Popen] = []
    try:
        spec.start()
        if args.calibration is None or not args.schedule_check:  # the schedule check needs no baseline
            base.start()
        print(f"vLLM up: spec {spec.url}, baseline {base.url if base._proc is not None else '(not needed)'}", flush=True)
        if args.calibration is None:
            calibrate = measure(spec.url, base.url, args.out / "calibrate", args.calibrate_prompts,
                                args.calibrate_temperatures, args.calibrate_concurrency, args.calibrate_requests)
            calibration = args.out / "calibrate" / "calibration.json"
            summary["calibrate_schedule"] = (calibrate.get("break_even_fit") or {}).get("schedule")
        else:
            calibration = args.calibration
        summary["calibration"] = json.loads(calibration.read_text())
        if args.calibrate_only:
            return write_summary(args.out, summary)
        if args.schedule_check:
            summary["schedule_check"] = schedule_check(spec.url, calibration, args, processes)
            return write_summary(args.out, summary)

        a_metrics, a_proxy, b_metrics, b_proxy = (free_port() for _ in range(4))
        processes.append(sidecar(spec.url, a_metrics, a_proxy, calibration, args.out / "sidecar-calibrated.log"))
        processes.append(sidecar(f"http://127.0.0.1:{a_proxy}", b_metrics, b_proxy, None,
                                 args.out / "sidecar-default.log"))
        wait_ready(a_metrics)
        wait_ready(b_metrics)
        result: list = []
        clients = threading.Thread(target=lambda: result.append(workload(
            f"http://127.0.0.1:{b_proxy}", args.temperature, args.prompts, args.clients, args.seconds)))
        clients.start()
        # Read both pages while the load still runs: the calibrated break-even is read at vLLM's current load.
        time.sleep(max(0.0, args.seconds - 5))
        summary["calibrated_sidecar"] = read_page(a_metrics)
        summary["default_sidecar"] = read_page(b_metrics)
        clients.join()
        answered, failed = result[0]
        summary["requests"] = {"answered": answered, "failed": failed}
        for p in processes:
            p.terminate()
            p.wait(timeout=10)
        processes.clear()

        confirm = measure(spec.url, base.url, args.out / "confirm", args.prompts, f"{args.temperature:g}",
                          str(args.clients), args.confirm_requests)
        cell = next(c for c in confirm["cells"] if c["server"] == "spec")
        summary["confirm"] = {"acceptance_rate": cell["acceptance_rate"], "speedup": cell["speedup"]}
    finally:
        for p in processes:
            p.terminate()
        base.stop()
        spec.stop()
    return write_summary(args.out, summary)


def write_summary(out: Path, summary: dict) -> int:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "calibration"}, indent=2))
    print(json.dumps(summary["calibration"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
