"""Worker and producer policies: plain classes over a backend, no Celery, no torch."""

from pipeline.policies.backpressure import BackpressurePolicy, queue_depth
from pipeline.policies.breaker import (
    BreakerBackend,
    BreakerState,
    CircuitBreaker,
    MemoryBreakerBackend,
    RedisBreakerBackend,
)
from pipeline.policies.rate_limit import GlobalRateLimit

__all__ = [
    # circuit breaker
    "CircuitBreaker", "BreakerState", "BreakerBackend", "MemoryBreakerBackend",
    "RedisBreakerBackend",
    # global rate limit
    "GlobalRateLimit",
    # backpressure
    "BackpressurePolicy", "queue_depth",
]
