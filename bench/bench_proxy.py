"""Proxy cost: direct vs through the sidecar vs through nginx, same upstream, one run.

    .venv/bin/python bench/bench_proxy.py [--write docs/benchmarks.md]

Upstream: a minimal asyncio HTTP/1.1 server speaking vLLM's streaming shape (chunked SSE events laid out
as a real vLLM 0.32 chat chunk, ~340 bytes, each stamped with CLOCK_MONOTONIC at the moment it is written). The proxy under test (sidecar or
nginx with buffering off and upstream keep-alive) is pinned to core 0; the upstream and the load generator
share core 1 (on uvloop when it is installed, so they can drive more load). Figures:

* added latency per chunk: receive time - stamp, at 200 concurrent streams (one event every 100 ms each),
  p50/p99 through the proxy minus the same direct;
* added latency per request: a small non-streamed POST, p50/p99 at 32 concurrent, proxy minus direct;
* maximum chunk rate: 64 streams whose upstream writes events back to back, events/s received, and
  events relayed per CPU-second of the proxy process;
* the proxy's CPU per request (the non-streamed phase) and per event (the 200-stream phase, its requests'
  share taken off);
* its CPU share at a busy GPU pod's load, measured: 200 streams of 100 events/s (20 000 chunks/s) and 200
  non-streamed requests/s at once, the proxy's CPU-seconds over the phase's seconds;
* the sidecar's peak RSS over the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devstack.vllm_server import free_port  # noqa: E402
PAD = "x" * 200
# Each event has the field layout of a real vLLM 0.32 chat chunk (tests/fixtures/chat-stream.sse: ~320
# bytes, a short token, usage in every chunk), with the write stamp as its first field. (Runs before
# 2026-11-25 18:30 sent {"t":..,"i":..,"choices":[{"text":"x" * 200}]}: the same size, but a 200-byte run of
# one letter makes CPython's bytes.count, which the tap uses, 5x slower than on real chunks.)
TOKENS = (" the", " model", ",", " and", "\\n", " of", " def", "(")  # "\\n": JSON for a newline
EVENT = ('data: {{"t":{t},"id":"chatcmpl-924a0b139de023f5","object":"chat.completion.chunk","created":1795545098,'
         '"model":"m","choices":[{{"index":0,"delta":{{"content":"{token}"}},"logprobs":null,"finish_reason":null,'
         '"token_ids":null}}],"usage":{{"prompt_tokens":3,"total_tokens":{total},"completion_tokens":{done},'
         '"completion_tokens_details":null}}}}\n\n')


# --- upstream (runs in its own process) ---------------------------------------------------------------

async def upstream_main(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length) if length else b""
                request = json.loads(body) if body else {}
                if not request.get("stream"):
                    payload = json.dumps({"id": "x", "choices": [{"text": PAD}], "usage": {"completion_tokens": 1}})
                    data = payload.encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                                 + str(len(data)).encode() + b"\r\n\r\n" + data)
                    await writer.drain()
                    continue
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunks, gap = int(request.get("chunks", 50)), float(request.get("gap", 0.05))
                if gap:  # streams start out of phase, as real requests do, instead of in lockstep bursts
                    await asyncio.sleep(random.random() * gap)
                for i in range(chunks):
                    if gap:
                        await asyncio.sleep(gap)
                    event = EVENT.format(t=time.monotonic_ns(), token=TOKENS[i % len(TOKENS)], total=4 + i,
                                         done=i + 1).encode()
                    writer.write(f"{len(event):x}\r\n".encode() + event + b"\r\n")
                    await writer.drain()
                    if not gap and i % 4 == 3:
                        await asyncio.sleep(0)
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


# --- load generator (runs in its own process, prints JSON) ---------------------------------------------

async def client_main(url: str, mode: str, concurrency: int, count: float) -> dict:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=300)
    latencies: list[float] = []
    events = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False) as session:
        if mode == "request":
            sem = asyncio.Semaphore(concurrency)

            async def one() -> None:
                async with sem:
                    start = time.monotonic_ns()
                    async with session.post(url, json={"model": "m", "stream": False}) as r:
                        await r.read()
                    latencies.append((time.monotonic_ns() - start) / 1e6)

            await asyncio.gather(*(one() for _ in range(int(count))))
            return {"p50": statistics.median(latencies), "p99": _p(latencies, 0.99), "n": len(latencies)}

        if mode == "pod":  # a busy pod: `concurrency` streams at `count` events/s each, plus requests/s
            return await _pod(session, url, concurrency, count)

        gap = 0.1 if mode == "chunks" else 0.0
        chunks = 30 if mode == "chunks" else int(count)

        async def stream() -> None:
            nonlocal events
            buffer = b""
            body = {"model": "m", "stream": True, "chunks": chunks, "gap": gap}
            async with session.post(url, json=body) as r:
                async for data in r.content.iter_any():
                    now = time.monotonic_ns()
                    buffer += data
                    *complete, buffer = buffer.split(b"\n\n")
                    events += len(complete)
                    if gap:
                        for event in complete:
                            stamp = int(event[11 : event.index(b",")])
                            latencies.append((now - stamp) / 1e6)

        start = time.monotonic()
        await asyncio.gather(*(stream() for _ in range(concurrency)))
        elapsed = time.monotonic() - start
    if gap:
        return {"p50": statistics.median(latencies), "p99": _p(latencies, 0.99), "n": len(latencies)}
    return {"events_per_second": events / elapsed, "events": events, "seconds": elapsed}


POD_SECONDS = 4.0
POD_STREAMS = 200
POD_RATE = 100.0  # events/s per stream: 200 x 100 = 20 000 chunks/s


async def _pod(session, url: str, streams: int, per_stream: float) -> dict:
    """`streams` streams of POD_SECONDS at `per_stream` events/s each (their starts spread over one gap, as
    real requests are), and non-streamed requests at POD_REQUESTS/s alongside; events and requests done."""
    events = 0
    requests = 0
    chunks = int(POD_SECONDS * per_stream)

    async def stream() -> None:
        nonlocal events
        buffer = b""
        async with session.post(url, json={"model": "m", "stream": True, "chunks": chunks,
                                           "gap": 1.0 / per_stream}) as r:
            async for data in r.content.iter_any():
                buffer += data
                *complete, buffer = buffer.split(b"\n\n")
                events += len(complete)

    async def one() -> None:
        nonlocal requests
        async with session.post(url, json={"model": "m", "stream": False}) as r:
            await r.read()
            requests += 1

    async def request_loop(stop: asyncio.Event) -> None:
        tasks = []
        start = time.monotonic()
        i = 0
        while not stop.is_set():
            tasks.append(asyncio.create_task(one()))
            i += 1
            await asyncio.sleep(max(0.0, start + i / POD_REQUESTS - time.monotonic()))
        await asyncio.gather(*tasks)

    stop = asyncio.Event()
    start = time.monotonic()
    loop_task = asyncio.create_task(request_loop(stop))
    await asyncio.gather(*(stream() for _ in range(streams)))
    elapsed = time.monotonic() - start
    stop.set()
    await loop_task
    return {"events_per_second": events / elapsed, "requests_per_second": requests / elapsed, "events": events,
            "seconds": elapsed}


POD_REQUESTS = 200.0


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- orchestration ---------------------------------------------------------------------------------------

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body; proxy_temp_path {dir}/proxy; fastcgi_temp_path {dir}/fcgi;
  uwsgi_temp_path {dir}/uwsgi; scgi_temp_path {dir}/scgi;
  upstream vllm {{ server 127.0.0.1:{upstream}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://vllm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
"""


