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
  source feeds the accepted-token counter and mean acceptance length, not the acceptance rate. Where vLLM
  does not draft at all (a baseline replica, ``--speculative``), ``tap/metrics.py`` drops the estimate;
* otherwise the request is unattributed, by reason.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.decision import clamped_ratio

OBSERVED_PATHS = {"/v1/completions": "completions", "/v1/chat/completions": "chat", "/v1/responses": "responses"}


class Budget:
    """Bytes held by observers across all in-flight requests: one request's body or buffered response may
    take at most ``max_observed_body``, all of them together at most ``limit``. Beyond it a request passes
    through unobserved (``body_too_large`` / ``response_too_large``), so memory stays bounded whatever the
    concurrency."""

    __slots__ = ("limit", "held")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held = max(0, self.held - size)


UNLIMITED = Budget(1 << 62)


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


def decoded_body(body: bytes, encoding: str, limit: int) -> tuple[bytes | None, str | None]:
    """A request body as the upstream will read it, for observation only (the proxy forwards the original
    bytes): ``(body, None)``, or ``(None, reason)`` when the encoding is unknown, the data is corrupt or it
    inflates beyond *limit*."""
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body, None
    if encoding not in ("gzip", "x-gzip", "deflate"):
        return None, "unparsable_request"
    # wbits 47: zlib or gzip header, detected; raw deflate (some clients send it as "deflate") is tried next.
    for wbits in (47, -15):
        inflater = zlib.decompressobj(wbits)
        try:
            out = inflater.decompress(body, limit + 1)
        except zlib.error:
            continue
        if len(out) > limit or inflater.unconsumed_tail:
            return None, "body_too_large"
        if not inflater.eof:
            return None, "unparsable_request"
        return out, None
    return None, "unparsable_request"


def read_request(endpoint: str, body: bytes | None, reason: str | None = None) -> RequestInfo:
    """The fields that matter from a request body; never raises. *body* None means it was not kept
    (*reason* says why, ``body_too_large`` by default)."""
    info = RequestInfo(endpoint=endpoint)
    if body is None:
        info.parse_error = reason or "body_too_large"
        return info
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
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
    if not all(_count(v) for v in (accepted, drafted, steps)):
        return None
    return SpecStats(accepted=accepted, drafted=drafted, steps=steps, source="vllm")  # type: ignore[arg-type]


# JSON integers are unbounded; a count beyond what a float holds exactly is not a real token count.
_MAX_COUNT = 2**53


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_COUNT


def _completion_tokens(obj: dict) -> int | None:
    usage = obj.get("usage")
    if isinstance(usage, dict):
        tokens = usage.get("completion_tokens", usage.get("output_tokens"))
        if _count(tokens):
            return tokens  # type: ignore[return-value]
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


def _is_error_event(event: dict) -> bool:
    """vLLM's mid-stream error: ``{"error": {...}}`` (current), ``{"object": "error", ...}`` (older), or a
    Responses API ``error`` / ``response.failed`` event."""
    return (
        "error" in event and event["error"] not in (None, {}, "")
        or event.get("object") == "error"
        or event.get("type") in ("error", "response.failed")
    )


@dataclass(slots=True)
class Outcome:
    """What one request came to; filled in by the proxy and the observers, read once when it ends."""

    status: int = 0
    completion_tokens: int | None = None
    spec: SpecStats | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    content_chunks: int = 0
    unattributed: str | None = None
    finished: bool = False
    # The upstream answered 2xx and then sent an error event in the stream (``unattributed`` says
    # ``stream_error``): not a success, whatever the status.
    stream_error: bool = False


class BodyObserver:
    """Non-streaming JSON body: keep up to ``limit`` bytes (the chunks the proxy forwarded, not copies),
    charged to the shared *budget*; read usage and metrics at the end."""

    def __init__(self, limit: int, budget: Budget = UNLIMITED) -> None:
        self._limit = limit
        self._budget = budget
        self._parts: list[bytes] = []
        self._size = 0
        self._overflow = False

    def feed(self, chunk: bytes, now: float, outcome: Outcome) -> None:
        if self._overflow:
            return
        size = len(chunk)
        if self._size + size > self._limit or not self._budget.take(size):
            self._overflow = True
            self.close()
            return
        self._size += size
        self._parts.append(chunk)

    def close(self) -> None:
        """Give the held bytes back; safe to call more than once."""
        self._budget.give(self._size)
        self._size = 0
        self._parts.clear()

    def finish(self, now: float, outcome: Outcome) -> None:
        outcome.finished = True
        if self._overflow:
            outcome.unattributed = "response_too_large"
            return
        body = self._parts[0] if len(self._parts) == 1 else b"".join(self._parts)
        self.close()
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
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


