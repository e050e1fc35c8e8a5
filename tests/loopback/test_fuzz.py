"""Hostile input: whatever vLLM pages, request bodies and response streams contain, no exception escapes
the readers, and whatever crosses the proxy is relayed exactly while the label set stays bounded.

Property tests (hypothesis) drive the exposition reader and the vLLM page reader, the request reader and
both response observers with random bytes, truncations of real captures, huge and non-finite numbers, deep
JSON nesting and wrong types; each result then goes through the rest of the pipeline that would see it in
the pod (monitor and collector for pages, per-request metrics for requests), and the rendered /metrics must
still parse. The proxy half runs the real sidecar on loopback in front of an upstream that answers with
whatever the test chose, and compares bytes with what the upstream sent.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import random
import sys
import threading
from dataclasses import dataclass, field

import pytest
from aiohttp import web
from hypothesis import HealthCheck, example, given, settings, strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fakes import FIXTURES, fixture_text, serve_loopback
from sidecar.app import MONITOR, PROXY_PORT, create_app
from sidecar.buckets import TemperatureBuckets
from sidecar.config import build_settings
from sidecar.tap.metrics import (
    OTHER_MODEL,
    UNATTRIBUTED_REASONS,
    UNKNOWN_MODEL,
    UNREAD_BUCKET,
    ModelNames,
    RequestMetrics,
)
from sidecar.tap.observe import (
    OBSERVED_PATHS,
    BodyObserver,
    Outcome,
    RequestInfo,
    SpecStats,
    SseObserver,
    read_request,
)
from sidecar.upstream.exposition import Exposition, parse
from sidecar.upstream.vllm_metrics import WANTED, VllmSnapshot, read_vllm_metrics

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BUCKETS = TemperatureBuckets()
GOOD_PAGE = (FIXTURES / "vllm-0.32-draft-t1.prom").read_bytes()
PAGES = [fixture_text(n) for n in ("vllm-0.32-draft-t3.prom", "vllm-0.32-ngram.prom", "vllm-0.32-draft-restarted.prom")]

# --- building blocks ---------------------------------------------------------------------------------------

HUGE_TOKENS = ["1e308", "1.7976931348623157e308", "1e309", "-1e309", "9" * 400, "9" * 5000, "NaN", "+Inf", "-Inf",
               "nan", "inf", "0x10", "1_000", "", "--1", "1e", ".", "-0", "4.9e-324", "1.0 1.0 1.0", "1 notatime"]
weird_numbers = st.one_of(
    st.sampled_from(HUGE_TOKENS),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-(10**400), max_value=10**400).map(str),
)


def _deep(depth: int, opener: str = "[") -> str:
    return opener * depth


@st.composite
def mutated_page(draw) -> str:
    """A real vLLM page with some wanted lines' values, labels or tails damaged, then maybe truncated."""
    lines = draw(st.sampled_from(PAGES)).splitlines()
    wanted = [i for i, line in enumerate(lines) if line.startswith(tuple(WANTED))]
    for i in draw(st.lists(st.sampled_from(wanted), max_size=12)):
        line = lines[i]
        kind = draw(st.integers(0, 5))
        if kind == 0:  # value replaced
            lines[i] = line.rsplit(" ", 1)[0] + " " + draw(weird_numbers)
        elif kind == 1:  # cut anywhere
            lines[i] = line[: draw(st.integers(0, len(line)))]
        elif kind == 2:  # a label value made hostile
            lines[i] = line.replace('="', '="' + draw(st.sampled_from(['\\', '\\"', '"', '}', '\n', 'x\\\\'])), 1)
        elif kind == 3:  # position label garbage / huge
            lines[i] = line.replace('position="', 'position="' + draw(st.sampled_from(["x", "9" * 5000, "-1", " 1"])), 1)
        elif kind == 4:  # duplicated with a huge value: sums of finite values overflow
            lines.append(line.rsplit(" ", 1)[0] + " 1.7e308")
            lines[i] = line.rsplit(" ", 1)[0] + " 1.7e308"
        else:  # random text spliced in
            lines[i] = line + draw(st.text(max_size=40))
    text = "\n".join(lines) + "\n"
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    return text


