"""Temperature buckets: the one place that turns a request's ``temperature`` into a bounded label.

Edges ``(0.3, 0.5, 0.7, 1.0)`` give ``0 | (0,0.3] | (0.3,0.5] | (0.5,0.7] | (0.7,1.0] | >1.0`` labelled
``0``, ``0-0.3``, ``0.3-0.5``, ``0.5-0.7``, ``0.7-1.0``, ``gt1.0``. Greedy (exactly 0) is always its own
bucket because speculative decoding behaves differently there. A missing temperature is ``default`` unless
the operator says what vLLM applies then; strings, booleans, negatives, NaN and infinities are ``invalid``.
Used by the sidecar's request tap and by ``measure`` alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_EDGES: tuple[float, ...] = (0.3, 0.5, 0.7, 1.0)
GREEDY = "0"
OMITTED = "default"
INVALID = "invalid"
# The request body was not read (larger than --max-observed-body, or not a JSON object): its temperature is
# unknown, which is not the same as ``invalid`` (a temperature that was read and is not a usable number).
UNREAD = "unread"


def _fmt(x: float) -> str:
    text = f"{x:g}"
    return text if "." in text or "e" in text else text + ".0"


@dataclass(frozen=True, slots=True)
class TemperatureBuckets:
    edges: tuple[float, ...] = DEFAULT_EDGES
    omitted_as: float | None = None

    def __post_init__(self) -> None:
        if not self.edges:
            raise ValueError("at least one temperature edge is needed")
        if any(not math.isfinite(e) or e <= 0 for e in self.edges):
            raise ValueError("temperature edges must be finite and above 0")
        if list(self.edges) != sorted(set(self.edges)):
            raise ValueError("temperature edges must be strictly increasing")
        if self.omitted_as is not None and (not math.isfinite(self.omitted_as) or self.omitted_as < 0):
            raise ValueError("the default temperature must be a finite number >= 0")

    @property
    def labels(self) -> tuple[str, ...]:
        """Every label this bucketing can produce, in order."""
        inner = []
        lower = 0.0
        for edge in self.edges:
            inner.append(f"{_fmt(lower) if lower else '0'}-{_fmt(edge)}")
            lower = edge
        tail = (OMITTED,) if self.omitted_as is None else ()
        return (GREEDY, *inner, f"gt{_fmt(self.edges[-1])}", *tail, INVALID)

    def bucket(self, temperature: object, present: bool = True) -> str:
        """The label for a request's ``temperature`` field (``present=False`` when the key is absent)."""
        if not present or temperature is None:
            if self.omitted_as is None:
                return OMITTED
            temperature = self.omitted_as
        if isinstance(temperature, bool) or not isinstance(temperature, int | float):
            return INVALID
        try:
            value = float(temperature)
        except OverflowError:  # an integer beyond any float (JSON allows 1e400 written out): far above the edges
            value = math.inf if temperature > 0 else -math.inf
        if math.isinf(value) and isinstance(temperature, int) and value > 0:
            return f"gt{_fmt(self.edges[-1])}"
        if math.isnan(value) or math.isinf(value) or value < 0:
            return INVALID
        if value == 0:
            return GREEDY
        lower = 0.0
        for edge in self.edges:
            if value <= edge:
                return f"{_fmt(lower) if lower else '0'}-{_fmt(edge)}"
            lower = edge
        return f"gt{_fmt(self.edges[-1])}"


def parse_edges(value: str | Sequence[float]) -> tuple[float, ...]:
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            return tuple(float(p) for p in parts)
        except ValueError:
            raise ValueError(f"{value!r} is not a comma-separated list of numbers") from None
    return tuple(float(v) for v in value)


def label_order(label: str) -> tuple[int, float, str]:
    """Sort key for bucket labels of any edges: greedy, the ranges by upper edge, above the last edge,
    ``default``, ``invalid``, ``unread``, then anything else (e.g. a sidecar with other edges)."""
    fixed = {GREEDY: 0, OMITTED: 3, INVALID: 4, UNREAD: 5}
    if label in fixed:
        return (fixed[label], 0.0, label)
    try:
        if label.startswith("gt"):
            return (2, float(label[2:]), label)
        lower, upper = label.split("-", 1)
        return (1, float(upper), label)
    except ValueError:
        return (6, 0.0, label)
