"""Observers on recorded real vLLM responses: what they read, and that garbage never raises."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fakes import FIXTURES
from sidecar.tap.observe import BodyObserver, Outcome, SseObserver, read_request


def feed_all(observer, data: bytes, sizes=(7, 64, 1, 300)) -> Outcome:
    outcome = Outcome(status=200)
    i, k = 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        observer.feed(data[i : i + n], float(i), outcome)
        i += n
        k += 1
    observer.finish(float(len(data)), outcome)
    return outcome


def final_spec(name: str) -> dict:
    if name.endswith(".json"):
        return json.loads((FIXTURES / name).read_bytes())["metrics"]["speculative_decoding"]
    events = [l[6:] for l in (FIXTURES / name).read_text().splitlines() if l.startswith("data: {")]
    return json.loads(events[-1])["metrics"]["speculative_decoding"]


@pytest.mark.parametrize("name", ["completion-nonstream.json", "chat-nonstream.json"])
def test_body_observer_reads_vllm_metrics(name):
    outcome = feed_all(BodyObserver(1 << 20), (FIXTURES / name).read_bytes())
    spec = final_spec(name)
    assert outcome.spec.source == "vllm"
    assert (outcome.spec.accepted, outcome.spec.drafted, outcome.spec.steps) == (
        spec["num_accepted_draft_tokens"], spec["num_draft_tokens"], spec["num_spec_steps"])
    assert outcome.unattributed is None


@pytest.mark.parametrize("name", ["completion-stream.sse", "chat-stream.sse"])
def test_sse_observer_reads_final_usage_chunk(name):
    data = (FIXTURES / name).read_bytes()
    outcome = feed_all(SseObserver(), data)
    spec = final_spec(name)
    assert outcome.spec.source == "vllm"
    assert outcome.spec.accepted == spec["num_accepted_draft_tokens"]
    assert outcome.spec.drafted == spec["num_draft_tokens"]
    assert outcome.content_chunks >= 1 and outcome.first_token_at is not None
    # vLLM's own relation: one content chunk per verify step (+ the prefill step's first token).
    assert outcome.completion_tokens - outcome.content_chunks == pytest.approx(spec["num_accepted_draft_tokens"], abs=4)


def test_stream_steps_source_without_vllm_metrics():
    data = (FIXTURES / "completion-stream-no-spec-metrics.sse").read_bytes()
    outcome = feed_all(SseObserver(), data)
    assert outcome.spec.source == "stream_steps"
    assert outcome.spec.drafted is None
    assert outcome.spec.accepted == outcome.completion_tokens - outcome.content_chunks


def test_stream_without_usage_is_unattributed():
    data = b'data: {"choices":[{"index":0,"text":"a"}]}\n\ndata: [DONE]\n\n'
    outcome = feed_all(SseObserver(), data)
    assert outcome.spec is None and outcome.unattributed == "no_usage"


@given(st.binary(max_size=2000))
def test_observers_never_raise_on_garbage(data):
    for observer in (SseObserver(), BodyObserver(1000)):
        outcome = feed_all(observer, data)
        assert outcome.finished


@pytest.mark.parametrize(
    ("body", "expect"),
    [
        (b'{"model":"m","temperature":0.2,"stream":true,"stream_options":{"include_usage":true}}',
         dict(model="m", temperature=0.2, stream=True, include_usage=True, temperature_present=True)),
        (b'{"model":"m"}', dict(model="m", temperature_present=False, stream=False, n=1)),
        (b'{"model":7,"n":"x","stream":"yes"}', dict(model=None, n=1, stream=False)),
        (b'[1,2]', dict(parse_error="unparsable_request")),
        (b'\xff\xfe', dict(parse_error="unparsable_request")),
        (None, dict(parse_error="body_too_large")),
    ],
)
def test_read_request(body, expect):
    info = read_request("completions", body)
    for key, value in expect.items():
        assert getattr(info, key) == value


def test_end_of_sequence_only_stream_still_has_a_first_token_time():
    data = (b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n'
            b'data: {"choices":[{"index":0,"delta":{"content":""},"finish_reason":"stop"}]}\n\n'
            b'data: {"choices":[],"usage":{"completion_tokens":1}}\n\ndata: [DONE]\n\n')
    outcome = Outcome(status=200)
    observer = SseObserver()
    for i, event in enumerate([e + b"\n\n" for e in data.split(b"\n\n") if e]):
        observer.feed(event, float(i + 1), outcome)
    observer.finish(9.0, outcome)
    assert outcome.first_token_at == 2.0  # the chunk carrying finish_reason, not the role chunk
    assert outcome.content_chunks == 0


# --- the fast path: bytes checks instead of a JSON parse per event -------------------------------------

def reference_outcome(data: bytes) -> tuple:
    """What a full JSON parse of every event says: content chunks, first-token chunk, completion tokens,
    speculative metrics (the observer's contract, computed the slow and obvious way)."""
    chunks, first, tokens, spec = 0, None, None, None
    for i, line in enumerate(data.split(b"\n")):
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        content = any(
            (c.get("text") or any((c.get("delta") or {}).get(k) for k in ("content", "reasoning_content", "reasoning"))
             or (c.get("delta") or {}).get("tool_calls"))
            for c in event.get("choices") or [])
        if content:
            chunks += 1
        if first is None and (content or any(c.get("finish_reason") for c in event.get("choices") or [])):
            first = i
        if isinstance(event.get("usage"), dict) and event["usage"].get("completion_tokens") is not None:
            tokens = event["usage"]["completion_tokens"]
        if isinstance(event.get("metrics"), dict):
            spec = event["metrics"]["speculative_decoding"]["num_accepted_draft_tokens"]
    return chunks, first, tokens, spec


def observe_lines(data: bytes) -> tuple:
    """Feed line by line, each line in two pieces (so lines straddle feeds); "now" is the line's index."""
    outcome = Outcome(status=200)
    observer = SseObserver()
    lines = data.split(b"\n")
    for i, line in enumerate(lines[:-1]):
        cut = len(line) // 3
        observer.feed(line[:cut], float(i), outcome)
        observer.feed(line[cut:] + b"\n", float(i), outcome)
    observer.feed(lines[-1], float(len(lines)), outcome)
    observer.finish(float(len(lines)), outcome)
    accepted = outcome.spec.accepted if outcome.spec is not None and outcome.spec.source == "vllm" else None
    return outcome.content_chunks, outcome.first_token_at, outcome.completion_tokens, accepted


def observe_events(data: bytes, per_feed: int) -> tuple:
    """Feed *per_feed* whole events at a time (a proxy read often holds several); "now" is the index of the
    first line of the feed."""
    return observe_reads(data, per_feed)[0][:4]


@pytest.mark.parametrize("name", ["completion-stream.sse", "chat-stream.sse", "completion-stream-no-spec-metrics.sse"])
@pytest.mark.parametrize("per_feed", [1, 3, 1000])
def test_whole_events_per_read_agree_with_a_full_parse(name, per_feed):
    data = (FIXTURES / name).read_bytes()
    chunks, first, tokens, accepted = observe_events(data, per_feed)
    want_chunks, want_first, want_tokens, want_accepted = reference_outcome(data)
    assert (chunks, tokens, accepted) == (want_chunks, want_tokens, want_accepted)
    if per_feed == 1:
        assert int(first) == want_first


def spaced(data: bytes) -> bytes:
    """The same events as JSON with spaces after ':' and ',' (not vLLM's compact form)."""
    out = []
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            line = b"data: " + json.dumps(json.loads(line[6:]), separators=(", ", ": ")).encode()
        out.append(line)
    return b"\n".join(out)


@pytest.mark.parametrize("name", ["completion-stream.sse", "chat-stream.sse", "completion-stream-no-spec-metrics.sse"])
@pytest.mark.parametrize("form", ["compact", "spaced"])
def test_observer_agrees_with_a_full_parse_of_every_event(name, form):
    data = (FIXTURES / name).read_bytes()
    if form == "spaced":
        data = spaced(data)
    chunks, first, tokens, accepted = observe_lines(data)
    want_chunks, want_first, want_tokens, want_accepted = reference_outcome(data)
    assert (chunks, tokens, accepted) == (want_chunks, want_tokens, want_accepted)
    assert first is not None and int(first) == want_first


chunk_text = st.one_of(st.just(""), st.text(max_size=8))


@given(st.lists(st.tuples(st.sampled_from(["text", "content", "reasoning_content", "tool_calls", "role"]),
                          chunk_text, st.sampled_from([None, "stop", "length"]), st.booleans()), max_size=12),
       st.integers(0, 50))
def test_fast_path_agrees_with_a_full_parse_on_random_streams(events, tokens):
    lines = []
    for key, text, finish, with_usage in events:
        if key == "text":
            choice = {"index": 0, "text": text, "finish_reason": finish}
        elif key == "tool_calls":
            choice = {"index": 0, "delta": {"tool_calls": [{"id": text}] if text else []}, "finish_reason": finish}
        else:
            choice = {"index": 0, "delta": {key: text}, "finish_reason": finish}
        event = {"id": "x", "choices": [choice]}
        if with_usage:
            event["usage"] = {"completion_tokens": tokens}
        lines.append(b"data: " + json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode())
    lines.append(b'data: {"choices":[],"usage":{"completion_tokens":%d}}' % tokens)
    data = b"\n\n".join(lines) + b"\n\ndata: [DONE]\n\n"
    want = reference_outcome(data)
    got = observe_lines(data)
    assert got[0] == want[0] and got[2] == want[2]
    assert (got[1] is None and want[1] is None) or int(got[1]) == want[1]
    for per_feed in (1, 4):
        got = observe_events(data, per_feed)
        assert got[0] == want[0] and got[2] == want[2]


@pytest.mark.parametrize("event", [
    b'data: {"error":{"message":"engine died","type":"InternalServerError","code":500}}',
    b'data: {"object":"error","message":"boom","type":"BadRequestError","param":null,"code":400}',
    b'data: {"type":"error","code":"server_error","message":"boom"}',
])
def test_mid_stream_error_event_is_not_a_success(event):
    data = (FIXTURES / "completion-stream.sse").read_bytes()
    head = b"\n\n".join(data.split(b"\n\n")[:3]) + b"\n\n"
    outcome = feed_all(SseObserver(), head + event + b"\n\ndata: [DONE]\n\n")
    assert outcome.stream_error and outcome.unattributed == "stream_error" and outcome.spec is None


def test_observers_charge_and_return_the_shared_budget():
    from sidecar.tap.observe import Budget

    budget = Budget(1000)
    first, second = BodyObserver(800, budget), BodyObserver(800, budget)
    outcome_a, outcome_b = Outcome(status=200), Outcome(status=200)
    first.feed(b"{" + b" " * 598 + b"}", 1.0, outcome_a)
    assert budget.held == 600
    second.feed(b" " * 500, 1.0, outcome_b)  # 600 + 500 > 1000: passes through unobserved
    assert budget.held == 600
    second.finish(2.0, outcome_b)
    assert outcome_b.unattributed == "response_too_large"
    first.finish(2.0, outcome_a)
    assert budget.held == 0
    sse = SseObserver(limit=100, budget=budget)
    sse.feed(b'data: {"choices":[{"text":"' + b"x" * 200, 1.0, outcome_a)  # an incomplete line over the limit
    assert budget.held == 0
    sse.feed(b"data: [DO", 1.0, Outcome())
    sse.close()
    assert budget.held == 0


# --- the stream's template: events shaped like one already parsed, matched without a scan per marker -------

def error_of(event: dict) -> bool:
    return bool(event.get("error") not in (None, {}, "") and "error" in event
                or event.get("object") == "error" or event.get("type") in ("error", "response.failed"))


def reference_with_errors(data: bytes) -> tuple:
    return reference_outcome(data) + (any(
        error_of(json.loads(line[6:])) for line in data.split(b"\n") if line.startswith(b"data: {")),)


def observe_reads(data: bytes, per_feed: int, scan=None) -> tuple:
    """As observe_events, and also whether a stream error was seen; with the events the template took.
    *scan*: the template's matcher (the observer's default, the C scan, when None)."""
    outcome = Outcome(status=200)
    observer = SseObserver() if scan is None else SseObserver(scan=scan)
    events = [e + b"\n\n" for e in data.split(b"\n\n") if e]
    line = 0
    for i in range(0, len(events), per_feed):
        block = b"".join(events[i : i + per_feed])
        observer.feed(block, float(line), outcome)
        line += block.count(b"\n")
    hits = observer.templated
    observer.finish(float(line), outcome)
    accepted = outcome.spec.accepted if outcome.spec is not None and outcome.spec.source == "vllm" else None
    return (outcome.content_chunks, outcome.first_token_at, outcome.completion_tokens, accepted,
            outcome.stream_error), hits


# Texts a model writes, with what JSON must escape: quotes, backslashes (runs of them before a quote), digits,
# newlines, and text that looks like the structure around it.
model_text = st.one_of(
    st.just(""), st.text(max_size=6),
    st.sampled_from(['say "hi"', "C:\\", "\\\\", 'a\\"', "42", '"},"error":{"x":1},"', "\n", '"content":"x']))
# Variations of one vLLM chat chunk: most keep its shape; the others change it in ways a byte-pattern
# check could confuse with the shape (an error key beside the content, a digit in a key, an empty text, a
# finish reason, a key spelt with an escape). One choice per event, as vLLM streams even with n > 1.
variation = st.sampled_from(["same", "same", "same", "same", "error", "err0r", "empty", "finish",
                             "reasoning", "escaped_error", "escaped_other", "tool_call", "no_usage", "metrics"])


def chunk(text: str, created: int, tokens: int, how: str) -> bytes:
    delta = {"reasoning_content": text} if how == "reasoning" else {"content": "" if how == "empty" else text}
    if how == "tool_call":
        delta["tool_calls"] = [{"index": 0, "function": {"arguments": "{}"}}]
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": "length" if how == "finish" else None,
              "token_ids": None}
    event = {"id": f"chatcmpl-{created:x}", "object": "chat.completion.chunk", "created": created, "model": "m",
             "choices": [choice]}
    if how != "no_usage":
        event["usage"] = {"prompt_tokens": 3, "total_tokens": 3 + tokens, "completion_tokens": tokens,
                          "completion_tokens_details": None}
    if how == "error":
        event["error"] = {"message": "boom", "code": 500}
    if how == "err0r":
        event["err0r"] = {"message": "not an error"}
    if how == "metrics":
        event["metrics"] = {"speculative_decoding": {"num_accepted_draft_tokens": tokens, "num_draft_tokens": tokens,
                                                     "num_spec_steps": 1}}
    line = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    if how == "escaped_error":  # a key that is "error" once the escape is read
        line = line.replace('"model"', '"\\u0065rror"')
    if how == "escaped_other":  # the same bytes but for one digit, and harmless: "frror"
        line = line.replace('"model"', '"\\u0066rror"')
    return b"data: " + line.encode()


