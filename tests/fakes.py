"""What the loopback and live tiers run the sidecar against, and the sidecar itself, in one place.

Fake upstreams, each on 127.0.0.1 and a port of its own:

* ``FakeVllm``: ``/metrics`` only, answering whatever the test sets (text, status, delay, raw body); can
  stop and come back on the same port.
* ``ReplayVllm``: replays recorded vLLM 0.32 responses (``fixtures/``) on ``/v1/completions`` and
  ``/v1/chat/completions``, streamed or not, with per-request speculative-decoding metrics; ``X-Fake``
  switches a request to echo, error, reset, slow or no-spec behaviour.
* ``HostileVllm``: a production-like pod: a 300 KB+ ``/metrics`` page in many small writes, gzip when
  asked, idle keep-alive connections closed, an API key on ``/v1/*``.
* ``HostileRelay``: the same manners put in front of a real vLLM.
* ``LoadUpstream``: deterministic vLLM-shaped streams (every byte predictable), held until N are open,
  or written as fast as the reader lets (flow control).
* ``RawUpstream`` and ``Scripted``: HTTP/1.1 on raw sockets, for what an aiohttp server would not do.

The sidecar: ``start_sidecar`` (in this event loop, ``Sidecar``) and ``SidecarProcess`` (``python -m
sidecar serve`` as its own process, as in the pod). The load scenarios (``run_streams``,
``run_slow_clients``) are shared by ``loopback/test_load.py`` and ``bench/bench_load.py``, which imports
this module.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from devstack.vllm_server import free_port

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"
MODEL = "tiny-target"

__all__ = ["free_port"]  # re-exported: tests and bench pick ports through this module


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()


def recorded_spec(name: str) -> dict:
    """The per-request speculative-decoding metrics vLLM sent in the recorded response *name*."""
    text = fixture_text(name)
    if name.endswith(".sse"):
        text = [line[6:] for line in text.splitlines() if line.startswith("data: {")][-1]
    return json.loads(text)["metrics"]["speculative_decoding"]


async def send_completion(proxy, temperature: float, stream: bool) -> None:
    """One completion through the ``proxy`` fixture's session (its ``base`` is the proxy); must answer 200."""
    body = {"model": MODEL, "prompt": "def f(", "max_tokens": 24, "temperature": temperature, "stream": stream}
    async with proxy.post(proxy.base + "/v1/completions", json=body) as r:
        assert r.status == 200
        await r.read()


def sse_events(data: bytes) -> list[bytes]:
    """Split a recorded stream into the writes vLLM made (one SSE event each)."""
    parts = data.split(b"\n\n")
    return [p + b"\n\n" for p in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


async def serve_loopback(app: web.Application, port: int = 0, **runner_kw) -> tuple[web.AppRunner, int]:
    """Serve *app* on 127.0.0.1 (port 0 = any free one); returns the runner and the bound port."""
    runner_kw.setdefault("access_log", None)  # the fakes' access lines are not the sidecar's logs
    backlog = runner_kw.pop("backlog", 128)
    runner = web.AppRunner(app, **runner_kw)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=backlog).start()
    return runner, runner.addresses[0][1]


async def wait_for(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or predicate}")


async def wait_ready(session, metrics_url: str, timeout: float = 30.0, proc=None) -> None:
    """Until the sidecar at *metrics_url* answers ``/readyz`` with 200 (its first good poll of vLLM); fails with
    the process's output if *proc* (an asyncio subprocess) exits first."""
    import aiohttp

    async def ready() -> bool:
        if proc is not None and proc.returncode is not None:
            output = await proc.stdout.read() if proc.stdout is not None else b""
            raise AssertionError(f"the sidecar exited with {proc.returncode}: {output.decode(errors='replace')}")
        try:
            async with session.get(metrics_url + "/readyz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    await wait_for(ready, timeout=timeout, what=f"{metrics_url}/readyz")


def raise_fd_limit(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def models_response(models: tuple[str, ...] = (MODEL,)) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})


class _Served:
    """A fake served by aiohttp: ``start`` binds (``port`` 0 = any free one, else that one again), ``stop``
    closes; subclasses build the application in ``app``."""

    port: int = 0
    runner: web.AppRunner | None = None
    runner_options: dict = {}

    def app(self) -> web.Application:
        raise NotImplementedError

    async def start(self) -> None:
        self.runner, self.port = await serve_loopback(self.app(), self.port, **self.runner_options)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


# --- fake vLLMs --------------------------------------------------------------------------------------------