hostile_pages = st.one_of(
    mutated_page(),
    st.text(max_size=3000),
    st.binary(max_size=3000).map(lambda b: b.decode("utf-8", "replace")),
    st.lists(st.sampled_from(sorted(WANTED)), max_size=30).flatmap(
        lambda names: st.lists(weird_numbers, min_size=len(names), max_size=len(names)).map(
            lambda values: "\n".join(f'{n}{{engine="0",model_name="m"}} {v}' for n, v in zip(names, values))
        )
    ),
)

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**400), max_value=10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12,
)


def dumps(obj: object) -> bytes:
    # allow_nan: Python's json writes NaN/Infinity, and reads them back; vLLM never would, a hostile hop might.
    return json.dumps(obj, allow_nan=True).encode()


FIELDS = ["model", "temperature", "stream", "n", "stream_options", "prompt", "messages", "max_tokens"]


@st.composite
def request_bodies(draw) -> bytes:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        return draw(st.binary(max_size=500))
    if kind == 1:  # deep nesting, inside a field or as the whole body
        depth = draw(st.sampled_from([10, 1000, 5000, 100_000]))
        opener = draw(st.sampled_from(["[", '{"a":']))
        whole = _deep(depth, opener).encode()
        return whole if draw(st.booleans()) else b'{"model":"m","temperature":' + whole + b"}"
    if kind == 2:  # the right keys with any types and values
        keys = draw(st.lists(st.sampled_from(FIELDS), unique=True))
        return dumps({k: draw(json_values) for k in keys})
    if kind == 3:  # numbers as raw text: huge, tiny, non-finite
        raw = draw(st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "-0.0", "1e-400", "9" * 4000, "9" * 5000,
                                    "0.30000000000000004", "1" + "0" * 310, "true", '"0.5"', "[0.5]", "{}"]))
        return b'{"model":"tiny-target","temperature":' + raw.encode() + b',"n":' + raw.encode() + b"}"
    body = draw(st.sampled_from([b'{"model":"tiny-target","temperature":0.2,"stream":true}',
                                 b'{"model":"tiny-target","prompt":"x"}']))
    return body[: draw(st.integers(0, len(body)))]


def spec_object(draw) -> dict:
    number = st.one_of(json_scalars, st.sampled_from([10**400, -1, 0, 2**63, 1e308]))
    return {
        "num_accepted_draft_tokens": draw(number), "num_draft_tokens": draw(number),
        "num_spec_steps": draw(number), "draft_acceptance_rate": draw(number),
        "mean_acceptance_length": draw(number), "acceptance_histogram": draw(json_values),
    }  # fmt: skip


# Numbers where a count stops being one: the edges of 0..2**53, booleans, floats, strings.
COUNT_LIKE = st.one_of(st.integers(0, 500), st.sampled_from([-1, 2**53, 2**53 + 1, 2**63, True, False, 1.0, None, "3"]))


@st.composite
def response_events(draw) -> list[object]:
    """A stream's events: real chunks, chunks with hostile usage/metrics, garbage, deep nesting."""
    events: list[object] = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 4))
        if kind == 0:
            events.append({"choices": [{"index": 0, "text": draw(st.text(max_size=5)),
                                        "delta": draw(json_values), "finish_reason": draw(json_values)}]})
        elif kind == 1:
            events.append({"choices": draw(json_values), "usage": {"completion_tokens": draw(json_values)},
                           "metrics": {"speculative_decoding": spec_object(draw)}})
        elif kind == 2:
            events.append({"type": "response.completed",
                           "response": {"usage": {"output_tokens": draw(json_values)},
                                        "metrics": {"speculative_decoding": spec_object(draw)}}})
        elif kind == 3:
            events.append(draw(json_values))
        else:
            events.append(_deep(draw(st.sampled_from([1000, 100_000]))))
    return events


def sse_bytes(events: list[object]) -> bytes:
    out = b""
    for e in events:
        out += b"data: " + (e.encode() if isinstance(e, str) else dumps(e)) + b"\n\n"
    return out + b"data: [DONE]\n\n"


