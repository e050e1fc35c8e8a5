"""A fast, forgiving reader of the Prometheus text format (0.0.4 and the OpenMetrics subset vLLM emits).

It reads only the sample names it is asked for and skips everything else without parsing it, which is
what makes it cheap on a vLLM exposition where most lines are histogram buckets the sidecar never uses.
Wanted lines are parsed fully: label values with ``\\"``, ``\\\\`` and ``\\n`` escapes, ``NaN``/``±Inf``
values, optional timestamps, a trailing comma in the label set. A wanted line that does not parse is
counted in ``Exposition.invalid_lines`` and dropped; it never raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Labels
    value: float

    def label(self, key: str, default: str = "") -> str:
        for name, value in self.labels:
            if name == key:
                return value
        return default


@dataclass(slots=True)
class Exposition:
    samples: list[Sample] = field(default_factory=list)
    invalid_lines: int = 0


_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _unescape(raw: str) -> str:
    out: list[str] = []
    i = 0
    n = len(raw)
    while i < n:
        ch = raw[i]
        if ch == "\\" and i + 1 < n:
            nxt = raw[i + 1]
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _parse_labels(text: str, start: int) -> tuple[Labels, int]:
    """Parse ``name="value",...}`` from ``text[start:]`` (just after ``{``).

    Returns the labels and the index just past the closing ``}``. Raises ValueError on malformed input.
    """
    labels: list[tuple[str, str]] = []
    i = start
    n = len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            raise ValueError("unterminated label set")
        if text[i] == "}":
            return tuple(labels), i + 1
        eq = text.find("=", i)
        if eq == -1:
            raise ValueError("label without '='")
        name = text[i:eq].strip()
        if not name or not (name[0].isalpha() or name[0] == "_") or not name.replace("_", "a").isalnum():
            raise ValueError(f"bad label name {name!r}")
        i = eq + 1
        while i < n and text[i] in " \t":
            i += 1
        if i >= n or text[i] != '"':
            raise ValueError("label value not quoted")
        i += 1
        end = text.find('"', i)
        if end == -1:
            raise ValueError("unterminated label value")
        if text.find("\\", i, end) == -1:
            value = text[i:end]
        else:
            # Walk escapes: a quote preceded by an odd number of backslashes is part of the value.
            j = i
            while True:
                if j >= n:
                    raise ValueError("unterminated label value")
                ch = text[j]
                if ch == "\\":
                    j += 2
                    continue
                if ch == '"':
                    break
                j += 1
            end = j
            value = _unescape(text[i:end])
        labels.append((name, value))
        i = end + 1
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == ",":
            i += 1
        elif i < n and text[i] == "}":
            continue
        else:
            raise ValueError("expected ',' or '}' after label value")


def parse_value(token: str) -> float:
    """A sample value: decimal, exponent, ``NaN``, ``+Inf``, ``-Inf`` (Go's spellings). Raises ValueError."""
    if "_" in token:  # Python's float() accepts digit separators; the format does not.
        raise ValueError(f"bad value {token!r}")
    value = float(token)
    lowered = token.lower()
    if ("inf" in lowered or "nan" in lowered) and lowered not in ("nan", "+inf", "-inf", "inf"):
        raise ValueError(f"bad value {token!r}")
    return value


def parse(text: str, wanted: Iterable[str] | frozenset[str]) -> Exposition:
    """Extract the samples whose full sample name (e.g. ``vllm:generation_tokens_total``) is in *wanted*."""
    names = wanted if isinstance(wanted, frozenset) else frozenset(wanted)
    # Cheap first filter: the line must start with one of the wanted names' first 5 characters.
    prefixes = tuple({name[:5] for name in names})
    result = Exposition()
    samples = result.samples
    for line in text.splitlines():
        if not line.startswith(prefixes):
            continue
        brace = line.find("{")
        space = line.find(" ")
        if "\t" in line:
            tab = line.find("\t")
            space = tab if space == -1 else min(space, tab)
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            if name not in names:
                continue
            try:
                labels, rest_at = _parse_labels(line, brace + 1)
                rest = line[rest_at:].split()
                if not rest or len(rest) > 2:
                    raise ValueError("expected value [timestamp]")
                value = parse_value(rest[0])
                if len(rest) == 2:
                    float(rest[1])  # a timestamp must at least be a number
            except ValueError:
                result.invalid_lines += 1
                continue
        else:
            if space == -1:
                if line.rstrip() in names:
                    result.invalid_lines += 1
                continue
            name = line[:space]
            if name not in names:
                continue
            rest = line[space:].split()
            try:
                if not rest or len(rest) > 2:
                    raise ValueError("expected value [timestamp]")
                value = parse_value(rest[0])
                if len(rest) == 2:
                    float(rest[1])
            except ValueError:
                result.invalid_lines += 1
                continue
            labels = ()
        samples.append(Sample(name, labels, value))
    return result