def pinned(cpu: int, cmd: list[str], **kw) -> subprocess.Popen:
    taskset = shutil.which("taskset")
    prefix = [taskset, "-c", str(cpu)] if taskset and (os.cpu_count() or 1) > 1 else []
    return subprocess.Popen(prefix + cmd, **kw)


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"port {port} not listening")


def run_client(url: str, mode: str, concurrency: int, count: int) -> dict:
    out = subprocess.run(
        ["taskset", "-c", "1", sys.executable, __file__, "--client", url, mode, str(concurrency), str(count)]
        if shutil.which("taskset") and (os.cpu_count() or 1) > 1
        else [sys.executable, __file__, "--client", url, mode, str(concurrency), str(count)],
        capture_output=True, text=True, timeout=600, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def proxy_pids(proc: subprocess.Popen) -> list[int]:
    """The process and its children (nginx's worker, or taskset's exec'd program)."""
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return [proc.pid, *map(int, children)]


def _median_round(rounds: list[dict]) -> dict:
    """Per figure, the median over rounds."""
    out: dict = {}
    for part in rounds[0]:
        out[part] = {}
        for key in rounds[0][part]:
            values = [r[part][key] for r in rounds if r[part][key] is not None]
            out[part][key] = statistics.median(values) if values else None
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path)
    parser.add_argument("--client", nargs=4, metavar=("URL", "MODE", "CONCURRENCY", "COUNT"))
    parser.add_argument("--upstream", type=int)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; figures are medians")
    parser.add_argument("--targets", default="direct,sidecar,sidecar (uvloop),nginx",
                        help="comma-separated subset of the paths to measure")
    args = parser.parse_args()
    # The upstream and the load generator share one core: on uvloop (when installed) they drive more load.
    run = asyncio.run
    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        run = uvloop.run
    if args.upstream:
        run(upstream_main(args.upstream))
        return 0
    if args.client:
        url, mode, concurrency, count = args.client
        print(json.dumps(run(client_main(url, mode, int(concurrency), float(count)))))
        return 0

    load_before = os.getloadavg()[0]
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    tmp = Path(tempfile.mkdtemp(prefix="specdec-bench-"))
    procs: list[subprocess.Popen] = []
    try:
        up_port, side_port, metrics_port, nginx_port = free_port(), free_port(), free_port(), free_port()
        procs.append(pinned(1, [sys.executable, __file__, "--upstream", str(up_port)]))
        wait_port(up_port)
        def launch_sidecar(loop: str, proxy_port: int, metrics: int) -> subprocess.Popen:
            return pinned(0, [sys.executable, "-m", "sidecar", "serve", "--upstream", f"http://127.0.0.1:{up_port}",
                              "--proxy-port", str(proxy_port), "--proxy-host", "127.0.0.1", "--metrics-port",
                              str(metrics), "--metrics-host", "127.0.0.1", "--models", "m", "--event-loop", loop,
                              "--log-level", "error"], cwd=ROOT)

        sidecar = launch_sidecar("asyncio", side_port, metrics_port)
        procs.append(sidecar)
        has_uvloop = importlib.util.find_spec("uvloop") is not None
        if has_uvloop:
            uv_port, uv_metrics = free_port(), free_port()
            sidecar_uv = launch_sidecar("uvloop", uv_port, uv_metrics)
            procs.append(sidecar_uv)
        conf = tmp / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=tmp, upstream=up_port, port=nginx_port))
        has_nginx = Path(nginx).exists()
        if has_nginx:
            procs.append(pinned(0, [nginx, "-c", str(conf), "-p", str(tmp)], stderr=subprocess.DEVNULL))
        wait_port(side_port)
        if has_uvloop:
            wait_port(uv_port)
        if has_nginx:
            wait_port(nginx_port)
        targets = {"direct": (up_port, None), "sidecar": (side_port, sidecar)}
        if has_uvloop:
            targets["sidecar (uvloop)"] = (uv_port, sidecar_uv)
        if has_nginx:
            targets["nginx"] = (nginx_port, procs[-1])
        wanted = {t.strip() for t in args.targets.split(",")} | {"direct"}
        targets = {name: target for name, target in targets.items() if name in wanted}
        path = "/v1/chat/completions"
        results: dict[str, dict[str, dict]] = {}
        for name, (port, _) in targets.items():  # warm-up
            run_client(f"http://127.0.0.1:{port}{path}", "request", 8, 200)
        rounds: dict[str, list[dict]] = {name: [] for name in targets}
        for round_no in range(args.rounds):  # interleaved, so drift on the machine hits every path alike
            for name, (port, proc) in targets.items():
                url = f"http://127.0.0.1:{port}{path}"
                pids = proxy_pids(proc) if proc is not None else []
                result = {}
                for phase, (mode, concurrency, count) in (("request", ("request", 32, 3000)),
                                                           ("chunks", ("chunks", 200, 0)),
                                                           ("rate", ("rate", 64, 2000)),
                                                           ("pod", ("pod", POD_STREAMS, POD_RATE))):
                    before = cpu_seconds(pids)
                    result[phase] = run_client(url, mode, concurrency, count)
                    result[phase]["proxy_cpu_seconds"] = cpu_seconds(pids) - before if pids else None
                used = result["rate"]["proxy_cpu_seconds"]
                result["rate"]["events_per_cpu_second"] = result["rate"]["events"] / used if used else None
                if pids:
                    per_request = result["request"]["proxy_cpu_seconds"] / 3000
                    streamed = 200 * 30  # the chunk phase: 200 streams of 30 events
                    per_event = max(0.0, result["chunks"]["proxy_cpu_seconds"] - 200 * per_request) / streamed
                    pod = result["pod"]
                    result["cost"] = {"per_request_ms": per_request * 1e3, "per_event_us": per_event * 1e6,
                                      "pod_share": pod["proxy_cpu_seconds"] / pod["seconds"]}
                else:
                    result["cost"] = {"per_request_ms": None, "per_event_us": None, "pod_share": None}
                rounds[name].append(result)
                print(round_no, name, json.dumps(result), flush=True)
        results = {name: _median_round(rs) for name, rs in rounds.items()}
        spread = {name: [r["chunks"]["p99"] - rounds["direct"][i]["chunks"]["p99"] for i, r in enumerate(rs)]
                  for name, rs in rounds.items() if name != "direct"}
        if "nginx" in rounds:
            spread_rate = {
                name: [r["rate"]["events_per_cpu_second"] / rounds["nginx"][i]["rate"]["events_per_cpu_second"]
                       for i, r in enumerate(rs)]
                for name, rs in rounds.items() if name.startswith("sidecar")
            }
        else:
            spread_rate = {}
        rss = {"sidecar": peak_rss_mb(sidecar.pid)}
        if has_uvloop:
            rss["sidecar (uvloop)"] = peak_rss_mb(sidecar_uv.pid)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        seen = sum(float(v) for v in re.findall(r'^specdec_requests_total\{[^}]*\} (\S+)$', metrics, re.M))
        print(f"sidecar peak RSS {rss} MB; requests counted by the tap {seen:.0f}", flush=True)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)

    if args.write:
        load = (load_before, os.getloadavg()[0])
        _write(args.write, results, rss, seen, spread, spread_rate, args.rounds,
               load)
    return 0