def split_randomly(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def render_parses(registry: CollectorRegistry) -> int:
    """The registry renders and Prometheus' own parser reads it back; returns the number of samples."""
    text = generate_latest(registry).decode()
    return sum(len(f.samples) for f in text_string_to_metric_families(text))


# --- the scrape path ---------------------------------------------------------------------------------------

@FUZZ
@given(hostile_pages)
def test_exposition_and_page_reader_never_raise(text):
    exposition = parse(text, WANTED)
    assert isinstance(exposition, Exposition)
    assert all(s.name in WANTED for s in exposition.samples)
    snapshot = read_vllm_metrics(text)
    assert isinstance(snapshot, VllmSnapshot)
    for sample in snapshot.engines.values():
        for name in ("drafts", "draft_tokens", "accepted_tokens", "generation_tokens", "running", "kv_usage"):
            v = getattr(sample, name)
            assert v is None or math.isfinite(v), f"{name} = {v} passed through from a hostile page"


@FUZZ
@given(st.lists(st.one_of(hostile_pages, st.sampled_from(PAGES)), min_size=1, max_size=6))
def test_hostile_pages_through_the_running_sidecar(stack, pages):
    """Hostile pages served over HTTP to the real sidecar: each poll goes through the scraper, the page
    reader, the monitor and the collector; /metrics must still render and parse after every one."""
    try:
        for text in pages:
            stack.page = text.encode("utf-8", "surrogatepass")
            stack.call(stack.monitor.poll_once())
            assert stack.call(_render(stack)) > 0
    finally:
        stack.page = GOOD_PAGE


async def _render(stack: "Stack") -> int:
    return render_parses(stack.registry)


# --- the request tap ---------------------------------------------------------------------------------------

@FUZZ
@given(request_bodies(), st.sampled_from(sorted(set(OBSERVED_PATHS.values()))))
def test_request_reader_never_raises(body, endpoint):
    info = read_request(endpoint, body)
    assert isinstance(info, RequestInfo)
    assert BUCKETS.bucket(info.temperature, info.temperature_present) in BUCKETS.labels
    assert ModelNames(["tiny-target"]).label(info.model) in {"tiny-target", OTHER_MODEL, UNKNOWN_MODEL}


@FUZZ
@given(response_events(), st.lists(st.integers(0, 10**6), max_size=20), st.binary(max_size=300), st.booleans())
def test_sse_observer_never_raises_and_the_outcome_records(events, cuts, noise, add_noise):
    data = sse_bytes(events)
    if add_noise:
        data = data[: len(data) // 2] + noise + data[len(data) // 2:]
    outcome = Outcome(status=200)
    observer = SseObserver()
    for i, piece in enumerate(split_randomly(data, cuts)):
        observer.feed(piece, float(i), outcome)
    observer.finish(99.0, outcome)
    # However the stream was cut into reads, it records what one read of it records.
    whole = Outcome(status=200)
    observer = SseObserver()
    observer.feed(data, 0.0, whole)
    observer.finish(99.0, whole)
    assert _recorded(outcome) == _recorded(whole)
    _assert_attributed_or_a_reason(outcome)
    _record(b'{"model":"m","temperature":0.2,"stream":true}', outcome)


@FUZZ
@given(st.one_of(response_events().map(lambda e: dumps(e[0]) if e and not isinstance(e[0], str) else b"{}"),
                 st.builds(lambda d: {"usage": {"completion_tokens": d}, "metrics": {"speculative_decoding": d}},
                           json_values).map(dumps),
                 st.builds(lambda a, d, n, t: dumps({"usage": {"completion_tokens": t}, "metrics": {
                     "speculative_decoding": {"num_accepted_draft_tokens": a, "num_draft_tokens": d,
                                              "num_spec_steps": n}}}),
                           COUNT_LIKE, COUNT_LIKE, COUNT_LIKE, COUNT_LIKE),
                 st.sampled_from([_deep(100_000).encode(), _deep(100_000, '{"a":').encode(), b""]),
                 st.binary(max_size=500)),
       st.lists(st.integers(0, 10**6), max_size=10), st.sampled_from([16, 1024, 4 * 1024 * 1024]))
@example(dumps({"usage": {"completion_tokens": 3}, "metrics": {"speculative_decoding": {
    "num_accepted_draft_tokens": 2**53 + 1, "num_draft_tokens": 2**53, "num_spec_steps": 1}}}), [7], 1024)
@example(dumps({"usage": {"completion_tokens": True}, "metrics": {"speculative_decoding": {
    "num_accepted_draft_tokens": 2**53, "num_draft_tokens": 2**53, "num_spec_steps": 0}}}), [], 1024)
def test_body_observer_never_raises_and_the_outcome_records(body, cuts, limit):
    outcome = Outcome(status=200)
    observer = BodyObserver(limit)
    for i, piece in enumerate(split_randomly(body, cuts)):
        observer.feed(piece, float(i), outcome)
    observer.finish(99.0, outcome)
    assert _recorded(outcome) == _expected_body_outcome(body, limit)
    _assert_attributed_or_a_reason(outcome)
    _record(b'{"model":"m","temperature":0}', outcome)


@pytest.mark.parametrize("where", ["request", "sse", "body"])
@pytest.mark.parametrize("depth", [sys.getrecursionlimit() * 2, 100_000])
def test_deep_json_nesting_is_caught(where, depth):
    """json.loads raises RecursionError (not ValueError) past the interpreter's nesting limit."""
    deep = _deep(depth).encode()
    if where == "request":
        assert read_request("completions", deep).parse_error == "unparsable_request"
        return
    outcome = Outcome(status=200)
    observer = SseObserver() if where == "sse" else BodyObserver(len(deep) + 1)
    observer.feed(b"data: " + deep + b"\n\n" if where == "sse" else deep, 1.0, outcome)
    observer.finish(2.0, outcome)
    assert outcome.spec is None and outcome.unattributed is not None


def test_huge_per_request_numbers_do_not_escape_the_recorder():
    """vLLM's integers are unbounded in JSON: 10**400 accepted tokens must not raise anywhere."""
    big = 10**400
    body = dumps({"usage": {"completion_tokens": big}, "metrics": {"speculative_decoding": {
        "num_accepted_draft_tokens": big, "num_draft_tokens": 1, "num_spec_steps": 1}}})
    outcome = Outcome(status=200)
    observer = BodyObserver(1 << 20)
    observer.feed(body, 1.0, outcome)
    observer.finish(2.0, outcome)
    # Beyond 2**53 a count is not a real token count: neither the tokens nor the metrics are taken.
    assert (outcome.completion_tokens, outcome.spec, outcome.unattributed) == (None, None, "no_spec_metrics")
    registry = _record(b'{"model":"m","temperature":0}', outcome)
    assert registry.get_sample_value("specdec_requests_unattributed_total", {"reason": "no_spec_metrics"}) == 1
    assert registry.get_sample_value("specdec_request_accepted_tokens_total",
                                     {"model": "m", "temperature_bucket": "0", "source": "vllm"}) is None


def _recorded(outcome: Outcome) -> tuple:
    """What an outcome says about its request, its clock readings aside."""
    assert outcome.finished
    return (outcome.status, outcome.completion_tokens, outcome.spec, outcome.unattributed, outcome.stream_error)


def _count(value: object) -> bool:
    """A token count as vLLM sends one: a JSON integer, not a boolean, 0..2**53."""
    return type(value) is int and 0 <= value <= 2**53


def _expected_body_outcome(body: bytes, limit: int) -> tuple:
    """What a non-streamed response of *body* must record, worked out from the body itself."""
    if len(body) > limit:
        return (200, None, None, "response_too_large", False)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        data = None
    if not isinstance(data, dict):
        return (200, None, None, "unparsable_response", False)
    usage = data.get("usage")
    tokens = usage.get("completion_tokens", usage.get("output_tokens")) if isinstance(usage, dict) else None
    metrics = data.get("metrics")
    spec = metrics.get("speculative_decoding") if isinstance(metrics, dict) else None
    counts = [spec.get(k) for k in ("num_accepted_draft_tokens", "num_draft_tokens", "num_spec_steps")] \
        if isinstance(spec, dict) else []
    if counts and all(_count(c) for c in counts):
        stats = SpecStats(accepted=counts[0], drafted=counts[1], steps=counts[2], source="vllm")
        return (200, tokens if _count(tokens) else None, stats, None, False)
    return (200, tokens if _count(tokens) else None, None, "no_spec_metrics", False)


def _assert_attributed_or_a_reason(outcome: Outcome) -> None:
    """A finished outcome either carries the request's numbers or names why not, never both nor neither."""
    assert (outcome.spec is None) != (outcome.unattributed is None), outcome
    assert outcome.unattributed is None or outcome.unattributed in UNATTRIBUTED_REASONS
    if outcome.spec is not None:
        assert all(_count(v) for v in (outcome.spec.accepted, outcome.spec.steps))
        assert outcome.spec.drafted is None or _count(outcome.spec.drafted)


def _record(request_body: bytes, outcome: Outcome) -> CollectorRegistry:
    """Record *outcome* as the tap does; the request is counted once, and once more as unattributed when it
    names a reason, or its accepted tokens are counted."""
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry, BUCKETS, ModelNames(["m"]))
    info = read_request("completions", request_body)
    metrics.request_done(info, outcome, 0.0, 1.0)
    metrics.totals()  # the tap's windows read these; they must not raise either
    render_parses(registry)
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in registry.collect() for s in f.samples
               if not s.name.endswith("_created")}
    requests = sum(v for (name, _), v in samples.items() if name == "specdec_requests_total")
    unattributed = {dict(labels)["reason"]: v for (name, labels), v in samples.items()
                    if name == "specdec_requests_unattributed_total" and v}
    assert requests == 1
    if outcome.unattributed is not None or outcome.spec is None:
        assert unattributed == {outcome.unattributed or "no_spec_metrics": 1}
    else:
        assert unattributed == {}
        bucket = BUCKETS.bucket(info.temperature, info.temperature_present)
        assert registry.get_sample_value("specdec_request_accepted_tokens_total", {
            "model": "m", "temperature_bucket": bucket, "source": outcome.spec.source}) == outcome.spec.accepted
    return registry


