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

The upstream, the sidecar process and the scenarios are ``tests/fakes.py``'s; ``tests/loopback/test_load.py``
runs the same scenarios at a smaller scale.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from fakes import (  # noqa: E402
    LoadUpstream,
    SidecarProcess,
    raise_fd_limit,
    run_slow_clients,
    run_streams,
    settle_fds,
)


async def bench(streams: int, events: int, slow: int, interval: float) -> dict:
    raise_fd_limit()
    upstream = LoadUpstream(interval=interval)
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
