"""Window history helpers shared by every source that keeps its own history on its own clock.

The upstream poll loop keeps scrape points (``upstream/derive.py``), the request tap keeps checkpoints of its
per-bucket totals (``tap/windows.py``), the status page keeps nothing: each source differences its own
history with these two functions, so a window means the same thing everywhere. Any item with a ``.t``
(monotonic seconds) will do.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol, TypeVar


class Timed(Protocol):
    t: float


T = TypeVar("T", bound=Timed)


def base_point(points: Sequence[T], window: float, tolerance: float) -> T | None:
    """The newest point at least *window* seconds (less *tolerance*) before the last one.

    While the history is shorter than the window the oldest point is used (a partial window; its real
    span is exported). ``None`` when there are fewer than two points.
    """
    if len(points) < 2:
        return None
    target = points[-1].t - window + tolerance
    chosen = points[0]
    for i in range(len(points) - 1):
        point = points[i]
        if point.t <= target:
            chosen = point
        else:
            break
    return chosen


def trim_history(points: deque[T], now: float, keep: float) -> None:
    """Drop points no window of length *keep* can start from, keeping the newest one at least that old."""
    while len(points) > 2 and points[1].t <= now - keep:
        points.popleft()