# Byte patterns of vLLM's compact JSON (no spaces after ':' or ','). Inside a JSON string every '"' is
# escaped, so a key pattern that starts with '"' can only match the structure, never text a model wrote.
_CONTENT_KEYS = (b'"text":"', b'"content":"', b'"reasoning_content":"', b'"reasoning":"')
_QUOTE = 0x22
# What makes an event need a full JSON parse: an error (vLLM's ``"error"`` key, ``"object":"error"``,
# ``"type":"error"``), JSON not in compact form (``": ``), a \u escape (the only escape that can spell a
# letter, so a key such as "\u0065rror"), and a Responses API event other than a text delta.
_PARSE_MARKERS = (b'"error"', b'": ', b"\\u")
_RESPONSES_EVENT = b'"type":"response.'
_TEXT_DELTA = b'"type":"response.output_text.delta"'


def needs_parse(data: bytes, start: int = 0, end: int | None = None) -> bool:
    """Whether an event (or some event in ``data[start:end]``) needs a full JSON parse: the one definition
    every path of ``SseObserver`` follows. The byte-pattern paths decline such events, the line path parses
    them, and a template is never learnt from one (``_Template.learn``)."""
    for marker in _PARSE_MARKERS:
        if data.find(marker, start, end) >= 0:
            return True
    at = data.find(_RESPONSES_EVENT, start, end)
    while at >= 0:
        if not data.startswith(_TEXT_DELTA, at):
            return True
        at = data.find(_RESPONSES_EVENT, at + len(_TEXT_DELTA), end)
    return False


# What the whole-read pattern count cannot count, though no parse is needed: Responses API text deltas and
# tool calls have their own content rules (the line path's), and vLLM may send `reasoning` beside
# `reasoning_content` in one delta (two keys, one chunk).
_NOT_COUNTABLE = (_RESPONSES_EVENT, b'"tool_calls":[', b'"reasoning')
_BLOCK_CONTENT_KEYS = (b'"text":"', b'"content":"')
_CLOSE_BRACKET = 0x5D


def _content_fast(line: bytes) -> bool:
    """Some choice carries non-empty text, reasoning or tool calls (compact JSON only)."""
    for key in _CONTENT_KEYS:
        at = line.find(key)
        while at >= 0:
            after = at + len(key)
            if after < len(line) and line[after] != _QUOTE:
                return True
            at = line.find(key, after)
    at = line.find(b'"tool_calls":[')
    return at >= 0 and at + 14 < len(line) and line[at + 14] != _CLOSE_BRACKET


# Digits all read as '0' in a template, so events that differ only in numbers (usage counts, a timestamp) or
# in digits inside names (an id) share one. No key the observer acts on contains a digit.
_ZERO_DIGITS = bytes.maketrans(b"123456789", b"000000000")
_BACKSLASH = 0x5C


def _string_end(data: bytes, at: int, end: int) -> int:
    """Index of the quote that closes the JSON string whose text starts at *at*, or -1 before *end*."""
    quote = data.find(b'"', at, end)
    while quote > 0 and data[quote - 1] == _BACKSLASH:
        run = quote - 1
        while data[run - 1] == _BACKSLASH:
            run -= 1
        if (quote - run) % 2 == 0:  # an even run of backslashes escapes itself, not the quote
            return quote
        quote = data.find(b'"', quote + 1, end)
    return quote