# --- through the proxy -------------------------------------------------------------------------------------

@dataclass
class Stack:
    """The real sidecar (metrics app + proxy) and a scriptable upstream, on a loop in a background thread,
    so synchronous hypothesis tests can drive them with plain HTTP."""

    answers: dict[str, tuple[int, str, list[bytes]]] = field(default_factory=dict)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    proxy_port: int = 0
    page: bytes = b""
    app: web.Application | None = None
    loop: asyncio.AbstractEventLoop | None = None

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        key = request.headers.get("X-Answer", "")
        if key not in self.answers:
            return web.json_response({"id": "x", "choices": [], "usage": {"completion_tokens": 1}})
        status, content_type, pieces = self.answers[key]
        response = web.StreamResponse(status=status, headers={"Content-Type": content_type})
        await response.prepare(request)
        for piece in pieces:
            await response.write(piece)
        await response.write_eof()
        return response

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "tiny-target", "object": "model"}]})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.page, content_type="text/plain")

    def call(self, coro, timeout: float = 30.0):
        """Run *coro* on the stack's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def start(self) -> None:
        upstream = web.Application(client_max_size=64 * 1024 * 1024)
        upstream.router.add_get("/v1/models", self._models)
        upstream.router.add_get("/metrics", self._metrics)
        upstream.router.add_route("*", "/{tail:.*}", self._answer)
        self._up_runner, up_port = await serve_loopback(upstream)
        settings_ = build_settings(upstream=f"http://127.0.0.1:{up_port}", scrape_interval="1s",
                                   scrape_timeout="1s", windows="10m", verdict_window="10m", proxy_port=0,
                                   proxy_host="127.0.0.1", min_drafts=1)
        self.app = create_app(settings_, self.registry)
        self._runner, self.metrics_port = await serve_loopback(self.app)
        self.proxy_port = self.app[PROXY_PORT]
        self.monitor = self.app[MONITOR]

    async def stop(self) -> None:
        await self._runner.cleanup()
        await self._up_runner.cleanup()


@pytest.fixture(scope="module")
def stack():
    s = Stack(page=GOOD_PAGE)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(s.start(), loop).result(30)
    s.loop = loop
    yield s
    asyncio.run_coroutine_threadsafe(s.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def _post(port: int, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json", **headers})
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type", ""), r.read()
    finally:
        conn.close()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(
    request_body=request_bodies().filter(lambda b: len(b) < 200_000),
    status=st.sampled_from([200, 200, 200, 400, 422, 500]),
    content_type=st.sampled_from(["text/event-stream; charset=utf-8", "application/json", "application/octet-stream"]),
    answer=st.one_of(st.binary(max_size=4000), response_events().map(sse_bytes), request_bodies()),
    cuts=st.lists(st.integers(0, 10**6), max_size=12),
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/embeddings"]),
)
def test_random_bodies_relayed_exactly(stack, request_body, status, content_type, answer, cuts, path):
    key = f"a{random.getrandbits(64):x}"
    pieces = split_randomly(answer, cuts)
    stack.answers[key] = (status, content_type, pieces)
    try:
        got_status, got_type, got_body = _post(stack.proxy_port, path, request_body, {"X-Answer": key})
    finally:
        del stack.answers[key]
    assert (got_status, got_type, got_body) == (status, content_type, answer)


@pytest.mark.timeout(300)
def test_ten_thousand_model_names_and_odd_temperatures_keep_labels_bounded(stack):
    """10 000 distinct model names and 10 000 odd temperatures: the tap's label values stay in fixed sets
    and its series count stops growing once every (model label, bucket, status) combination was seen."""
    temperatures = ["0", "-0.0", "0.3", "0.30000000000000004", "1e-320", "1e999", "-1e999", "NaN", "Infinity",
                    "-1", "2.5", '"0.5"', "true", "null", "[0.2]", '{"t":1}', "1" + "0" * 400]

    def family_series(prefix: str = "specdec_request") -> tuple[int, set[str], set[str], float]:
        text = stack.call(_metrics_text(stack))
        series, models, buckets, counted = 0, set(), set(), 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith(prefix):
                    series += 1
                    models.add(sample.labels.get("model", ""))
                    buckets.add(sample.labels.get("temperature_bucket", ""))
                if sample.name == "specdec_requests_total":
                    counted += sample.value
        return series, models - {""}, buckets - {""}, counted

    async def flood(n: int, offset: int) -> None:
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as session:
            async def one(i: int) -> None:
                t = temperatures[i % len(temperatures)]
                body = f'{{"model":"model-{i}-{"x" * (i % 50)}","temperature":{t},"prompt":"p"}}'.encode()
                async with session.post(f"http://127.0.0.1:{stack.proxy_port}/v1/completions", data=body,
                                        headers={"Content-Type": "application/json"}) as r:
                    assert r.status == 200
                    await r.read()

            sem = asyncio.Semaphore(32)

            async def bounded(i: int) -> None:
                async with sem:
                    await one(i)

            await asyncio.gather(*(bounded(i) for i in range(offset, offset + n)))

    def run(n: int, offset: int) -> None:
        asyncio.run(flood(n, offset))

    _, _, _, before = family_series()
    run(1000, 0)
    first, _, _, counted_first = family_series()
    assert counted_first - before == 1000, "every observed request is counted exactly once"
    run(9000, 1000)
    series, models, buckets, counted = family_series()
    total = stack.call(_metrics_text(stack))
    print(f"\nafter 10 000 distinct model names: {series} specdec_request* series "
          f"(after the first 1000: {first}); models {sorted(models)}; buckets {sorted(buckets)}; "
          f"whole /metrics {sum(1 for l in total.splitlines() if l and not l.startswith('#'))} samples")
    assert models <= {"tiny-target", OTHER_MODEL, UNKNOWN_MODEL}
    assert buckets <= set(BUCKETS.labels) | {UNREAD_BUCKET}  # unread: body over the limit or not JSON
    assert series == first
    assert counted - before == 10_000, "every observed request is counted exactly once"


async def _metrics_text(stack: Stack) -> str:
    return generate_latest(stack.registry).decode()
