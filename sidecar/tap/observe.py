"""Per-request observation: what the client asked for and what vLLM answered, read beside the byte stream.

Nothing here touches the bytes the proxy forwards and nothing here may raise into the proxy: every entry
point swallows its own errors and records the request as unattributed instead.

Per-request acceptance, in order of preference:

* ``vllm``: ``metrics.speculative_decoding`` from the non-streaming body, or from the final usage chunk of
  a stream (vLLM with ``--per-request-spec-decode-metrics``);
* ``stream_steps``: for a stream that reports ``usage`` but no such metrics, each content chunk is one
  engine step emitting 1 + accepted tokens, so accepted = completion_tokens - content chunks. It
  undercounts by up to k when ``max_tokens`` cut the last step short (vLLM counts those drafts as
  accepted, the stream drops the tokens), and a step whose text detokenises to nothing sends no chunk
  (overcounts by one step's worth). Drafted tokens are unknown there (k is not in the stream), so this
  source feeds the accepted-token counter and mean acceptance length, not the acceptance rate;
* otherwise the request is unattributed, by reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from sidecar.decision import clamped_ratio

OBSERVED_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/responses": "responses"}


@dataclass(slots=True)
class RequestInfo:
    endpoint: str
    model: str | None = None
    temperature: object = None
    temperature_present: bool = False
    stream: bool = False
    n: int = 1
    include_usage: bool = False
    parse_error: str | None = None


def read_request(endpoint: str, body: bytes | None) -> RequestInfo:
    """The fields that matter from a request body; never raises."""
    info = RequestInfo(endpoint=endpoint)
    if body is None:
        info.parse_error = "body_too_large"
        return info
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        info.parse_error = "unparsable_request"
        return info
    if not isinstance(data, dict):
        info.parse_error = "unparsable_request"
        return info
    model = data.get("model")
    info.model = model if isinstance(model, str) else None
    info.temperature_present = "temperature" in data
    info.temperature = data.get("temperature")
    info.stream = data.get("stream") is True
    n = data.get("n", 1)
    info.n = n if isinstance(n, int) and not isinstance(n, bool) else 1
    options = data.get("stream_options")
    info.include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return info


@dataclass(frozen=True, slots=True)
class SpecStats:
    accepted: int
    drafted: int | None
    steps: int
    source: str  # "vllm" | "stream_steps"

    @property
    def acceptance_rate(self) -> float | None:
        if not self.drafted:
            return None
        return clamped_ratio(self.accepted, self.drafted)

    @property
    def mean_acceptance_length(self) -> float | None:
        if self.steps <= 0:
            return None
        return 1.0 + self.accepted / self.steps


def spec_from_vllm(obj: object) -> SpecStats | None:
    """``metrics.speculative_decoding`` -> SpecStats, or None when absent or malformed."""
    if not isinstance(obj, dict):
        return None
    metrics = obj.get("metrics")
    if not isinstance(metrics, dict):
        return None
    spec = metrics.get("speculative_decoding")
    if not isinstance(spec, dict):
        return None
    accepted, drafted, steps = (
        spec.get("num_accepted_draft_tokens"),
        spec.get("num_draft_tokens"),
        spec.get("num_spec_steps"),
    )
    values = (accepted, drafted, steps)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return None
    return SpecStats(accepted=accepted, drafted=drafted, steps=steps, source="vllm")  # type: ignore[arg-type]


def _completion_tokens(obj: dict) -> int | None:
    usage = obj.get("usage")
    if isinstance(usage, dict):
        tokens = usage.get("completion_tokens", usage.get("output_tokens"))
        if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
            return tokens
    return None


def _has_content(choice: object) -> bool:
    if not isinstance(choice, dict):
        return False
    text = choice.get("text")
    if isinstance(text, str) and text:
        return True
    delta = choice.get("delta")
    if isinstance(delta, dict):
        for key in ("content", "reasoning_content", "reasoning"):
            value = delta.get(key)
            if isinstance(value, str) and value:
                return True
        if delta.get("tool_calls"):
            return True
    return False


@dataclass(slots=True)
class Outcome:
    """What one request came to; filled in by the observers, read once when the response ends."""

    status: int = 0
    completion_tokens: int | None = None
    spec: SpecStats | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    content_chunks: int = 0
    unattributed: str | None = None
    finished: bool = False


class BodyObserver:
    """Non-streaming JSON body: keep up to ``limit`` bytes, read usage and metrics at the end."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._parts: list[bytes] = []
        self._size = 0
        self._overflow = False

    def feed(self, chunk: bytes, now: float, outcome: Outcome) -> None:
        if self._overflow:
            return
        self._size += len(chunk)
        if self._size > self._limit:
            self._overflow = True
            self._parts.clear()
            return
        self._parts.append(chunk)

    def finish(self, now: float, outcome: Outcome) -> None:
        outcome.finished = True
        if self._overflow:
            outcome.unattributed = "response_too_large"
            return
        try:
            data = json.loads(b"".join(self._parts))
        except (ValueError, UnicodeDecodeError):
            outcome.unattributed = "unparsable_response"
            return
        if not isinstance(data, dict):
            outcome.unattributed = "unparsable_response"
            return
        outcome.completion_tokens = _completion_tokens(data)
        if outcome.completion_tokens:
            outcome.first_token_at = outcome.last_token_at = now
        outcome.spec = spec_from_vllm(data)
        if outcome.spec is None:
            outcome.unattributed = "no_spec_metrics"


