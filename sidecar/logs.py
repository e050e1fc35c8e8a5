"""Logging set-up, done once at the entry point: every line on stderr is one structlog event.

The sidecar's own events go through structlog; the standard library's loggers (aiohttp's ``aiohttp.server``,
``aiohttp.access``, ``aiohttp.client``, ``asyncio``...) are routed through the same processors by
structlog's ``ProcessorFormatter``, so in ``json`` format a proxy error is one JSON object per line with the
traceback in its ``exception`` field, never a multi-line plain-text dump. ``console`` renders the same
events for people.

Problems that happen per request (an unreachable upstream, a reset) are counted in metrics and logged
through ``RateLimited``: at most one line per event and reason every ``every`` seconds, carrying how many
were suppressed since the previous line, so an outage does not flood the log.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any

import structlog


class _StderrHandler(logging.StreamHandler):
    """A handler that writes to whatever ``sys.stderr`` is at the time (tests and runners replace it)."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; the property wins
        pass


def configure_logging(fmt: str = "json", level: str = "info") -> None:
    numeric = getattr(logging, level.upper())
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.typing.Processor
    if fmt == "console":
        # Plain tracebacks: rich's would print local variables, and those can hold request headers.
        renderer = structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        tail: list[structlog.typing.Processor] = [renderer]
    else:
        # Tracebacks become a string field of the one JSON object (JSON escapes their newlines).
        tail = [structlog.processors.format_exc_info, structlog.processors.JSONRenderer()]
    structlog.configure(
        processors=[*shared, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # Resolve sys.stderr at each use (logs are rare: state changes only), so a replaced stream is honoured.
        logger_factory=lambda *args: structlog.WriteLogger(sys.stderr),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, structlog.stdlib.ExtraAdder(("suppressed",))],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tail],
    )
    handler = _StderrHandler()
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric)
    logging.captureWarnings(True)
    # aiohttp's server logs every malformed request a client sends (with a traceback): one line per
    # message kind every few seconds is enough to see it, a flood of them is not.
    server_log = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, RateLimitFilter) for f in server_log.filters):
        server_log.addFilter(RateLimitFilter())


class RateLimited:
    """At most one warning per (event, reason) every *every* seconds; the next line that gets through says
    how many were ``suppressed`` in between."""

    def __init__(self, logger: Any, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._every = every
        self._clock = clock
        self._state: dict[tuple[str, str], list[float]] = {}  # (event, reason) -> [last logged at, suppressed]

    def warning(self, event: str, reason: str, **fields: Any) -> bool:
        """Log unless the same event and reason were logged less than *every* seconds ago; True if logged."""
        now = self._clock()
        state = self._state.get((event, reason))
        if state is not None and now - state[0] < self._every:
            state[1] += 1
            return False
        suppressed = int(state[1]) if state is not None else 0
        self._state[(event, reason)] = [now, 0]
        self._log.warning(event, reason=reason, suppressed=suppressed, **fields)
        return True


class RateLimitFilter(logging.Filter):
    """The stdlib counterpart of ``RateLimited`` for loggers the sidecar does not own: at most one record
    per message template every *every* seconds; the next one carries ``suppressed``."""

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self._every = every
        self._clock = clock
        self._state: dict[str, list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = self._clock()
        key = str(record.msg)
        state = self._state.get(key)
        if state is not None and now - state[0] < self._every:
            state[1] += 1
            return False
        record.suppressed = int(state[1]) if state is not None else 0
        self._state[key] = [now, 0]
        return True
