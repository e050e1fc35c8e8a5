"""A thin, byte-exact reverse proxy in front of vLLM that taps each request as it streams through.

Every method, target, header and body is forwarded; the response's status, headers and body come back
unchanged, streamed as they arrive (no whole bodies held), except hop-by-hop headers (RFC 9110 §7.6.1) and
the body's framing on each hop (a chunked or close-delimited body reaches an HTTP/1.1 client chunked).
Bodies are neither decompressed nor re-encoded, in either direction: a gzip-encoded request reaches vLLM
as the client sent it. A client that goes away cancels its exchange, which closes the upstream connection,
so vLLM aborts the request. If vLLM cannot be reached the client gets a 502 (a 504 when connecting timed
out) with an OpenAI-style JSON error; a request target that is not a path (absolute-form, ``OPTIONS *``) gets a 400.

Three layers, each in its own module, assembled here:

* ``http1.py``: the clients' side of HTTP/1.1 — connections, request parsing (llhttp), framing,
  keep-alive, idle timers, back-pressure;
* ``exchange.py``: the policy for one request — what is observed (``observe.py`` reads the bytes the proxy
  forwards and can never fail the request), the memory observation may take, when a request is sent
  again, and how each failure is counted, on the side where it happened;
* ``upstream.py``: vLLM's side of HTTP/1.1 — a keep-alive pool of connections whose response events are
  written to the client from the socket's read callback, with no task wake-up per event.

Back-pressure is the transports' own in both directions (a full client write buffer pauses reading from
vLLM; a full upstream write buffer pauses reading the client's body).
"""

from __future__ import annotations

import asyncio

from sidecar.tap.exchange import ExchangePolicy, Recorder
from sidecar.tap.http1 import Http1Server
from sidecar.tap.observe import Budget
from sidecar.tap.proxy_metrics import ProxyMetrics
from sidecar.tap.upstream import Origin, UpstreamPool

# All in-flight observations together hold at most this many times --max-observed-body.
BUDGET_FACTOR = 4


class Proxy:
    """The proxy on one listening port, forwarding to *upstream* (``http(s)://host[:port][/prefix]``).

    *max_observed_body*: the most one request's body or buffered response is held for observation (and, at
    least 64 KiB, what a request body not yet sent may hold before the client's reading pauses);
    *connect_timeout*, *keepalive*: for connections to vLLM; *budget*: what all observations may hold
    together (``BUDGET_FACTOR`` × *max_observed_body* by default); *max_buffered_bytes*: the most all
    clients that stopped reading may hold of their responses in the proxy (``Http1Server``; None: no cap);
    *metrics*: the proxy's own RED families (``proxy_metrics.py``; None: not counted)."""

    def __init__(
        self,
        upstream: str,
        recorder: Recorder,
        max_observed_body: int,
        connect_timeout: float,
        keepalive: float,
        budget: Budget | None = None,
        max_buffered_bytes: int | None = None,
        metrics: ProxyMetrics | None = None,
    ) -> None:
        origin = Origin(upstream)
        self.pool = UpstreamPool(origin.hostname, origin.port, keepalive, connect_timeout, origin.tls)
        self.budget = budget if budget is not None else Budget(BUDGET_FACTOR * max_observed_body)
        self.policy = ExchangePolicy(origin, self.pool, recorder, max_observed_body, self.budget, metrics)
        self.server = Http1Server(self.policy, max_held_body=max(max_observed_body, 64 * 1024),
                                  max_buffered=max_buffered_bytes, counts=metrics)

    async def start(self, host: str, port: int, backlog: int = 1024) -> int:
        """Listen on *host*:*port* (0: any free port); returns the port."""
        return await self.server.start(host, port, backlog)

    async def close(self) -> None:
        """Stop listening, end every client connection (their exchanges are cancelled), then drop the pool."""
        await self.server.close()
        self.pool.close()
        await asyncio.sleep(0)
