"""The tap's windows: per (model, temperature bucket) totals over each window, on the tap's own clock.

``RequestMetrics`` keeps cumulative totals per (model, bucket) beside its Prometheus series (``totals()``).
A ``TapMonitor`` takes a checkpoint of them every ``--scrape-interval`` on its own schedule, differences the
checkpoints with the shared window helpers (``sidecar/windows.py``) and publishes one immutable
``TapHealth``. Nothing else drives it: if the poll of vLLM stalls, the tap's windows keep moving (the
verdicts need vLLM's load only to pick the calibrated break-even; see ``export/assessment.py``).

Histogram counts are kept per bucket edge (not cumulative), aligned with the edges the tap's Prometheus
histograms use, so a window's quantiles come out of ``decision.histogram_quantile`` exactly as the recording
rules' ``histogram_quantile`` over the same edges.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

from sidecar.decision import histogram_quantile, window_acceptance
from sidecar.windows import base_point, trim_history

BucketKey = tuple[str, str]  # (model, temperature bucket)

_NO_COUNTS: tuple[float, ...] = ()


def _minus(now: tuple[float, ...], base: tuple[float, ...]) -> tuple[float, ...]:
    if not base:
        return now
    return tuple(max(0.0, a - b) for a, b in zip(now, base, strict=True))


@dataclass(frozen=True, slots=True)
class BucketCounts:
    """Totals for one (model, bucket): cumulative in a checkpoint, a window's increase in ``TapHealth``.

    ``accepted``/``drafted``/``steps`` come from vLLM's per-request metrics (source ``vllm``, the exact
    figures the acceptance and the verdict use); ``accepted_all``/``steps_all`` add the stream-derived
    estimate (source ``stream_steps``) for the mean acceptance length. Histograms are per-edge counts (the
    last one is ``+Inf``) over ``ACCEPTANCE_BUCKETS``, ``TTFT_BUCKETS`` and ``TPOT_BUCKETS``.
    """

    requests: float = 0.0
    attributed: float = 0.0  # requests with vLLM's per-request metrics (source vllm)
    accepted: float = 0.0
    drafted: float = 0.0
    steps: float = 0.0
    accepted_all: float = 0.0
    steps_all: float = 0.0
    output: float = 0.0  # completion tokens of the source-vllm requests: passes = output - accepted
    acceptance: tuple[float, ...] = _NO_COUNTS
    ttft: tuple[float, ...] = _NO_COUNTS
    tpot: tuple[float, ...] = _NO_COUNTS

    def minus(self, base: BucketCounts | None) -> BucketCounts:
        """The increase since *base* (a reset, i.e. a value that went down, counts from zero)."""
        if base is None:
            return self
        return BucketCounts(
            *(max(0.0, a - b) for a, b in (
                (self.requests, base.requests), (self.attributed, base.attributed),
                (self.accepted, base.accepted), (self.drafted, base.drafted),
                (self.steps, base.steps), (self.accepted_all, base.accepted_all),
                (self.steps_all, base.steps_all), (self.output, base.output),
            )),
            acceptance=_minus(self.acceptance, base.acceptance),
            ttft=_minus(self.ttft, base.ttft),
            tpot=_minus(self.tpot, base.tpot),
        )  # fmt: skip

    def acceptance_rate(self, min_drafts: float) -> float | None:
        """accepted / drafted, or ``None`` below ``min_drafts`` verify steps (the one gate, ``decision``)."""
        return window_acceptance(self.accepted, self.drafted, self.steps, min_drafts)

    @property
    def passes(self) -> float | None:
        """Target forward passes of the source-vllm requests (every decode pass yields one token plus the
        drafts it accepted), or ``None`` when their output is unknown."""
        passes = self.output - self.accepted
        return passes if self.output > 0 and passes > 0 else None

    @property
    def mean_acceptance_length(self) -> float | None:
        """1 + accepted per verify step, over both sources (vLLM's definition of the mean length)."""
        return 1.0 + self.accepted_all / self.steps_all if self.steps_all > 0 else None


def quantile(q: float, edges: Sequence[float], counts: Sequence[float]) -> float | None:
    """A quantile of per-edge counts (``counts[-1]`` is ``+Inf``), as PromQL's ``histogram_quantile``."""
    if not counts or not any(counts):
        return None
    cumulative, running = [], 0.0
    for le, count in zip((*edges, float("inf")), counts, strict=True):
        running += count
        cumulative.append((le, running))
    return histogram_quantile(q, cumulative)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """Cumulative per-(model, bucket) totals at one tick of the tap's clock."""

    t: float
    totals: Mapping[BucketKey, BucketCounts]


@dataclass(frozen=True, slots=True)
class TapHealth:
    """What the tap publishes: per window, each (model, bucket)'s increase over it, and the span it really
    covers (shorter than the window just after start). Replaced whole at every tick; never mutated."""

    windows: Mapping[float, Mapping[BucketKey, BucketCounts]] = field(default_factory=lambda: MappingProxyType({}))
    spans: Mapping[float, float] = field(default_factory=lambda: MappingProxyType({}))
    ticks: int = 0
    # Buckets that ever had a request with vLLM's per-request metrics: the ones a verdict is given for
    # (``insufficient_data`` while their window is too thin), so a bucket never seen with drafts gets none.
    judged: frozenset[BucketKey] = frozenset()


class TapWindows:
    """A bounded history of checkpoints of ``totals()`` and the windows over it (pure apart from the deque)."""

    def __init__(self, totals: Callable[[], Mapping[BucketKey, BucketCounts]], windows: Sequence[float]) -> None:
        self._totals = totals
        self._windows = tuple(windows)
        self._checkpoints: deque[Checkpoint] = deque()

    def tick(self, t: float, tolerance: float, ticks: int) -> TapHealth:
        """Take a checkpoint at *t* and return the windows over the history."""
        self._checkpoints.append(Checkpoint(t, MappingProxyType(dict(self._totals()))))
        trim_history(self._checkpoints, t, max(self._windows))
        last = self._checkpoints[-1]
        windows: dict[float, Mapping[BucketKey, BucketCounts]] = {}
        spans: dict[float, float] = {}
        for window in self._windows:
            base = base_point(self._checkpoints, window, tolerance)
            if base is None:
                continue
            spans[window] = last.t - base.t
            windows[window] = MappingProxyType(
                {key: now.minus(base.totals.get(key)) for key, now in sorted(last.totals.items())}
            )
        judged = frozenset(key for key, totals in last.totals.items() if totals.attributed > 0)
        return TapHealth(MappingProxyType(windows), MappingProxyType(spans), ticks, judged)


class TapMonitor:
    """Ticks the tap's windows every *interval* seconds on its own schedule and publishes ``state``."""

    def __init__(
        self,
        totals: Callable[[], Mapping[BucketKey, BucketCounts]],
        windows: Sequence[float],
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._windows = TapWindows(totals, windows)
        self._interval = interval
        self._clock = clock
        self.state = TapHealth()

    def tick(self, now: float | None = None) -> TapHealth:
        now = self._clock() if now is None else now
        # Checkpoints are taken on this clock alone, so half an interval of jitter still finds the base.
        self.state = self._windows.tick(now, self._interval / 2, self.state.ticks + 1)
        return self.state

    async def run(self) -> None:
        """Tick forever on a fixed schedule (no drift; a late tick skips the ones it missed)."""
        next_tick = self._clock()
        while True:
            self.tick()
            next_tick += self._interval
            now = self._clock()
            if next_tick < now:
                next_tick = now + self._interval - ((now - next_tick) % self._interval)
            await asyncio.sleep(next_tick - now)
