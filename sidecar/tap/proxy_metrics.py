"""The proxy's own health (RED): every request through it, the failures it produced itself, its own time.

The tap's families (``metrics.py``) describe vLLM's work on the observed endpoints; these describe the
proxy's, on every path (``/v1/models``, ``/health``, ``/metrics`` through the proxy included), so that a
sidecar sitting in the request path can be held to account like any other hop:

* ``specdec_proxy_requests_total{status_class}``: each request once, by the class of the status its client
  got (``2xx``..``5xx``; ``4xx`` also for a client that went away before the response started, recorded as
  nginx's 499; ``5xx`` also for one the proxy dropped without a status, which only a bug of its own does).
  ``status_class``, as the tap's ``specdec_requests_total`` names it, so one regex reads both; a class, not
  the code, to keep the series few (the code of the proxy's own errors is fixed by their reason, below).
  Informational responses are not relayed, so there is no ``1xx``.
* ``specdec_proxy_errors_total{reason}``: what the proxy did itself because a side failed. ``connect_refused``
  (no connection to vLLM: refused, or any other error of the connect) and ``upstream_closed`` (vLLM closed
  the connection before its response, and the request could not be sent again) answer a 502;
  ``connect_timeout`` a 504 (nginx's answers to the same failures); ``upstream_reset`` (vLLM broke off mid-response) aborts the client's
  connection after the status was relayed; ``buffered_bytes_cap`` closes a client that stopped reading once
  all such clients hold more than ``--max-buffered-bytes``. Every reason is exported from the start at 0,
  so ``rate()`` sees the first failure.
* ``specdec_proxy_overhead_seconds``: per relayed response, the time spent in the sidecar itself: from the
  request's last byte in (its head, when the body streams through) to the request written to vLLM
  (connecting included), plus from vLLM's first response byte to the response head written to the
  client. vLLM's own time between the two is not in it. The proxy's own answers (400, 431, 502, 504) have
  no upstream hop and are not observed.

Example output::

    specdec_proxy_requests_total{status_class="2xx"} 1432.0
    specdec_proxy_requests_total{status_class="5xx"} 3.0
    specdec_proxy_errors_total{reason="connect_refused"} 3.0
    specdec_proxy_overhead_seconds_bucket{le="0.001"} 1389.0
    specdec_proxy_overhead_seconds_count 1432.0

Costs per request on the hot path: two ``perf_counter()`` calls beside the ones the upstream connection
makes, one counter increment and one histogram observation (children looked up once).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from sidecar.tap.upstream import CONNECT_REFUSED, CONNECT_TIMEOUT

UPSTREAM_CLOSED = "upstream_closed"
UPSTREAM_RESET = "upstream_reset"
BUFFERED_BYTES_CAP = "buffered_bytes_cap"
ERROR_REASONS = (CONNECT_REFUSED, CONNECT_TIMEOUT, UPSTREAM_CLOSED, UPSTREAM_RESET, BUFFERED_BYTES_CAP)
# The status a client gets for each reason the proxy answers itself (the others end the connection).
ERROR_STATUS = {CONNECT_REFUSED: 502, UPSTREAM_CLOSED: 502, CONNECT_TIMEOUT: 504}
# The sidecar's own time per request: a few tenths of a millisecond on a core of its own (docs/benchmarks.md),
# growing with what queues on its core. 0.05 s is the edge the added-latency alert compares the P99 with. Seven
# edges, 10 series: the page's budget (docs/scaling.md).
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.0025, 0.01, 0.025, 0.05, 0.25)
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")


class ProxyMetrics:
    """The proxy's RED families on *registry* (the sidecar's own registry, created only with ``--proxy-port``)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "specdec_proxy_requests",
            "Requests through the proxy on every path, by the status class their client got (4xx includes "
            "clients gone before the response started; other: ended without a status).",
            ["status_class"], registry=registry,
        )  # fmt: skip
        self.errors = Counter(
            "specdec_proxy_errors",
            "Failures the proxy answered or acted on itself, by reason: connect_refused, connect_error, "
            "upstream_closed (a 502), connect_timeout (a 504), upstream_reset (client connection aborted "
            "mid-response), buffered_bytes_cap (a client that stopped reading closed at --max-buffered-bytes).",
            ["reason"], registry=registry,
        )  # fmt: skip
        self.overhead = Histogram(
            "specdec_proxy_overhead_seconds",
            "Time spent in the sidecar per relayed request: request received to request written to vLLM, plus "
            "vLLM's first response byte to the response head written to the client.",
            buckets=OVERHEAD_BUCKETS, registry=registry,
        )  # fmt: skip
        # Every class exists from the start (the rules divide 5xx by all, and rate() must see the first one).
        self._classes = {int(c[0]): self.requests.labels(c) for c in STATUS_CLASSES}
        self._errors = {reason: self.errors.labels(reason) for reason in ERROR_REASONS}
        self._observe = self.overhead.observe

    def response(self, status: int) -> None:
        """One request ended with *status* for its client (499: it went away before the response; 0: the
        proxy dropped it without a status, counted as its own server error)."""
        self._classes.get(status // 100, self._classes[5]).inc()

    def error(self, reason: str) -> None:
        self._errors[reason].inc()

    def overhead_seconds(self, seconds: float) -> None:
        self._observe(max(0.0, seconds))