class _Template:
    """The shape of one content event of this stream, learnt from an event that was parsed in full: the bytes
    before and after its text, with digits read as '0'. An event with the same shape and non-empty text at the
    same place has the same meaning for the observer: the same keys at the same places, strings of the same
    length, only its numbers and that text differ. The bytes around the text hold no backslash (checked when
    learning), so no escape can make an equal-looking key a different one, and it is learnt only from an event
    that does not need a parse (``needs_parse``): an event that matches it does not need one either, since its
    only other bytes are digits and the text of one string (where no marker can stand: a string's text has
    no raw quote, and a \\u escape there spells text, not a key)."""

    __slots__ = ("head", "tail", "head_len", "tail_len", "usage", "spec")

    def __init__(self, head: bytes, tail: bytes, usage: bool, spec: bool) -> None:
        self.head, self.tail = head, tail
        self.head_len, self.tail_len = len(head), len(tail)
        self.usage, self.spec = usage, spec

    @classmethod
    def learn(cls, line: bytes) -> _Template | None:
        """A template from one event line (``data: {...}``) that needs no parse outside the text of its content
        string and that a full parse shows to be a content chunk; None for anything else."""
        try:
            event = json.loads(line[5:])
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None
        if not isinstance(event, dict) or _is_error_event(event):
            return None
        choices = event.get("choices")
        if not isinstance(choices, list) or not any(_has_content(c) for c in choices):
            return None
        if "type" in event or "response" in event:  # the Responses API keeps to the line path
            return None
        keys = [at for at in (line.find(b'"content":"'), line.find(b'"text":"')) if at >= 0]
        if not keys:
            return None
        text = min(keys)
        text += 11 if line.startswith(b'"content":"', text) else 8
        if text >= len(line) or line[text] == _QUOTE:
            return None
        close = _string_end(line, text + 1, len(line))
        if close < 0 or b"\\" in line[:text] or b"\\" in line[close:]:
            return None
        if needs_parse(line, 0, text) or needs_parse(line, close):
            return None
        return cls(line[:text].translate(_ZERO_DIGITS), line[close:].translate(_ZERO_DIGITS) + b"\n\n",
                   isinstance(event.get("usage"), dict), isinstance(event.get("metrics"), dict))


def templated_py(data: bytes, end: int, head: bytes, tail: bytes) -> tuple[int, int, int]:
    """The events at the start of ``data[:end]`` with the template's shape (*head*, a non-empty string's
    text, *tail* after its closing quote; digits read as '0'): the end of the last one, where it started,
    and how many. ``sidecar/tap/_scan.c`` gives the same answer in C; this is the fallback without it."""
    head_len, tail_len = len(head), len(tail)
    # Translating digits leaves quotes and backslashes where they are, so the whole read is translated once
    # and both the shape and the end of each text are read from that copy.
    shape = (data if end == len(data) else data[:end]).translate(_ZERO_DIGITS)
    end = len(shape)
    startswith, find = shape.startswith, shape.find
    at = last = count = 0
    while end:
        text = at + head_len
        if text >= end or shape[text] == _QUOTE or not startswith(head, at):
            break
        close = find(b'"', text + 1, end)
        if shape[close - 1] == _BACKSLASH:
            close = _string_end(shape, text + 1, end)
        if close < 0 or not startswith(tail, close):
            break
        last, at = at, close + tail_len
        count += 1
        if at >= end:
            break
    return at, last, count


try:
    from sidecar.tap._scan import templated as templated_c
except ImportError:  # not built (no C compiler where it was installed): the Python twin, the same answer, slower
    templated_c = None
# The scan an observer uses unless it is given one: the C scan where it is built.
DEFAULT_SCAN = templated_c if templated_c is not None else templated_py