class SseObserver:
    """Server-sent events: count content chunks, keep the last usage and any speculative metrics."""

    MAX_LINE = 4 * 1024 * 1024

    def __init__(self) -> None:
        self._buffer = b""
        self._saw_usage = False
        self._broken = False

    def feed(self, chunk: bytes, now: float, outcome: Outcome) -> None:
        if self._broken:
            return
        data = self._buffer + chunk
        lines = data.split(b"\n")
        self._buffer = lines.pop()
        if len(self._buffer) > self.MAX_LINE:
            self._broken = True
            self._buffer = b""
            return
        for line in lines:
            self._line(line.rstrip(b"\r"), now, outcome)

    def _line(self, line: bytes, now: float, outcome: Outcome) -> None:
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if not payload or payload == b"[DONE]":
            return
        try:
            event = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(event, dict):
            return
        # /v1/responses wraps the final object: {"type": "response.completed", "response": {...}}
        inner = event.get("response") if isinstance(event.get("response"), dict) else None
        if event.get("type") == "response.output_text.delta" and event.get("delta"):
            self._content(now, outcome)
        choices = event.get("choices")
        if isinstance(choices, list) and any(_has_content(c) for c in choices):
            self._content(now, outcome)
        elif outcome.first_token_at is None and isinstance(choices, list) and any(
            isinstance(c, dict) and c.get("finish_reason") for c in choices
        ):
            # The only token was end-of-sequence (no text): it still arrived now, so TTFT is now. Not a
            # content chunk, so the stream-steps count is untouched.
            outcome.first_token_at = outcome.last_token_at = now
        for obj in (event, inner):
            if obj is None:
                continue
            tokens = _completion_tokens(obj)
            if tokens is not None:
                self._saw_usage = True
                outcome.completion_tokens = tokens
            spec = spec_from_vllm(obj)
            if spec is not None:
                outcome.spec = spec

    @staticmethod
    def _content(now: float, outcome: Outcome) -> None:
        outcome.content_chunks += 1
        if outcome.first_token_at is None:
            outcome.first_token_at = now
        outcome.last_token_at = now

    def finish(self, now: float, outcome: Outcome) -> None:
        outcome.finished = True
        if self._buffer and not self._broken:
            self._line(self._buffer.rstrip(b"\r"), now, outcome)
            self._buffer = b""
        if outcome.spec is not None:
            return
        if self._broken:
            outcome.unattributed = "unparsable_response"
        elif not self._saw_usage or outcome.completion_tokens is None:
            outcome.unattributed = "no_usage"
        elif outcome.content_chunks == 0:
            outcome.unattributed = "no_content"
        else:
            accepted = max(0, outcome.completion_tokens - outcome.content_chunks)
            outcome.spec = SpecStats(
                accepted=accepted, drafted=None, steps=outcome.content_chunks, source="stream_steps"
            )