class FakeVllm(_Served):
    """``/metrics`` with whatever the test says, and can vanish (``stop``) and come back on the same port."""

    def __init__(self) -> None:
        self.text = ""
        self.status = 200
        self.delay = 0.0
        self.body: bytes | None = None
        self.hits = 0

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.body is not None:
            return web.Response(body=self.body, status=self.status, content_type="text/plain")
        return web.Response(text=self.text, status=self.status, content_type="text/plain")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        return app


class ReplayVllm(_Served):
    """Serves recorded vLLM responses; behaviour can be switched per request with X-Fake (``echo``: the
    body's SHA-256, length, method, raw path and Authorization; ``error``: vLLM's 500; ``reset``: the
    connection dropped after three events; ``slow``: events 50 ms apart, then keep-alive comments;
    ``no-spec``: a stream without per-request spec metrics)."""

    runner_options = {"handler_cancellation": True}

    def __init__(self) -> None:
        self.disconnected = asyncio.Event()
        self.seen: list[dict] = []

    async def completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        mode = request.headers.get("X-Fake", "")
        self.seen.append({"headers": dict(request.headers), "len": len(raw), "path": request.path_qs})
        if mode == "echo":
            return web.json_response(
                {"sha256": hashlib.sha256(raw).hexdigest(), "len": len(raw), "method": request.method,
                 "raw_path": request.raw_path, "auth": request.headers.get("Authorization")}
            )
        if mode == "error":
            return web.json_response({"object": "error", "message": "boom", "type": "InternalServerError",
                                      "code": 500}, status=500)
        body = json.loads(raw)
        chat = request.path.endswith("/chat/completions")
        if body.get("stream"):
            name = "chat-stream.sse" if chat else "completion-stream.sse"
            if mode == "no-spec":
                name = "completion-stream-no-spec-metrics.sse"
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
            await response.prepare(request)
            events = sse_events((FIXTURES / name).read_bytes())
            try:
                for i, event in enumerate(events):
                    if mode == "reset" and i == 3:
                        request.transport.abort()
                        return response
                    if mode == "slow":
                        await asyncio.sleep(0.05)
                    await response.write(event)
                if mode == "slow":
                    for _ in range(200):
                        await asyncio.sleep(0.05)
                        await response.write(b": keep-alive\n\n")
            except (ConnectionResetError, asyncio.CancelledError):
                self.disconnected.set()
                raise
            await response.write_eof()
            return response
        name = "chat-nonstream.json" if chat else "completion-nonstream.json"
        return web.Response(body=(FIXTURES / name).read_bytes(), content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        return models_response()

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=(FIXTURES / "vllm-0.32-draft-t1.prom").read_bytes(), content_type="text/plain")

    async def anything(self, request: web.Request) -> web.Response:
        raw = await request.read()
        return web.json_response({"method": request.method, "raw_path": request.raw_path, "len": len(raw)},
                                 status=201, headers={"X-Upstream": "yes"})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_route("*", "/{tail:.*}", self.anything)
        return app