class SseObserver:
    """Server-sent events: count content chunks, keep the last usage and any speculative metrics.

    Only events that can change the outcome beyond a content count are parsed as JSON. Three paths, cheapest
    first:

    * the stream's template (``_Template``): after one content chunk was parsed, each event of the same
      shape is one content chunk, checked with two comparisons and a search for the end of its text, in C
      (``_scan.c``, with a Python twin where it is not built);
    * a whole read at once (``_block``), by counting byte patterns of vLLM's compact chunks
      (``"text":"x``, ``"content":"x``...) when every event in it has the plain shape;
    * line by line, where the events that need a parse (``needs_parse``: errors, Responses API events other
      than text deltas, \\u escapes, anything not in compact form) are parsed as they arrive.

    Which events need a parse is decided by one function, ``needs_parse``, for every path. *scan* is the
    template's matcher: the C scan by default (``DEFAULT_SCAN``), or ``templated_py``, its Python twin.

    Of the chunks that carry ``usage`` or ``metrics`` only the last of each is parsed, at the end of the
    stream."""

    MAX_LINE = 4 * 1024 * 1024

    def __init__(self, limit: int = MAX_LINE, budget: Budget = UNLIMITED,
                 scan: Callable[[bytes, int, bytes, bytes], tuple[int, int, int]] = DEFAULT_SCAN) -> None:
        self.scan = scan  # the template's matcher
        self._buffer = b""
        self._limit = limit
        self._budget = budget
        self._held = 0
        self._saw_usage = False
        self._broken = False
        self._last_usage: bytes | None = None
        self._last_spec: bytes | None = None
        self._template: _Template | None = None
        self.templated = 0  # events the template took (the learning backoff reads it)
        self._templated_before = 0  # ... when the template was learnt
        self._reads = 0  # reads with complete events; learning waits until _learn_at
        self._learn_at = 0
        self._backoff = 1

    def feed(self, chunk: bytes, now: float, outcome: Outcome) -> None:
        tried = False  # the template was already tried at the start of data
        if self._buffer:
            data = self._buffer + chunk
        elif self._template is not None and chunk[-1:] == b"\n" and not self._broken:
            # The common read: whole events, nothing held from the last one; mostly all of it templated.
            done = self._templated(chunk, len(chunk), now, outcome)
            if done == len(chunk):
                return
            data, tried = (chunk[done:] if done else chunk), True
        else:
            data = chunk
        if self._broken:
            return
        end = data.rfind(b"\n") + 1
        if end == 0:
            self._keep(data)
            return
        self._keep(data[end:] if end < len(data) else b"")
        if self._broken:
            return
        self._reads += 1
        if self._template is not None and not tried:
            done = self._templated(data, end, now, outcome)
            if done == end:
                return
            if done:
                data, end = data[done:end], end - done
        if not self._block(data, end, now, outcome):
            for line in data[:end].split(b"\n"):
                if line[:5] == b"data:":
                    self._line(line, now, outcome)
        if self._reads >= self._learn_at:
            self._learn(data, end)

    def _templated(self, data: bytes, end: int, now: float, outcome: Outcome) -> int:
        """Take the events at the start of ``data[:end]`` that have the stream's template shape: one content
        chunk each, the last of them kept as usage (or metrics) when the template carries it. Returns where
        the first other event starts (*end* when there is none)."""
        template = self._template
        at, last, count = self.scan(data, end, template.head, template.tail)
        if count:
            outcome.last_token_at = now
            if outcome.first_token_at is None:
                outcome.first_token_at = now
            self.templated += count
            outcome.content_chunks += count
            if template.usage:
                self._last_usage = data[last : at - 2]
                if template.spec:
                    self._last_spec = self._last_usage
            elif template.spec:
                self._last_spec = data[last : at - 2]
        return at

    def _learn(self, data: bytes, end: int) -> None:
        """Take the last event of a read that went the slower way as the stream's template, if it is a plain
        content chunk. A template that never matched doubles the wait before the next try (up to 256 reads),
        so a stream whose events all differ pays for a parse only now and then."""
        if self._template is not None and self.templated == self._templated_before:
            self._backoff = min(self._backoff * 2, 256)
        else:
            self._backoff = 1
        self._learn_at = self._reads + self._backoff
        if end < 2 or data[end - 2] != 0x0A:  # the read does not end with a whole event
            return
        start = data.rfind(b"\n\n", 0, end - 2)
        template = _Template.learn(data[start + 2 if start >= 0 else 0 : end - 2])
        if template is not None:
            self._template = template
            self._templated_before = self.templated

    def _block(self, data: bytes, end: int, now: float, outcome: Outcome) -> bool:
        """All complete events of one read at once, by counting byte patterns over ``data[:end]``, when
        they have vLLM's plain shape: only ``data: `` lines each followed by a blank line, compact JSON, one
        content key per event, nothing that needs a parse. False (and nothing done) otherwise."""
        events = data.count(b"data: ", 0, end)
        if not events or data.count(b"\n", 0, end) != 2 * events or needs_parse(data, 0, end):
            return False
        for marker in _NOT_COUNTABLE:
            if data.find(marker, 0, end) >= 0:
                return False
        content = 0
        for key in _BLOCK_CONTENT_KEYS:
            found = data.count(key, 0, end)
            if found:
                content += found - data.count(key + b'"', 0, end)
        if content:
            outcome.content_chunks += content
            if outcome.first_token_at is None:
                outcome.first_token_at = now
            outcome.last_token_at = now
        elif outcome.first_token_at is None and data.find(b'"finish_reason":"', 0, end) >= 0:
            outcome.first_token_at = outcome.last_token_at = now
        at = data.rfind(b'"usage":{', 0, end)
        if at >= 0:
            self._last_usage = data[data.rfind(b"\n", 0, at) + 1 : data.find(b"\n", at, end)]
        at = data.rfind(b'"speculative_decoding"', 0, end)
        if at >= 0:
            line = data[data.rfind(b"\n", 0, at) + 1 : data.find(b"\n", at, end)]
            self._last_spec = self._last_usage if line == self._last_usage else line
        return True

    def _keep(self, rest: bytes) -> None:
        """Hold an incomplete line; a line longer than the limit, or beyond the shared budget, ends the
        observation of this stream (the bytes still flow)."""
        size = len(rest)
        if size > self._held and (size > self._limit or not self._budget.take(size - self._held)):
            self._broken = True
            rest, size = b"", 0
        if size < self._held:
            self._budget.give(self._held - size)
        self._held = size
        self._buffer = rest

    def close(self) -> None:
        self._budget.give(self._held)
        self._held = 0
        self._buffer = b""
        self._last_usage = self._last_spec = None

    def _line(self, line: bytes, now: float, outcome: Outcome) -> None:
        if line.startswith(b"data: [DONE]"):
            return
        if needs_parse(line):
            self._parse(line, now, outcome)
            return
        if _TEXT_DELTA in line:
            at = line.find(b'"delta":"')
            if at >= 0 and at + 9 < len(line) and line[at + 9] != _QUOTE:
                self._content(now, outcome)
        elif _content_fast(line):
            self._content(now, outcome)
        elif outcome.first_token_at is None and b'"finish_reason":"' in line:
            # The only token was end-of-sequence (no text): it still arrived now, so TTFT is now. Not a
            # content chunk, so the stream-steps count is untouched.
            outcome.first_token_at = outcome.last_token_at = now
        if b'"usage":{' in line:
            self._last_usage = line
        if b'"speculative_decoding"' in line:
            self._last_spec = line

    def _parse(self, line: bytes, now: float, outcome: Outcome) -> None:
        """The general path: a full JSON parse of one event."""
        try:
            event = json.loads(line[5:])
        except (ValueError, UnicodeDecodeError, RecursionError):
            return
        if not isinstance(event, dict):
            return
        if _is_error_event(event):
            outcome.stream_error = True
            return
        if event.get("type") == "response.output_text.delta" and event.get("delta"):
            self._content(now, outcome)
        choices = event.get("choices")
        if isinstance(choices, list) and any(_has_content(c) for c in choices):
            self._content(now, outcome)
        elif outcome.first_token_at is None and isinstance(choices, list) and any(
            isinstance(c, dict) and c.get("finish_reason") for c in choices
        ):
            outcome.first_token_at = outcome.last_token_at = now
        inner = event.get("response")
        for obj in (event, inner):
            if isinstance(obj, dict):
                if isinstance(obj.get("usage"), dict):
                    self._last_usage = line
                if isinstance(obj.get("metrics"), dict):
                    self._last_spec = line

    @staticmethod
    def _meta(line: bytes | None) -> tuple[int | None, SpecStats | None]:
        """Completion tokens and speculative metrics of one event (a wrapped ``response`` wins)."""
        if line is None:
            return None, None
        try:
            event = json.loads(line[5:])
        except (ValueError, UnicodeDecodeError, RecursionError):
            return None, None
        tokens, spec = None, None
        for obj in (event, event.get("response") if isinstance(event, dict) else None):
            if isinstance(obj, dict):
                if (found := _completion_tokens(obj)) is not None:
                    tokens = found
                spec = spec_from_vllm(obj) or spec
        return tokens, spec

    @staticmethod
    def _content(now: float, outcome: Outcome) -> None:
        outcome.content_chunks += 1
        if outcome.first_token_at is None:
            outcome.first_token_at = now
        outcome.last_token_at = now

    def finish(self, now: float, outcome: Outcome) -> None:
        outcome.finished = True
        if self._buffer and not self._broken and self._buffer[:5] == b"data:":
            self._line(self._buffer.rstrip(b"\r"), now, outcome)
        tokens, spec = self._meta(self._last_usage)
        if self._last_spec is not self._last_usage:
            spec = self._meta(self._last_spec)[1]
        self.close()
        if tokens is not None:
            self._saw_usage = True
            outcome.completion_tokens = tokens
        if outcome.stream_error:
            outcome.unattributed = "stream_error"
            return
        if spec is not None:
            outcome.spec = spec
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
