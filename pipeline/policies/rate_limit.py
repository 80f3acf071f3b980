"""A rate limit shared by every worker of a queue/model (Celery's ``rate_limit`` is per worker).

Built on the ``limits`` library with its **moving window** strategy: each hit is a timestamp in
one Redis LIST per key, trimmed to N, checked and pushed by one Lua script. Why not a fixed
window: ``limits``' fixed window counts from the first hit until the key's TTL runs out, so N
hits at the end of one window and N at the start of the next put 2N jobs on the GPUs within
seconds; and its reset time comes from a whole-second TTL, so waiters wake early. The moving
window promises "at most N in *any* window-long interval", and its reset time is exact: the
moment the oldest hit in the window leaves it, i.e. when a slot frees. The cost is a LIST of N
floats per key, nothing at rates like "20/minute". Hit timestamps come from the caller's clock,
so hosts must be NTP-synced (as they must for Celery's ETA tasks anyway).

A job over the limit waits (:meth:`GlobalRateLimit.acquire`); it is not failed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import limits
from limits.errors import ConfigurationError, StorageError
from limits.storage import storage_from_string
from limits.strategies import MovingWindowRateLimiter

from pipeline.errors import ServiceUnavailable
from pipeline.infra import keys

log = logging.getLogger(__name__)

# After a lost race the window may already have a free slot: retry (almost) at once.
_RETRY_SOON = 0.001


def redact_uri(uri: str) -> str:
    """``uri`` with any password replaced by ``***``, for reprs, logs and error messages."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


@dataclass(frozen=True)
class RateWindow:
    """One key's window: its limit, the requests left in it, and seconds until a slot frees
    (the moving window's oldest hit leaves it)."""

    limit: int
    remaining: int
    reset_s: float


class GlobalRateLimit:
    """``rate`` (e.g. ``"20/minute"``, ``"5 per 10 seconds"``) per key, across all processes.

    ``storage_uri`` is ``redis://[:password@]host:port/db`` (the caller builds it from the broker
    URL) or ``memory://`` (one process: tests, a solo development worker). Keys are stored under
    ``key_prefix`` (default :data:`pipeline.infra.keys.RATE_LIMIT_PREFIX`). The password is kept only
    inside the Redis connection pool: it never appears in this object's repr or in a log line.
    """

    def __init__(self, rate: str, *, storage_uri: str,
                 key_prefix: str = keys.RATE_LIMIT_PREFIX) -> None:
        self.item: limits.RateLimitItem = limits.parse(rate)
        self.rate = rate
        self.key_prefix = key_prefix
        self.storage_display = redact_uri(storage_uri)
        try:
            # wrap_exceptions: one exception type to translate whatever the storage backend is.
            storage = storage_from_string(storage_uri, key_prefix=key_prefix,
                                          wrap_exceptions=True)
        except (ConfigurationError, ValueError) as e:
            # `from None`, against house style, on purpose: limits puts the raw URI (password
            # included) in its message, and a chained cause would print it in every traceback.
            raise ValueError(f"bad rate-limit storage URI {self.storage_display}: "
                             f"{str(e).replace(storage_uri, self.storage_display)}") from None
        self._limiter = MovingWindowRateLimiter(storage)

    def __repr__(self) -> str:
        return (f"GlobalRateLimit({self.rate!r}, storage_uri={self.storage_display!r}, "
                f"key_prefix={self.key_prefix!r})")

    def try_acquire(self, key: str) -> float:
        """Take a slot for ``key``: ``0.0`` if taken, else the seconds until one frees."""
        try:
            if self._limiter.hit(self.item, key):
                return 0.0
        except StorageError as e:
            raise self._unreachable(key) from e
        left = self.window(key)
        if left.remaining > 0:
            return _RETRY_SOON  # a slot freed between the hit and the stats read
        return max(left.reset_s, _RETRY_SOON)

    def window(self, key: str) -> RateWindow:
        """Where ``key`` stands in its window now (for ``RateLimit-*`` headers); takes no slot."""
        try:
            stats = self._limiter.get_window_stats(self.item, key)
        except StorageError as e:
            raise self._unreachable(key) from e
        return RateWindow(self.item.amount, stats.remaining,
                          max(stats.reset_time - time.time(), 0.0))

    def _unreachable(self, key: str) -> ServiceUnavailable:
        return ServiceUnavailable(f"rate-limit storage {self.storage_display} is unreachable",
                                  details={"key": key, "rate": self.rate})

    def acquire(self, key: str, *, timeout: float,
                sleep: Callable[[float], None] = time.sleep) -> None:
        """Block until a slot for ``key`` is taken; :class:`TimeoutError` after ``timeout`` s.

        Sleeps until the reported free time rather than polling; when many workers wake for the
        same slot, one takes it and the others are told the next free time.
        """
        deadline = time.monotonic() + timeout
        while True:
            wait = self.try_acquire(key)
            if wait == 0.0:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"rate limit {self.rate} for {key!r} still full after {timeout} s")
            log.debug("rate limit %s for %r full; waiting %.3f s", self.rate, key, wait)
            sleep(min(wait, remaining))