class ProgressingVllm(ReplayVllm):
    """The replay upstream, whose /metrics walks through the recorded captures t0..t4 (two polls each), so
    every derived family (windowed rates, positions, verdicts) is rendered; ``extra`` is appended to each page
    (another model's series, say)."""

    pages = [f"vllm-0.32-draft-t{i}.prom" for i in range(5)]

    def __init__(self, extra: str = "") -> None:
        super().__init__()
        self.extra = extra
        self.polls = 0

    async def metrics(self, request: web.Request) -> web.Response:
        page = self.pages[min(self.polls // 2, len(self.pages) - 1)]
        self.polls += 1
        return web.Response(text=fixture_text(page) + self.extra, content_type="text/plain")


# A vLLM V0 engine's page (model "old"): the names V1 dropped, which the sidecar passes through.
V0_PAGE = """\
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="old"} 0.37
vllm:num_requests_running{model_name="old"} 4.0
vllm:num_requests_waiting{model_name="old"} 1.0
vllm:spec_decode_draft_acceptance_rate{model_name="old"} 0.61
vllm:spec_decode_efficiency{model_name="old"} 0.55
vllm:spec_decode_num_accepted_tokens_total{model_name="old"} 610.0
vllm:spec_decode_num_draft_tokens_total{model_name="old"} 1000.0
vllm:spec_decode_num_emitted_tokens_total{model_name="old"} 800.0
vllm:generation_tokens_total{model_name="old"} 1500.0
vllm:num_preemptions_total{model_name="old"} 2.0
"""

# One temperature per default bucket: 0, 0-0.3, 0.3-0.5, 0.5-0.7, 0.7-1.0, gt1.0, default (omitted), invalid.
FEED_TEMPERATURES: tuple[object, ...] = (0, 0.2, 0.4, 0.6, 0.9, 1.5, None, "hot")


async def feed(session, proxy: str) -> None:
    """Through the proxy at *proxy* to a ``ReplayVllm``: streamed and plain completions with and without
    vLLM's per-request metrics in every temperature bucket, one upstream error and one unparsable request."""
    completions = proxy + "/v1/completions"
    for temperature in FEED_TEMPERATURES:
        for stream, fake in ((False, ""), (True, ""), (True, "no-spec")):
            body: dict = {"model": MODEL, "prompt": "x", "stream": stream}
            if temperature is not None:
                body["temperature"] = temperature
            async with session.post(completions, json=body, headers={"X-Fake": fake}) as r:
                assert r.status == 200
                await r.read()
    async with session.post(completions, json={"model": MODEL, "temperature": 0.2}, headers={"X-Fake": "error"}) as r:
        assert r.status == 500
        await r.read()
    async with session.post(completions, data=b"{not json", headers={"X-Fake": "echo"}) as r:
        assert r.status == 200
        await r.read()


def write_calibration(path: Path) -> Path:
    """A calibration for the tiny target (one load level, c = 0.1; 0.05 for greedy requests alone), as
    ``measure`` writes one."""
    from sidecar.calibration import Calibration, Level, ModelCalibration, TemperatureCost, dumps

    greedy = TemperatureCost(0, 0.05, 0.02, 0.09, 0.05)
    path.write_text(dumps(Calibration({MODEL: ModelCalibration(
        MODEL, "draft_model", 4, (Level(1, 0.1, 0.05, 0.15, 0.1, 4, (greedy,)),), "0.32.0",
        "2026-12-04T18:00:00Z")})))
    return path


# Families that appear only once the windows, the tap and the calibration all have data.
DERIVED = ("specdec_bucket_verdict", "specdec_bucket_acceptance_rate", "specdec_bucket_modelled_speedup",
           "specdec_modelled_speedup", "specdec_recommended_schedule_info", "specdec_acceptance_rate",
           "specdec_position_acceptance_rate", "specdec_upstream_reported_acceptance_rate",
           "specdec_bucket_break_even_acceptance_rate", "specdec_bucket_near_break_even_upper_acceptance_rate")


async def fed_sidecar_page(workdir: Path, timeout: float = 30.0) -> str:
    """The /metrics page (Prometheus text format) of a sidecar that has seen everything it can export: its
    upstream's counters moving (``ProgressingVllm``, with a V0 engine beside the V1 one), ``feed``'s traffic
    through its proxy, and a calibration for the tiny target."""
    import aiohttp

    upstream = ProgressingVllm(extra=V0_PAGE)
    await upstream.start()
    sidecar = None
    try:
        sidecar = await start_sidecar(upstream.url, scrape_interval="0.1s", scrape_timeout="0.1s", windows="10m",
                                      verdict_window="10m", models=MODEL, log_level="warning",
                                      calibration=str(write_calibration(workdir / "calibration.json")))
        async with aiohttp.ClientSession() as session:
            await feed(session, sidecar.proxy_url)

            async def page() -> str:
                async with session.get(sidecar.url + "/metrics") as r:
                    assert r.status == 200
                    return await r.text()

            async def complete() -> bool:
                text = await page()
                return all(f"\n{name}{{" in text for name in DERIVED)

            await wait_for(complete, timeout=timeout, what=f"every derived family on the page ({', '.join(DERIVED)})")
            return await page()
    finally:
        if sidecar is not None:
            await sidecar.stop()
        await upstream.stop()


_ENGINE = re.compile(r'engine="0"')


def data_parallel_page(text: str, engines: int = 8) -> str:
    """The one-engine page *text* as a data-parallel server with *engines* engines would export it."""
    out: list[str] = []
    for line in text.splitlines():
        if line.startswith("#") or 'engine="0"' not in line:
            out.append(line)
            continue
        out.extend(_ENGINE.sub(f'engine="{engine}"', line) for engine in range(engines))
    return "\n".join(out) + "\n"


def default_page() -> str:
    return data_parallel_page(fixture_text("vllm-0.32-draft-t3.prom"))


async def write_in_pieces(request: web.Request, body: bytes, size: int, status: int = 200,
                          headers: dict[str, str] | None = None) -> web.StreamResponse:
    """*body* chunked, in *size*-byte writes with a yield to the loop after each: the client sees many reads."""
    response = web.StreamResponse(status=status, headers=headers)
    response.enable_chunked_encoding()
    await response.prepare(request)
    for start in range(0, len(body), size):
        await response.write(body[start : start + size])
        await asyncio.sleep(0)
    await response.write_eof()
    return response


class HostileVllm(_Served):
    """A loopback upstream that behaves like a production vLLM pod rather than a polite fake:

    * ``/metrics`` is big (by default the real vLLM 0.32 capture repeated for eight data-parallel engines,
      over 300 KB) and written in ``write_size``-byte pieces, each followed by a yield to the event loop;
      chunked transfer encoding, no Content-Length;
    * gzip when the client's ``Accept-Encoding`` allows it (``gzip_ok``);
    * idle keep-alive connections are closed after ``keepalive`` seconds (uvicorn, and so vLLM, closes them
      after 5 s: ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``);
    * with ``api_key`` set, every ``/v1/*`` path answers 401 without ``Authorization: Bearer <key>``, while
      ``/metrics`` stays open, as vLLM's ``--api-key`` does;
    * ``POST /v1/completions`` and ``/v1/chat/completions`` replay recorded responses; streams are written
      one SSE event per write.

    Tests change ``page`` between polls to move counters, and read ``hits`` and ``connections``.
    """

    def __init__(self, page: str | None = None, *, api_key: str | None = "sk-hostile", keepalive: float = 5.0,
                 write_size: int = 1000, gzip_ok: bool = True, models: tuple[str, ...] = (MODEL,)) -> None:
        self.page = page if page is not None else default_page()
        self.api_key = api_key
        self.write_size = write_size
        self.gzip_ok = gzip_ok
        self.models = models
        self.status = 200
        self.hits: Counter[str] = Counter()
        self.unauthorized = 0
        self._transports: set[int] = set()
        self.runner_options = {"keepalive_timeout": keepalive, "handler_cancellation": True}

    @property
    def connections(self) -> int:
        """Distinct client connections seen so far."""
        return len(self._transports)

    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        self.hits[request.path] += 1
        if request.transport is not None:
            self._transports.add(id(request.transport))
        if self.api_key is not None and request.path.startswith("/v1/"):
            if request.headers.get("Authorization") != f"Bearer {self.api_key}":
                self.unauthorized += 1
                return web.json_response({"error": "Unauthorized"}, status=401)
        return await handler(request)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        body = self.page.encode()
        headers = {"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        if self.gzip_ok and "gzip" in request.headers.get("Accept-Encoding", ""):
            body = gzip.compress(body)
            headers["Content-Encoding"] = "gzip"
        return await write_in_pieces(request, body, self.write_size, self.status, headers)

    async def list_models(self, request: web.Request) -> web.Response:
        return models_response(self.models)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = json.loads(await request.read())
        chat = request.path.endswith("/chat/completions")
        if body.get("stream"):
            name = "chat-stream.sse" if chat else "completion-stream.sse"
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
            await response.prepare(request)
            for event in sse_events((FIXTURES / name).read_bytes()):
                await response.write(event)
                await asyncio.sleep(0)
            await response.write_eof()
            return response
        name = "chat-nonstream.json" if chat else "completion-nonstream.json"
        return await write_in_pieces(request, (FIXTURES / name).read_bytes(), self.write_size,
                                     headers={"Content-Type": "application/json"})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024 * 1024)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.list_models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.completions)
        return app


class HostileRelay(_Served):
    """Put in front of a real vLLM: its ``/metrics`` page comes back in ``write_size``-byte writes, gzipped
    when asked, and every other request is relayed as is (status, headers, body streamed in pieces); idle
    connections close after ``keepalive`` seconds, as uvicorn's do."""

    HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"})

    def __init__(self, target: str, *, write_size: int = 512, keepalive: float = 5.0) -> None:
        self.target = target.rstrip("/")
        self.write_size = write_size
        self.metrics_polls = 0
        self.gzip_polls = 0
        self.runner_options = {"keepalive_timeout": keepalive}
        self._session = None

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self.HOP}
        body = await request.read()
        async with self._session.request(request.method, self.target + request.raw_path, headers=headers,
                                         data=body or None) as upstream:
            payload = await upstream.read()
            out = {k: v for k, v in upstream.headers.items() if k.lower() not in self.HOP}
            if request.path == "/metrics" and upstream.status == 200:
                self.metrics_polls += 1
                if "gzip" in request.headers.get("Accept-Encoding", ""):
                    self.gzip_polls += 1
                    payload = gzip.compress(payload)
                    out["Content-Encoding"] = "gzip"
            return await write_in_pieces(request, payload, self.write_size, upstream.status, out)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._relay)
        return app

    async def start(self) -> None:
        import aiohttp

        self._session = aiohttp.ClientSession(auto_decompress=True)
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        if self._session is not None:
            await self._session.close()
            self._session = None