@pytest.mark.parametrize("scan", ["c", "python twin"])
@given(st.lists(st.tuples(model_text, st.integers(0, 10**6), variation), max_size=40),
       st.integers(1, 10**5), st.sampled_from([1, 2, 5]))
def test_template_agrees_with_a_full_parse_on_random_streams(scan, events, created, per_feed):
    from sidecar.tap import observe

    lines, tokens = [], 0
    for text, step, how in events:
        tokens += step % 1000
        lines.append(chunk(text, created + step % 3, tokens, how))
    lines.append(b'data: {"choices":[],"usage":{"completion_tokens":%d}}' % tokens)
    data = b"\n\n".join(lines) + b"\n\ndata: [DONE]\n\n"
    want = reference_with_errors(data)
    got, _ = observe_reads(data, per_feed, observe.templated_py if scan == "python twin" else observe.templated_c)
    assert got[4] == want[4]
    if want[4]:  # an error event makes the request a stream error, whatever else it counted
        return
    assert got[0] == want[0] and got[2:4] == want[2:4]
    assert (got[1] is None and want[1] is None) or (per_feed > 1 or int(got[1]) == want[1])


def test_template_takes_the_plain_chunks_of_a_real_stream():
    """On vLLM's own chat stream, the content chunks are matched by the template, except the first, the
    ones where a usage count gains a digit (total_tokens 9 -> 14, completion_tokens 6 -> 11) and the one that
    carries the finish reason: these are parsed, and the stream's template learnt again from them."""
    data = (FIXTURES / "chat-stream.sse").read_bytes()
    got, hits = observe_reads(data, 1)
    want = reference_with_errors(data)
    assert got[0] == want[0] and got[2:] == want[2:]
    content = want[0]
    assert content == 22 and hits == content - 4