def _write(path: Path, results: dict, rss: dict, seen: float, spread: dict, spread_rate: dict, rounds: int,
           load: tuple[float, float]) -> None:
    import platform

    sys.path.insert(0, str(ROOT / "bench"))
    from bench_scrape import _replace_section

    d = results["direct"]
    lines = [
        "## Proxy path (`bench/bench_proxy.py`)",
        "",
        f"Run on {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{time.strftime('%Y-%m-%d')}. Command: `.venv/bin/python bench/bench_proxy.py --write docs/benchmarks.md`.",
        "The proxy under test is pinned to core 0; upstream and load generator share core 1, so the direct",
        "figures include no proxy at all and the proxied ones include one hop on its own core.",
        f"Every figure is the median of {rounds} interleaved rounds; the per-round spread of the noisiest figures",
        "is listed below the table, because on a shared 2-core machine they move from round to round.",
        f"One-minute load average at the start and the end of the run: {load[0]:.1f}, {load[1]:.1f} (on 2 cores; "
        "above about 2 other work competes with the proxy for its core, and latencies grow with it far more than "
        "the CPU figures do).",
        "",
        "| path | request p50 | added request p50 | request p99 | chunk p50 | chunk p99 | added/chunk p50 | "
        "added/chunk p99 | events/s seen | events per proxy CPU-second | proxy CPU per request | "
        "proxy CPU per event |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        added50 = r["chunks"]["p50"] - d["chunks"]["p50"]
        added99 = r["chunks"]["p99"] - d["chunks"]["p99"]
        added_request = r["request"]["p50"] - d["request"]["p50"]
        per_cpu = r["rate"].get("events_per_cpu_second")
        cost = r.get("cost") or {}
        lines.append(
            f"| {name} | {r['request']['p50']:.2f} ms | "
            + ("— | " if name == "direct" else f"{added_request:+.2f} ms | ")
            + f"{r['request']['p99']:.2f} ms | {r['chunks']['p50']:.2f} ms | {r['chunks']['p99']:.2f} ms | "
            + ("— | — | " if name == "direct" else f"{added50:+.2f} ms | {added99:+.2f} ms | ")
            + f"{r['rate']['events_per_second']:.0f} | "
            + ("— | " if not per_cpu else f"{per_cpu:.0f} | ")
            + ("— | — |" if cost.get("per_request_ms") is None
               else f"{cost['per_request_ms']:.3f} ms | {cost['per_event_us']:.1f} µs |")
        )
    lines.append("")
    for name, values in spread.items():
        lines.append(f"Added chunk p99 per round, {name}: " + ", ".join(f"{v:+.2f} ms" for v in values) + ".")
    lines.append("")
    if "nginx" in results:
        nginx_rate = results["nginx"]["rate"]["events_per_cpu_second"]
        ratios = ", ".join(
            f"{name}: **{results[name]['rate']['events_per_cpu_second'] / nginx_rate:.2f}**"
            for name in results if name.startswith("sidecar")
        )
        lines.append(
            f"Maximum chunk rate on one core, as events relayed per CPU-second of the proxy process, relative to "
            f"nginx: {ratios} (target: at least 0.8); per round: "
            + "; ".join(f"{name} " + ", ".join(f"{v:.2f}" for v in vals) for name, vals in spread_rate.items())
            + ". The load generator, not the proxies, limits the events/s seen, and a proxy merges events into "
            "fewer, larger reads and writes when its reader falls behind, so events per CPU-second moves with "
            "how much merging a round got."
        )
        lines.append("")
    shares = ", ".join(
        f"{name} **{r['cost']['pod_share'] * 100:.0f}%** of one core "
        f"({r['pod']['events_per_second']:,.0f} events/s and {r['pod']['requests_per_second']:.0f} requests/s relayed)"
        for name, r in results.items() if (r.get("cost") or {}).get("pod_share") is not None
    )
    direct_pod = results["direct"]["pod"]
    lines += [
        f"CPU share at a busy GPU pod's load, measured: {POD_STREAMS} streams of {POD_RATE:.0f} events/s each "
        f"({POD_STREAMS * POD_RATE:,.0f} chunks/s) and {POD_REQUESTS:.0f} non-streamed requests/s together for "
        f"{POD_SECONDS:.0f} s, the proxy's CPU-seconds over the phase's seconds: {shares}; straight to the upstream "
        f"the load generator got {direct_pod['events_per_second']:,.0f} events/s and "
        f"{direct_pod['requests_per_second']:.0f} requests/s. "
        "CPU per request is the proxy's CPU over the 3000 non-streamed requests (tap and metrics included for the "
        "sidecar); CPU per event is its CPU over the 200-stream phase, less 200 requests' worth, over its 6 000 "
        "events, each arriving on its own (no merging: at 2 000 events/s each costs a whole turn of the event "
        "loop, which is why it is higher than the busy pod's share per event).",
        "",
        "Peak RSS over the whole run (VmHWM) per sidecar process: "
        + ", ".join(f"{name} **{mb:.0f} MB**" for name, mb in rss.items()) + " (target: at most 80 MB). "
        f"The tap counted {seen:.0f} observed requests during the run.",
        "Negative added latency means the hop costs less than this method resolves: with a proxy on core 0 the "
        "upstream and the load generator on core 1 compete less, which outweighs the extra hop. The chunk p99 "
        "through the sidecar is the figure to hold against the 1 ms target. Added request latency at 32 "
        "concurrent is mostly the proxy's CPU per request times the requests queued on its core.",
        "Request latency: 3000 small non-streamed POSTs at 32 concurrent. Chunk latency: 200 concurrent streams "
        "of 30 events 100 ms apart (6 000 events), receive time minus the upstream's write stamp. "
        "Events/s: 64 streams of 2000 events written back to back.",
        "",
    ]
    _replace_section(path, "## Proxy path", "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
