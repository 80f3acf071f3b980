"""The gateway's HTTP metrics: requests by route template and status, and their latency.

``musicgen_http_requests_total{method,route,status}`` and
``musicgen_http_request_duration_seconds{method,route}`` (a histogram), served at ``/metrics``
beside the routes. The route label is the matched route's template (``/v1/jobs/{job_id}``), never
the raw path, so a job id never becomes a label value; a request no route matched is
``unmatched``. Each app has its own registry: two gateways in one process (tests) never share or
collide on a metric.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Latency buckets from a 5 ms page hit to a 60 s ``Prefer: wait`` (seconds).
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class HttpMetrics:
    """The metrics of one app, and the ASGI middleware that records them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("musicgen_http_requests", "HTTP requests the gateway answered",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("musicgen_http_request_duration_seconds",
                                 "Time from a request's arrival to its response's last byte",
                                 ["method", "route"], buckets=BUCKETS, registry=self.registry)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        """``app`` wrapped so that every HTTP request is counted and timed."""
        metrics = self

        async def record(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            start = time.perf_counter()
            status = [500]  # what the client gets if the app raises before it answers

            async def capture(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)

            try:
                await app(scope, receive, capture)
            finally:
                # The router puts the matched route in the scope it was handed (this one).
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                metrics.requests.labels(scope["method"], route, str(status[0])).inc()
                metrics.latency.labels(scope["method"], route).observe(
                    time.perf_counter() - start)

        return record