# --- deterministic streams for load tests (a client can check every byte) ------------------------------------

def load_event(stream: int, j: int) -> bytes:
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
    return b"".join(load_event(stream, j) for j in range(events)) + final_events(stream, events)


FLOOD_CHUNK = b"data: " + b"x" * (16 * 1024 - 8) + b"\n\n"


class LoadUpstream(_Served):
    """``POST /v1/completions`` with ``stream_id`` and ``events``: that many ``load_event``s ``interval`` s
    apart, then ``final_events``. With ``expect`` set, streams are held at their first event until that many
    are open. ``"flood": true``: writes ``FLOOD_CHUNK`` as fast as the proxy lets it, counting bytes in
    ``written``."""

    runner_options = {"handler_cancellation": True, "backlog": 4096}

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.expect = 0
        self.open_streams = 0
        self.peak_open = 0
        self.written: dict[int, int] = {}  # flood stream -> bytes written so far
        self.all_in = asyncio.Event()

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
                await response.write(load_event(stream, j))
                await asyncio.sleep(self.interval)
            await response.write(final_events(stream, events))
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.open_streams -= 1
        return response

    async def models(self, request: web.Request) -> web.Response:
        return models_response()

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=(FIXTURES / "vllm-0.32-draft-t1.prom").read_bytes(), content_type="text/plain")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/metrics", self.metrics)
        return app


