"""Observers on recorded real vLLM responses: what they read, and that garbage never raises."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import FIXTURES
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
