"""Load and back-pressure through the proxy: many concurrent SSE streams, and clients that read nothing.

    .venv/bin/python bench/bench_load.py [--streams 1000] [--slow 100] [--json out.json]

The sidecar runs as its own process (``python -m sidecar serve`` with ``--proxy-port``), exactly as in the
pod. This process runs the loopback upstream (an aiohttp server speaking vLLM's streaming shape, vLLM-like
``/metrics`` and ``/v1/models``) and the clients. Figures:

* ``streams``: N streams open at once (the upstream holds its first event until all N are in), each
  ``--events`` chunks of a vLLM-shaped SSE stream ending in a usage chunk with per-request metrics; bytes
  compared with what the upstream wrote (SHA-256 per stream, and length); the sidecar's peak RSS (VmHWM)
  and its open file descriptors before and after;
* ``slow``: M clients send a streamed request and read nothing for a while (socket receive buffer 32 KiB)
  while the upstream writes as fast as it is let; how many bytes the upstream managed to write per stream
  (flow control: the proxy must stop reading upstream once the client stops draining), then the clients
  read at a fixed rate and the upstream's lead over the client must not grow; the sidecar's RSS throughout.

``tests/test_load.py`` runs the same scenarios at a smaller scale in ``make test``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
METRICS_PAGE = ROOT / "tests" / "fixtures" / "vllm-0.32-draft-t1.prom"
MODEL = "tiny-target"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# --- what the upstream sends (deterministic, so a client can check every byte) ---------------------------

def event(stream: int, j: int) -> bytes:
    text = f"tok{j}-{stream} " * 3
    return ("data: " + json.dumps({
        "id": f"cmpl-{stream}", "object": "text_completion", "created": 0, "model": MODEL,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": None}], "usage": None,
    }, separators=(",", ":")) + "\n\n").encode()


def final_events(stream: int, events: int) -> bytes:
    spec = {"mean_acceptance_length": 2.0, "draft_acceptance_rate": 0.25, "acceptance_histogram": [1, 1, 0, 0, 0],
            "num_spec_steps": events, "num_accepted_draft_tokens": events, "num_draft_tokens": 4 * events,
            "num_spec_tokens": 4}
    last = {"id": f"cmpl-{stream}", "object": "text_completion", "created": 0, "model": MODEL, "choices": [],
            "usage": {"prompt_tokens": 3, "total_tokens": 3 + 2 * events, "completion_tokens": 2 * events},
            "metrics": {"speculative_decoding": spec}}
    return ("data: " + json.dumps(last, separators=(",", ":")) + "\n\ndata: [DONE]\n\n").encode()


def expected_body(stream: int, events: int) -> bytes:
    return b"".join(event(stream, j) for j in range(events)) + final_events(stream, events)


FLOOD_CHUNK = b"data: " + b"x" * (16 * 1024 - 8) + b"\n\n"


@dataclass
class Upstream:
    """Loopback upstream. ``expect`` streams are held at their first event until that many are open."""

    expect: int = 0
    interval: float = 0.05
    open_streams: int = 0
    peak_open: int = 0
    written: dict[int, int] = field(default_factory=dict)  # flood stream -> bytes written so far
    all_in: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    port: int = 0

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        stream, events = int(body["stream_id"]), int(body.get("events", 0))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        self.open_streams += 1
        self.peak_open = max(self.peak_open, self.open_streams)
        try:
            if body.get("flood"):
                self.written[stream] = 0
                while True:  # as fast as the proxy lets us: write() waits while the transport is full
                    await response.write(FLOOD_CHUNK)
                    self.written[stream] += len(FLOOD_CHUNK)
            if self.expect and self.open_streams >= self.expect:
                self.all_in.set()
            if self.expect:
                try:
                    await asyncio.wait_for(self.all_in.wait(), 60)
                except asyncio.TimeoutError:
                    pass
            for j in range(events):
                await response.write(event(stream, j))
                await asyncio.sleep(self.interval)
            await response.write(final_events(stream, events))
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.open_streams -= 1
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=METRICS_PAGE.read_bytes(), content_type="text/plain")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        self.runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, backlog=4096)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


# --- the sidecar under test, as its own process ------------------------------------------------------------

@dataclass
class SidecarProcess:
    upstream: str
    proxy_port: int = 0
    metrics_port: int = 0
    proc: subprocess.Popen | None = None
    extra: list[str] = field(default_factory=list)

    def start(self, timeout: float = 30.0) -> SidecarProcess:
        self.proxy_port = self.proxy_port or free_port()
        self.metrics_port = self.metrics_port or free_port()
        cmd = [sys.executable, "-m", "sidecar", "serve", "--upstream", self.upstream,
               "--metrics-host", "127.0.0.1", "--metrics-port", str(self.metrics_port),
               "--proxy-host", "127.0.0.1", "--proxy-port", str(self.proxy_port),
               "--scrape-interval", "1s", "--log-level", "warning", *self.extra]  # fmt: skip
        self.log = tempfile.NamedTemporaryFile(prefix="sidecar-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidecar exited {self.proc.returncode}: {Path(self.log.name).read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.proxy_port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError("sidecar proxy port never opened")

    def status(self, key: str) -> float:
        """A /proc/PID/status field in MB (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
        raise KeyError(key)

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def log_lines(self) -> list[str]:
        return Path(self.log.name).read_text().splitlines()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


# --- scenarios ---------------------------------------------------------------------------------------------

async def run_streams(proxy: str, n: int, events: int, *, upstream: Upstream) -> dict:
    """N concurrent streams; returns byte-level comparison and timings."""
    upstream.expect = n
    upstream.all_in = asyncio.Event()
    mismatched: list[int] = []
    statuses: dict[int, int] = {}
    diff_bytes = 0
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                     timeout=aiohttp.ClientTimeout(total=300)) as session:
        async def one(i: int) -> None:
            nonlocal diff_bytes
            body = {"model": MODEL, "prompt": "p", "temperature": 0.2, "stream": True, "stream_id": i,
                    "events": events, "stream_options": {"include_usage": True}}
            try:
                async with session.post(proxy + "/v1/completions", json=body) as r:
                    got = await r.read()
                    status = r.status
            except (aiohttp.ClientError, asyncio.TimeoutError) as error:
                errors.append(type(error).__name__)
                return
            statuses[status] = statuses.get(status, 0) + 1
            want = expected_body(i, events)
            if status != 200 or hashlib.sha256(got).digest() != hashlib.sha256(want).digest():
                mismatched.append(i)
                diff_bytes += abs(len(got) - len(want)) + sum(a != b for a, b in zip(got, want))

        await asyncio.gather(*(one(i) for i in range(n)))
    upstream.expect = 0
    return {"streams": n, "events_per_stream": events, "seconds": round(time.monotonic() - started, 2),
            "peak_open_upstream": upstream.peak_open, "mismatched_streams": len(mismatched),
            "byte_differences": diff_bytes, "statuses": statuses, "errors": len(errors), "bytes_per_stream": len(expected_body(0, events))}


