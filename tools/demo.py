"""``make demo``: one workload where speculative decoding pays and one where it does not, on a real vLLM.

Starts a real vLLM (CPU build) serving models/tiny-target with n-gram (prompt-lookup) speculation (k=4,
lookup 2..4) and per-request speculative metrics, the sidecar (proxy + metrics) in front of it, and two kinds
of traffic side by side:

* "repeat this code" prompts at temperature 0: the drafter finds the continuation in the context and most
  drafts are accepted, so the ``0`` bucket's verdict is ``use``;
* free-form code prompts at temperature 1.0: sampled tokens rarely match a looked-up draft, so the
  ``0.7-1.0`` bucket's verdict is ``disable`` and SpecDecodeTemperatureBucketBelowBreakEven fires for it
  alone (with Prometheus and Alertmanager installed).

Then shows ``specdec-sidecar top``. Ctrl-C stops everything; no process is left behind.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack.alerting_stack import AlertingStack  # noqa: E402
from sidecar.commands.top import run_top  # noqa: E402
from devstack.vllm_server import VllmServer, free_port, ngram_config  # noqa: E402
from sidecar.commands.measure_prompts import builtin as builtin_prompts  # noqa: E402

# (prompt set, temperature): the slice where speculation pays, the slice where it does not. They take turns
# every PHASE_SECONDS: on vLLM 0.32's CPU build a greedy request that shares a batch with sampled ones
# accepts far fewer drafts (seen here: ~76% alone, under 10% in mixed batches), so
# interleaving them request by request would show two bad slices instead of one good and one bad.
SLICES = [("echo", 0.0), ("code", 1.0)]
PHASE_SECONDS = 10.0
# The demo server's calibration, as `specdec-sidecar measure` wrote it for this very configuration (tiny target,
# n-gram k = 4, echo prompts at temperatures 0 and 1, concurrency 1 and 4, against a server without speculation,
# on a 2-core machine of this kind; the command and the figures are in docs/measure.md). The sidecar judges the
# model by its modelled speed-up at the current load, and each temperature bucket by the draft cost measured at
# its own temperatures; top prints a line for every verdict that differs from the fixed 0.5 rule (or one saying
# none does). Measure your own before trusting it.
CALIBRATION = ROOT / "devstack" / "tiny-target-ngram-k4.calibration.json"


def say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def load(proxy: str, stop: threading.Event, concurrency: int) -> None:
    """The two slices in turns until *stop*, streamed and not, completions and chat; errors never fatal."""
    prompts = {name: [p.prompt for p in builtin_prompts(name)] for name, _ in SLICES}

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            name, temperature = SLICES[int(time.monotonic() // PHASE_SECONDS) % len(SLICES)]
            prompt = rng.choice(prompts[name])
            body: dict = {"model": "tiny-target", "max_tokens": 96, "temperature": temperature,
                          "stream": rng.random() < 0.5}
            if rng.random() < 0.5:
                path = "/v1/chat/completions"
                body["messages"] = [{"role": "user", "content": prompt}]
            else:
                path = "/v1/completions"
                body["prompt"] = prompt
            request = urllib.request.Request(proxy + path, data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    response.read()
            except (urllib.error.URLError, OSError, http.client.HTTPException):
                # vLLM or the sidecar going away mid-answer (as at the demo's end): a cut-off body
                stop.wait(1.0)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()


class PagerDutySink:
    """A loopback stand-in for PagerDuty's Events API v2 (and the warning webhook): accepts and counts."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        sink = self
        self.events: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    sink.events.append(json.loads(body))
                except ValueError:
                    pass
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self._server.shutdown()


def wait_http(url: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.3)
    return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--once-after", type=float, default=0.0,
                        help="instead of the live view, print one frame after this many seconds and exit")
    args = parser.parse_args()

    state = ROOT / ".cache" / "demo"
    state.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()
    children: list[subprocess.Popen] = []
    vllm = VllmServer(
        model=ROOT / "models" / "tiny-target",
        speculative=ngram_config(k=4),
        log_path=state / "vllm.log",
        startup_timeout=400,
    )

    stopping: list = []

    def shutdown(*_: object) -> None:
        stop.set()
        for step in reversed(stopping):
            try:
                step()
            except Exception as error:  # noqa: BLE001 — keep stopping the rest
                say(f"while stopping: {error}")
        for child in children:
            if child.poll() is None:
                try:
                    os.killpg(child.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for child in children:
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
        vllm.stop()

    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        say(f"starting vLLM: tiny target, n-gram speculation (k=4); 35-100 s on 2 cores; log: {state / 'vllm.log'}")
        started = time.monotonic()
        vllm.start()
        say(f"vLLM ready on {vllm.url} after {time.monotonic() - started:.0f} s")

        proxy_port, metrics_port = free_port(), free_port()
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "serve", "--upstream", vllm.url, "--proxy-port", str(proxy_port),
             "--proxy-host", "127.0.0.1", "--metrics-host", "127.0.0.1", "--metrics-port", str(metrics_port),
             "--scrape-interval", "2s", "--scrape-timeout", "2s", "--windows", "1m,5m", "--verdict-window", "1m",
             "--min-drafts", "20", "--log-format", "console", "--log-level", "warning",
             *(["--calibration", str(CALIBRATION)] if CALIBRATION.exists() else [])],
            cwd=ROOT, start_new_session=True, stderr=open(state / "sidecar.log", "ab"),
        )
        children.append(sidecar)
        metrics = f"http://127.0.0.1:{metrics_port}/metrics"
        if not wait_http(f"http://127.0.0.1:{metrics_port}/readyz", 30):
            say(f"the sidecar did not become ready; see {state / 'sidecar.log'}")
            return 1
        say(f"sidecar: proxy http://127.0.0.1:{proxy_port} -> vLLM, metrics {metrics}")
        if CALIBRATION.exists():
            say(f"calibration: {CALIBRATION.relative_to(ROOT)} (measure's draft cost for this server per load): "
                "verdicts by modelled speed-up; top says which verdicts it changed against the fixed 0.5 rule")
        say(f"load: {args.concurrency} clients, taking turns every {PHASE_SECONDS:.0f} s: 'repeat this code' at "
            "temperature 0 (expect `use`), then free-form code at temperature 1.0 (expect `disable`)")
        load(f"http://127.0.0.1:{proxy_port}", stop, args.concurrency)
        alertmanager = None
        if AlertingStack.available():
            sink = PagerDutySink()
            stack = AlertingStack(
                workdir=state / "alerting", targets=[f"127.0.0.1:{metrics_port}"],
                pagerduty_url=sink.url + "/v2/enqueue", webhook_url=sink.url + "/warnings",
            )
            stopping.append(stack.stop)
            stopping.append(sink.stop)
            stack.start()
            alertmanager = stack.alertmanager_url
            say(f"Prometheus {stack.prometheus_url} and Alertmanager {alertmanager} run a DEMO COPY of the "
                "project's rules with 30s windows and 5s `for:` (shipped: 5m windows, 10-30m `for:`) so alerts show "
                "within a minute or two; pages go to a loopback stand-in for PagerDuty")
        else:
            say("Prometheus/Alertmanager not installed (apt-get install prometheus prometheus-alertmanager); "
                "running without alerts")
        if args.once_after:
            time.sleep(args.once_after)
            return run_top(metrics, 2.0, 600.0, once=True, alertmanager=alertmanager)
        say("starting top; Ctrl-C stops everything")
        time.sleep(2)
        return run_top(metrics, 2.0, 60.0, once=False, alertmanager=alertmanager)
    except KeyboardInterrupt:
        return 0
    finally:
        say("stopping")
        shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