def test_texts_with_quotes_and_backslashes_keep_the_template():
    texts = ['say "hi"', "C:\\", '\\"', "x\\\\", '"', "plain"] * 4
    data = b"\n\n".join(chunk(text, 7, 5, "same") for text in texts) + b"\n\n"
    got, hits = observe_reads(data, 1)
    assert got[0] == len(texts) and hits == len(texts) - 1  # all but the first, which taught the template


@pytest.mark.parametrize(("how", "parse"), [
    ("same", False), ("reasoning", False), ("tool_call", False), ("err0r", False), ("empty", False),
    ("error", True), ("escaped_error", True), ("escaped_other", True)])
def test_one_definition_of_an_event_that_needs_a_parse(how, parse):
    """needs_parse decides for every path: the line path parses exactly those events, the whole-read pattern
    count declines a read with one anywhere among plain events, and no template is learnt from one."""
    from sidecar.tap.observe import _Template, needs_parse

    line = chunk('say "hi"', 7, 5, how)
    assert needs_parse(line) is parse
    plain = chunk("x", 7, 5, "same") + b"\n\n"
    read = plain + line + b"\n\n" + plain
    assert needs_parse(read) is parse
    assert needs_parse(read, 0, len(plain)) is False and needs_parse(read, len(read) - len(plain)) is False
    if parse:
        assert _Template.learn(line) is None
    spaced = line.replace(b'"delta":{', b'"delta": {')  # the same event, not in compact form
    assert needs_parse(spaced) and _Template.learn(spaced) is None
    for event, want in ((b'data: {"type":"response.output_text.delta","delta":"x"}', False),
                        (b'data: {"type":"response.completed","response":{"usage":{}}}', True),
                        (b'data: {"type":"response.output_text.delta","delta":"x","type":"response.failed"}', True)):
        assert needs_parse(event) is want, event