# --- HTTP/1.1 on raw sockets ---------------------------------------------------------------------------------

async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[str, str]]:
    """A request or response head: (first line, headers by lower-case name)."""
    lines = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).split(b"\r\n")
    headers = {}
    for line in lines[1:]:
        if b":" in line:
            key, _, val = line.partition(b":")
            headers[key.strip().lower().decode()] = val.strip().decode("latin-1")
    return lines[0], headers


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body, decoded (no trailers)."""
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return body
        body += chunk[:-2]


class _RawServed:
    """A raw-socket server on 127.0.0.1 handing each connection to ``_handle``."""

    server: asyncio.base_events.Server | None = None
    port: int = 0
    connections: int = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def __aenter__(self):
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Scripted(_RawServed):
    """An upstream that parses each request (Content-Length or chunked body), records it exactly as it
    arrived in ``requests`` and answers through ``answer(line, headers, body, writer) -> keep the
    connection``."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.requests: list[tuple[bytes, dict[str, str], bytes]] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                line, headers = await read_head(reader)
                if headers.get("transfer-encoding", "").lower() == "chunked":
                    body = await read_chunked(reader)
                else:
                    body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append((line, headers, body))
                keep = await self.answer(line, headers, body, writer)
                await writer.drain()
                if not keep:
                    return
        except (asyncio.IncompleteReadError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()


class RawUpstream(_RawServed):
    """A minimal HTTP/1.1 upstream on raw sockets (no server-side decompression, exact bytes):

    * ``X-Mode: echo``: answers the SHA-256 and length of the body exactly as it arrived, and its headers;
    * ``X-Mode: stream-error``: a 200 event stream with two content chunks and then vLLM's error event;
    * ``X-Mode: big``: a 200 event stream of ``big`` bytes written as fast as the client takes them;
    * ``X-Mode: slow``: a 200 event stream of 40 small events 50 ms apart;
    * ``X-Mode: hold``: reads the request and never answers (until the client goes away);
    * otherwise the recorded non-streamed completion.

    ``keepalive``: a connection idle that long is closed by the server, but the client only notices when its
    next request arrives (the close and the request cross on the wire, as with uvicorn under load): such a
    request is dropped unanswered and counted in ``stale``.
    """

    def __init__(self, keepalive: float | None = None, big: int = 32 * 1024 * 1024) -> None:
        self.keepalive = keepalive
        self.big = big
        self.stale = 0
        self.answered = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        loop = asyncio.get_running_loop()
        idle_since = loop.time()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if self.keepalive is not None and loop.time() - idle_since >= self.keepalive:
                    self.stale += 1
                    writer.transport.abort()
                    return
                lines = head.decode("latin-1").split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if ":" in line:
                        key, _, val = line.partition(":")
                        headers[key.strip().lower()] = val.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                mode = headers.get("x-mode", "")
                if mode == "hold":
                    await reader.read()
                    return
                if mode == "echo":
                    data = json.dumps({"sha256": hashlib.sha256(body).hexdigest(), "len": len(body),
                                       "headers": headers}).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                                 % len(data) + data)
                elif mode in ("stream-error", "big", "slow"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n")
                    if mode == "stream-error":
                        events = [b'data: {"id":"c","object":"text_completion","model":"tiny-target","choices":'
                                  b'[{"index":0,"text":"a","finish_reason":null}]}\n\n'] * 2 + [
                            b'data: {"error":{"message":"engine died","type":"InternalServerError","code":500}}\n\n',
                            b"data: [DONE]\n\n"]
                    elif mode == "slow":
                        events = [b'data: {"choices":[{"index":0,"text":"x"}]}\n\n'] * 40
                    else:
                        piece = b'data: {"choices":[{"index":0,"text":"' + b"x" * 4000 + b'"}]}\n\n'
                        events = [piece] * (self.big // len(piece))
                    for event in events:
                        writer.write(b"%x\r\n" % len(event) + event + b"\r\n")
                        await writer.drain()
                        if mode == "slow":
                            await asyncio.sleep(0.05)
                    writer.write(b"0\r\n\r\n")
                else:
                    data = (FIXTURES / "completion-nonstream.json").read_bytes()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                                 % len(data) + data)
                await writer.drain()
                self.answered += 1
                idle_since = loop.time()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


# --- the sidecar ---------------------------------------------------------------------------------------------

class Recorder:
    """Stands in for the tap's metrics behind a bare ``Proxy``: records every ``request_done`` call, so a test
    can check each request is recorded exactly once and with what outcome."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def request_done(self, info, outcome, started, ended) -> None:
        self.calls.append((info, outcome))


SIDECAR_DEFAULTS = {"scrape_interval": "0.5s", "scrape_timeout": "0.5s", "windows": "1m", "verdict_window": "1m",
                    "proxy_port": 0, "proxy_host": "127.0.0.1", "min_drafts": 1}


@dataclass
class Sidecar:
    """The sidecar (metrics app and proxy) running in this event loop."""

    app: web.Application
    runner: web.AppRunner
    port: int
    registry: object

    @property
    def proxy_port(self) -> int:
        from sidecar.app import PROXY_PORT

        return self.app[PROXY_PORT]

    @property
    def monitor(self):
        from sidecar.app import MONITOR

        return self.app[MONITOR]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_sidecar(upstream: str, *, wait_up: bool = False, registry=None, **settings) -> Sidecar:
    """The sidecar in front of *upstream*, in this loop, on ports of its own; *settings* override
    ``SIDECAR_DEFAULTS`` (``build_settings``' names). ``wait_up``: return once it has read the upstream."""
    from prometheus_client import CollectorRegistry

    from sidecar.app import create_app
    from sidecar.config import build_settings

    registry = registry if registry is not None else CollectorRegistry()
    app = create_app(build_settings(upstream=upstream, **{**SIDECAR_DEFAULTS, **settings}), registry)
    runner, port = await serve_loopback(app)
    sidecar = Sidecar(app, runner, port, registry)
    if wait_up:
        await wait_for(lambda: sidecar.monitor.state.up, timeout=30, what=f"the sidecar reading {upstream}")
    return sidecar


@dataclass
class SidecarProcess:
    """``python -m sidecar serve`` as its own process, as in the pod; ``start`` returns once the proxy port
    accepts connections."""

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


# --- load scenarios (loopback/test_load.py at a small scale, bench/bench_load.py at full scale) --------------

async def run_streams(proxy: str, n: int, events: int, *, upstream: LoadUpstream) -> dict:
    """N concurrent streams through *proxy*; returns the byte-level comparison and timings."""
    import aiohttp

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
            "byte_differences": diff_bytes, "statuses": statuses, "errors": len(errors),
            "bytes_per_stream": len(expected_body(0, events))}


async def open_slow_stream(port: int, stream: int, rcvbuf: int = 32 * 1024) -> socket.socket:
    """A raw client that sends a streamed (flood) request and then reads only when told to."""
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


async def run_slow_clients(sidecar: SidecarProcess, upstream: LoadUpstream, m: int, stall: float, rate: float,
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
