"""The policies one process applies, built from Settings.

With a Redis broker every policy keeps its state in that Redis, so all producers and workers
share it. With the embedded development broker there is one worker and no Redis, so breakers and
the rate limit live in memory and backpressure is off: there is no backlog to protect.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.config.schema import Settings
from pipeline.infra.brokers import limits_storage_uri
from pipeline.policies.backpressure import BackpressurePolicy, queue_depth
from pipeline.policies.breaker import (
    BreakerBackend,
    CircuitBreaker,
    MemoryBreakerBackend,
    RedisBreakerBackend,
)
from pipeline.policies.rate_limit import GlobalRateLimit


class Policies:
    """Breakers (one per model preset), the global rate limit and the backlog check."""

    def __init__(self, settings: Settings, *, redis_client: Any | None, redis_url: str | None,
                 depth: Callable[[str], int] | None = None) -> None:
        self.settings = settings
        self.redis = redis_client
        # How deep a queue is: kombu's Redis lists by default; the app's own reader (RabbitMQ's
        # message count) when the queues are not on this Redis.
        self._depth = depth or (lambda queue: queue_depth(redis_client, queue) if redis_client else 0)
        self._backend: BreakerBackend = (RedisBreakerBackend(redis_client) if redis_client is not None
                                         else MemoryBreakerBackend())
        rl = settings.rate_limit
        self.rate_limit: GlobalRateLimit | None = None
        if rl.enabled:
            storage = limits_storage_uri(redis_url, settings.broker.master_name) if redis_url else None
            self.rate_limit = GlobalRateLimit(rl.rate, storage_uri=storage or "memory://")
        self.backpressure = BackpressurePolicy(settings.monitoring.backlog_threshold if redis_client else 0)

    def breaker(self, preset: str) -> CircuitBreaker | None:
        cb = self.settings.circuit_breaker
        if not cb.enabled:
            return None
        # A probe may run as long as a job may: its claim must not expire before the hard limit.
        return CircuitBreaker(preset, threshold=cb.threshold, reset_timeout=cb.reset_timeout,
                              backend=self._backend,
                              probe_timeout=max(cb.reset_timeout, float(self.settings.worker.hard_time_limit)))

    def check_backlog(self, queue: str, adding: int = 0) -> None:
        """Producer: refuse at once when the queue already holds more than it can drain
        (``adding``: jobs of the same list admitted before this one, not sent yet)."""
        if self.redis is not None and self.backpressure.threshold > 0:
            self.backpressure.check(queue, self._depth(queue) + adding)

    @classmethod
    def for_app(cls, app: Any, settings: Settings | None = None) -> Policies:
        """Policies on the app's Redis (the app from ``pipeline.infra.celery_app``): the broker's, or
        the result backend's with RabbitMQ; ``settings`` default to the app's."""
        return cls(settings or app.settings, redis_client=app.redis, redis_url=app.coordination_url,
                   depth=None if app.embedded else app.queue_depth)