async def open_slow_stream(port: int, stream: int, rcvbuf: int = 32 * 1024) -> socket.socket:
    """A raw client that sends a streamed request and then reads only when told to."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", port))
    body = json.dumps({"model": MODEL, "prompt": "p", "stream": True, "stream_id": stream, "flood": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    await loop.sock_sendall(sock, head + body)
    return sock


async def drain_at(sock: socket.socket, rate: float, seconds: float) -> int:
    """Read from *sock* at about *rate* bytes/s for *seconds*; returns bytes read."""
    loop = asyncio.get_running_loop()
    got = 0
    deadline = time.monotonic() + seconds
    step = 0.05
    while time.monotonic() < deadline:
        budget = int(rate * step)
        while budget > 0:
            try:
                data = sock.recv(min(budget, 65536))
            except BlockingIOError:
                break
            if not data:
                return got
            got += len(data)
            budget -= len(data)
        await asyncio.sleep(step)
    return got


async def run_slow_clients(sidecar: SidecarProcess, upstream: Upstream, m: int, stall: float, rate: float,
                           drain_seconds: float) -> dict:
    """M clients read nothing for *stall* seconds, then read at *rate* B/s each for *drain_seconds*.
    One more client reads nothing straight from the upstream, for comparison."""
    base, direct_id = 10_000_000, 20_000_000
    rss_before = sidecar.status("VmRSS")
    socks = [await open_slow_stream(sidecar.proxy_port, base + i) for i in range(m)]
    direct = await open_slow_stream(upstream.port, direct_id)
    deadline = time.monotonic() + 10
    while len([k for k in upstream.written if base <= k < direct_id]) < m and time.monotonic() < deadline:
        await asyncio.sleep(0.05)

    def mine() -> dict[int, int]:
        return {k: v for k, v in upstream.written.items() if base <= k < direct_id}

    # Wait for the upstream's writes to stop for 2 s (the buffers on the way are full), at most *stall* s;
    # then hold 2 s more: a proxy that kept reading upstream would still be writing.
    began = time.monotonic()
    last, still_since = sum(mine().values()), time.monotonic()
    while time.monotonic() - began < stall and time.monotonic() - still_since < 2.0:
        await asyncio.sleep(0.2)
        now = sum(mine().values())
        if now != last:
            last, still_since = now, time.monotonic()
    plateau_after = time.monotonic() - began
    mid = mine()
    await asyncio.sleep(2.0)
    stalled = mine()
    rss_stalled = sidecar.status("VmRSS")
    read = await asyncio.gather(*(drain_at(s, rate, drain_seconds) for s in socks))
    after = mine()
    rss_drained = sidecar.status("VmRSS")
    for s in [*socks, direct]:
        s.close()
    lead_stalled = [stalled[base + i] for i in range(m)]
    lead_after = [after[base + i] - read[i] for i in range(m)]
    mb = 1024 * 1024
    return {
        "clients": m, "max_stall_seconds": stall,
        "upstream_written_per_stream_while_stalled_mb": round(max(lead_stalled) / mb, 2),
        "direct_written_while_stalled_mb": round(upstream.written.get(direct_id, 0) / mb, 2),
        "writes_stopped_after_s": round(plateau_after, 1),
        "written_in_2s_after_writes_stopped_mb": round(max(stalled[k] - mid[k] for k in stalled) / mb, 3),
        "client_read_rate_kb_s": rate / 1024, "drain_seconds": drain_seconds,
        "client_read_per_stream_mb": round(min(read) / mb, 2),
        "upstream_lead_after_drain_mb": round(max(lead_after) / mb, 2),
        "upstream_written_total_mb": round(sum(after.values()) / mb, 1),
        "rss_before_mb": round(rss_before, 1), "rss_stalled_mb": round(rss_stalled, 1),
        "rss_drained_mb": round(rss_drained, 1),
    }


async def settle_fds(sidecar: SidecarProcess, baseline: int, timeout: float) -> int:
    """Wait until the sidecar's fd count is back near *baseline* (idle pooled connections retire after
    --upstream-keepalive); returns the last count seen."""
    deadline = time.monotonic() + timeout
    count = sidecar.fds()
    while count > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
        count = sidecar.fds()
    return count


async def bench(streams: int, events: int, slow: int, interval: float) -> dict:
    raise_fd_limit()
    upstream = Upstream(interval=interval)
    await upstream.start()
    sidecar = SidecarProcess(f"http://127.0.0.1:{upstream.port}", extra=["--upstream-keepalive", "1s"]).start()
    proxy = f"http://127.0.0.1:{sidecar.proxy_port}"
    try:
        await run_streams(proxy, 4, 3, upstream=upstream)  # warm up: imports, pools, first poll
        await asyncio.sleep(2.5)
        fds_before = sidecar.fds()
        rss_idle = sidecar.status("VmRSS")
        result = await run_streams(proxy, streams, events, upstream=upstream)
        peak = sidecar.status("VmHWM")
        fds_after = await settle_fds(sidecar, fds_before, 10)
        alive = sidecar.proc.poll() is None
    finally:
        sidecar.stop()
    # slow clients against a fresh sidecar, so its RSS is not the streams run's high-water mark
    sidecar = SidecarProcess(f"http://127.0.0.1:{upstream.port}", extra=["--upstream-keepalive", "1s"]).start()
    try:
        await run_streams(f"http://127.0.0.1:{sidecar.proxy_port}", 4, 3, upstream=upstream)
        await asyncio.sleep(2.5)
        slow_fds_before = sidecar.fds()
        slow_result = await run_slow_clients(sidecar, upstream, slow, stall=20.0, rate=64 * 1024, drain_seconds=4.0)
        slow_result["fds_before"] = slow_fds_before
        slow_result["fds_after"] = await settle_fds(sidecar, slow_fds_before, 10)
        slow_result["rss_peak_mb"] = round(sidecar.status("VmHWM"), 1)
        alive = alive and sidecar.proc.poll() is None
    finally:
        sidecar.stop()
        await upstream.stop()
    return {"streams": result, "rss_idle_mb": round(rss_idle, 1), "rss_peak_mb": round(peak, 1),
            "fds_before": fds_before, "fds_after_streams": fds_after, "slow": slow_result, "sidecar_alive": alive}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--events", type=int, default=40)
    parser.add_argument("--interval", type=float, default=0.1, help="seconds between a stream's events")
    parser.add_argument("--slow", type=int, default=100, help="clients that read nothing")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    result = asyncio.run(bench(args.streams, args.events, args.slow, args.interval))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    ok = (result["streams"]["byte_differences"] == 0 and result["streams"]["mismatched_streams"] == 0
          and result["streams"]["errors"] == 0 and result["rss_peak_mb"] <= 80 and result["sidecar_alive"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
