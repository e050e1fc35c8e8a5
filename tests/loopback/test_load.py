"""Load through the proxy: hundreds of concurrent SSE streams and clients that read nothing.

The scenarios and the loopback upstream are ``bench/bench_load.py``'s (which runs 1000 streams for the
figures in docs/reliability.md); here they run smaller so ``make test`` stays quick:

* 250 streams through an in-process sidecar: every byte equal to what the upstream wrote, and afterwards
  the process has no more open file descriptors and no more asyncio tasks than before;
* 300 streams through ``python -m sidecar serve`` as its own process: peak RSS (VmHWM) <= 80 MB, fds back;
* 20 clients that read nothing: the upstream stops being read once the kernel socket buffers on the way
  are full (its writes stall; no growth while the client still reads nothing), the sidecar's RSS stays
  bounded, and once the clients read at 64 KiB/s the upstream's lead over them does not grow.
"""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from fakes import (
    SidecarProcess,
    run_slow_clients,
    run_streams,
    serve_loopback,
    settle_fds,
    wait_for,
)
from sidecar.app import MONITOR, PROXY_PORT, create_app
from sidecar.config import build_settings

pytestmark = pytest.mark.timeout(240)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def kernel_buffer_max(name: str) -> int:
    """The largest size the kernel lets a socket buffer autotune to (tcp_rmem / tcp_wmem, third field)."""
    return int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])


@pytest.fixture
def upstream(load_upstream):
    return load_upstream


async def test_concurrent_streams_byte_exact_without_fd_or_task_leaks(upstream):
    registry = CollectorRegistry()
    settings = build_settings(upstream=f"http://127.0.0.1:{upstream.port}", scrape_interval="1s",
                              scrape_timeout="1s", windows="1m", verdict_window="1m", proxy_port=0,
                              proxy_host="127.0.0.1", upstream_keepalive="1s", upstream_connect_timeout="30s")
    app = create_app(settings, registry)
    runner, _ = await serve_loopback(app)
    proxy = f"http://127.0.0.1:{app[PROXY_PORT]}"
    try:
        await wait_for(lambda: app[MONITOR].state.scrapes > 0, timeout=10)
        await run_streams(proxy, 4, 3, upstream=upstream)  # warm: pools, first connections
        await asyncio.sleep(1.5)
        gc.collect()
        fds_before, tasks_before = open_fds(), len(asyncio.all_tasks())

        result = await run_streams(proxy, 250, 10, upstream=upstream)

        # idle upstream connections retire after --upstream-keepalive (1 s here)
        async def settled() -> bool:
            gc.collect()
            return open_fds() <= fds_before and len(asyncio.all_tasks()) <= tasks_before

        try:
            await wait_for(settled, timeout=15, what="fds and tasks back to their count before the streams")
        finally:
            print(f"\n{result}; fds {fds_before} -> {open_fds()}, tasks {tasks_before} -> {len(asyncio.all_tasks())}")
        assert result["statuses"] == {200: 250}
        assert result["mismatched_streams"] == 0 and result["byte_differences"] == 0 and result["errors"] == 0
        assert result["peak_open_upstream"] == 250, "all streams were open at once"
        tapped = registry.get_sample_value("specdec_request_draft_tokens_total",
                                           {"model": "tiny-target", "temperature_bucket": "0-0.3", "source": "vllm"})
        assert tapped == 4 * 10 * 250 + 4 * 3 * 4, "the tap read every stream's final usage chunk"
    finally:
        await runner.cleanup()


async def test_streams_through_the_sidecar_process_bounded_rss(upstream):
    sidecar = SidecarProcess(f"http://127.0.0.1:{upstream.port}",
                             extra=["--upstream-keepalive", "1s", "--upstream-connect-timeout", "30s"]).start()
    proxy = f"http://127.0.0.1:{sidecar.proxy_port}"
    try:
        await run_streams(proxy, 4, 3, upstream=upstream)
        await asyncio.sleep(1.5)
        fds_before, rss_idle = sidecar.fds(), sidecar.status("VmRSS")
        result = await run_streams(proxy, 300, 10, upstream=upstream)
        peak = sidecar.status("VmHWM")
        fds_after = await settle_fds(sidecar, fds_before, 15)
        print(f"\n{result}; RSS idle {rss_idle:.1f} MB, peak {peak:.1f} MB; fds {fds_before} -> {fds_after}")
        assert result["statuses"] == {200: 300}
        assert result["mismatched_streams"] == 0 and result["byte_differences"] == 0
        assert peak <= 80, f"peak RSS {peak:.1f} MB"
        assert fds_after <= fds_before
        assert sidecar.proc.poll() is None
    finally:
        sidecar.stop()


async def test_slow_clients_back_pressure(upstream):
    sidecar = SidecarProcess(f"http://127.0.0.1:{upstream.port}", extra=["--upstream-keepalive", "1s"]).start()
    clients, rcvbuf = 20, 32 * 1024
    try:
        await run_streams(f"http://127.0.0.1:{sidecar.proxy_port}", 2, 2, upstream=upstream)
        await asyncio.sleep(1.5)
        fds_before = sidecar.fds()
        result = await run_slow_clients(sidecar, upstream, clients, stall=20.0, rate=64 * 1024, drain_seconds=3.0)
        print(f"\n{result}")
        mb = 1024 * 1024
        # Bytes in flight can only sit in kernel buffers: upstream send, sidecar receive, sidecar send, client
        # receive, plus the proxy's own small read buffer and transport write buffer.
        in_kernel = 2 * kernel_buffer_max("tcp_wmem") + kernel_buffer_max("tcp_rmem") + rcvbuf
        assert result["upstream_written_per_stream_while_stalled_mb"] * mb <= in_kernel + 1 * mb
        # no reading upstream while the client drains nothing: the writes stopped, and stayed stopped
        # (a proxy reading ahead into memory would keep the upstream writing at hundreds of MB/s)
        assert result["writes_stopped_after_s"] < 20.0
        assert result["written_in_2s_after_writes_stopped_mb"] <= 0.25 * result["upstream_written_per_stream_while_stalled_mb"]
        # the upstream is read only as fast as the client drains: its lead over the client does not grow
        assert result["upstream_lead_after_drain_mb"] <= result["upstream_written_per_stream_while_stalled_mb"] + 0.1
        assert result["client_read_per_stream_mb"] > 0.05
        # userspace memory stays bounded: well under 1 MB of RSS per stalled stream
        assert result["rss_stalled_mb"] - result["rss_before_mb"] <= clients * 1.0
        assert await settle_fds(sidecar, fds_before, 10) <= fds_before, "the stalled streams' sockets were closed"
        assert sidecar.proc.poll() is None
    finally:
        sidecar.stop()