def test_an_escape_never_makes_a_template():
    line = chunk("x", 7, 1, "escaped_other")
    from sidecar.tap.observe import _Template
    assert _Template.learn(line) is None
    assert _Template.learn(chunk("x", 7, 1, "same")) is not None


# --- the C scan and its Python twin ------------------------------------------------------------------------

def test_the_c_scan_is_built():
    """The package builds sidecar/tap/_scan.c wherever there is a C compiler (here, CI, the image's
    wheelhouse); without it the observer falls back to the Python twin, correct but slower."""
    from sidecar.tap import observe
    from sidecar.tap._scan import templated

    assert observe.templated_c is templated and observe.DEFAULT_SCAN is templated
    assert SseObserver().scan is templated


def _template_of(line: bytes):
    from sidecar.tap.observe import _Template
    template = _Template.learn(line)
    assert template is not None
    return template


@given(st.lists(st.tuples(model_text, st.integers(0, 10**6), st.sampled_from(["same", "same", "empty", "finish",
                                                                               "no_usage", "error", "err0r"])),
                min_size=1, max_size=12),
       st.integers(0, 400), st.binary(max_size=40), st.integers(0, 4), st.lists(st.integers(0, 10**6), max_size=4))
def test_c_scan_and_python_twin_agree(events, cut, noise, where, digits):
    """Same (at, last, count) on reads built from template-shaped events, with other events among them, cut
    anywhere, random bytes spliced in, or digits written over any byte."""
    from sidecar.tap._scan import templated
    from sidecar.tap.observe import templated_py

    template = _template_of(chunk("x", 7, 5, "same"))
    lines = [chunk(text, 7, step % 7, how) + b"\n\n" for text, step, how in events]  # the template's digit counts
    data = b"".join(lines)
    if where == 1:
        data = data[: len(data) - cut % (len(data) + 1)]
    elif where == 2:
        at = cut % (len(data) + 1)
        data = data[:at] + noise + data[at:]
    elif where == 3:
        for value in digits:
            at = value % len(data)
            data = data[:at] + b"%d" % (value % 10) + data[at + 1 :]
    for end in (len(data), max(0, len(data) - cut), len(data) + 5):
        assert templated(data, end, template.head, template.tail) == templated_py(
            data, end, template.head, template.tail)


def test_c_scan_refuses_wrong_types():
    from sidecar.tap._scan import templated

    with pytest.raises(TypeError):
        templated("text", 4, b"a", b"b")
    with pytest.raises(TypeError):
        templated(b"text", 4, b"a")
    assert templated(b"", 0, b"data", b"x") == (0, 0, 0)


def test_c_scan_and_python_twin_agree_at_every_end_and_byte():
    from sidecar.tap._scan import templated
    from sidecar.tap.observe import templated_py

    template = _template_of(chunk("x", 7, 5, "same"))
    data = chunk('say "hi"\\', 7, 6, "same") + b"\n\n" + chunk("y", 8, 3, "same") + b"\n\n"
    for end in range(len(data) + 1):
        got = templated(data, end, template.head, template.tail)
        assert got == templated_py(data, end, template.head, template.tail), end
    assert templated(data, len(data), template.head, template.tail)[2] == 2
    for at in range(len(data)):  # a digit over each byte: only where the template has a digit is it the same
        for digit in b"05":
            changed = data[:at] + bytes([digit]) + data[at + 1 :]
            got = templated(changed, len(changed), template.head, template.tail)
            assert got == templated_py(changed, len(changed), template.head, template.tail), (at, digit)
