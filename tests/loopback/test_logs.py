"""Logs: every line on stderr is one JSON object, aiohttp's own loggers included; per-request problems are
rate-limited."""

from __future__ import annotations

import asyncio
import json
import logging
import sys

import aiohttp

from fakes import ReplayVllm, free_port, wait_ready
from sidecar.logs import RateLimited, RateLimitFilter, configure_logging


def json_lines(text: str) -> list[dict]:
    """Every non-empty line parsed as one JSON object (fails on any plain-text line)."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_stdlib_loggers_render_as_one_json_line_with_the_traceback_as_a_field(capsys):
    configure_logging("json", "info")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("aiohttp.client").exception("Unhandled %s", "thing")
    logging.getLogger("asyncio").error("Task exception was never retrieved")
    logging.getLogger("aiohttp.access").debug("below the level")
    lines = json_lines(capsys.readouterr().err)
    assert [(line["logger"], line["level"]) for line in lines] == [("aiohttp.client", "error"), ("asyncio", "error")]
    assert lines[0]["event"] == "Unhandled thing"
    assert "Traceback" in lines[0]["exception"] and "ValueError: boom" in lines[0]["exception"]


def test_rate_limited_logs_once_per_reason_and_counts_the_rest():
    now = [0.0]
    seen: list[tuple[str, dict]] = []

    class Sink:
        def warning(self, event, **fields):
            seen.append((event, fields))

    limited = RateLimited(Sink(), every=10.0, clock=lambda: now[0])
    for _ in range(5):
        limited.warning("proxy_upstream_unreachable", "ClientConnectorError")
    limited.warning("proxy_upstream_unreachable", "ServerDisconnectedError")
    now[0] = 10.5
    limited.warning("proxy_upstream_unreachable", "ClientConnectorError")
    assert seen == [
        ("proxy_upstream_unreachable", {"reason": "ClientConnectorError", "suppressed": 0}),
        ("proxy_upstream_unreachable", {"reason": "ServerDisconnectedError", "suppressed": 0}),
        ("proxy_upstream_unreachable", {"reason": "ClientConnectorError", "suppressed": 4}),
    ]


def test_rate_limit_filter_on_a_stdlib_logger():
    now = [0.0]
    limiter = RateLimitFilter(every=5.0, clock=lambda: now[0])
    record = lambda: logging.LogRecord("aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
                                       ("127.0.0.1",), None)  # noqa: E731
    assert [limiter.filter(record()) for _ in range(3)] == [True, False, False]
    now[0] = 6.0
    passed = record()
    assert limiter.filter(passed) and passed.suppressed == 2


async def test_serve_under_proxy_errors_writes_only_json_lines():
    """A real ``python -m sidecar serve``: upstream resets mid-stream, garbage request lines, non-path
    targets, an unreachable upstream for many requests. stderr stays JSON lines, tracebacks inside them,
    and repeated per-request problems are logged once."""
    upstream = ReplayVllm()
    await upstream.start()
    proxy_port, metrics_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "sidecar", "serve", "--upstream", upstream.url, "--proxy-port", str(proxy_port),
        "--proxy-host", "127.0.0.1", "--metrics-port", str(metrics_port), "--metrics-host", "127.0.0.1",
        "--models", "tiny-target", "--scrape-interval", "1s",
        stderr=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{proxy_port}"
    try:
        async with aiohttp.ClientSession() as client:
            await wait_ready(client, f"http://127.0.0.1:{metrics_port}", timeout=10)
            for _ in range(3):  # upstream reset mid-stream
                try:
                    async with client.post(base + "/v1/completions", json={"model": "tiny-target", "stream": True},
                                           headers={"X-Fake": "reset"}) as r:
                        await r.read()
                except aiohttp.ClientPayloadError:
                    pass
            for line in (b"GARBAGE\r\n\r\n", b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
                         b"POST http://example.com/v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
                         b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n") * 3:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy_port)
                writer.write(line)
                await writer.drain()
                assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))[9:12] == b"400"
                writer.close()
            await upstream.runner.cleanup()  # the upstream goes away: every request is a 502
            for _ in range(30):
                async with client.post(base + "/v1/completions", json={"model": "tiny-target"}) as r:
                    assert r.status == 502
    finally:
        proc.terminate()
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    text = err.decode()
    assert "Traceback (most recent call last)" not in [line[:35] for line in text.splitlines()]
    lines = json_lines(text)
    events = [line["event"] for line in lines]
    assert events.count("proxy_upstream_unreachable") == 1
    assert events.count("proxy_upstream_reset") == 1
    assert events.count("proxy_rejected_target") == 1
    assert len(lines) < 20, events


def test_console_tracebacks_do_not_show_local_variables(capsys):
    """Local variables of a failing frame can hold request headers: the console renderer must not print them."""
    configure_logging("console", "info")

    def handler(authorization="Bearer sk-secret-123"):
        raise RuntimeError("boom")

    try:
        handler()
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    err = capsys.readouterr().err
    assert "RuntimeError: boom" in err and "sk-secret-123" not in err
