"""Fixtures for the policy tests: real Redis on a safe database, and memory-vs-redis params.

The Redis at 127.0.0.1:6379 is shared with other people's work: nothing here flushes a database.
Each test gets a unique key prefix (``test:<uuid>:``) on an empty database when one exists (rq's
``find_empty_redis_database``), and deletes only the keys under its own prefix afterwards. A
Redis that is not running fails the tests instead of skipping them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

from pipeline.policies.breaker import BreakerBackend, MemoryBreakerBackend, RedisBreakerBackend
from tests import redis_claim

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379


def _claim_empty_db(token: str) -> int:
    """The highest-numbered free database (tests/redis_claim.py), claimed with an owner key so
    that a parallel test process (pytest -n) or the integration fixtures, which claim from the
    bottom, never pick it too and delete our keys at their end."""
    with redis.Redis(host=REDIS_HOST, port=REDIS_PORT) as probe:
        count = int(probe.config_get("databases").get("databases", 16))
    for db in range(count - 1, 0, -1):
        with redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db) as client:
            if redis_claim.claim(client, token):
                return db
    return count - 1  # none free: still safe, we only ever touch our own prefix


@pytest.fixture(scope="session")
def redis_db() -> Iterator[int]:
    """The database index the Redis-backed tests use for the whole session; its keys (the
    tests' own, and what the queues they enqueue on leave) are deleted after, if we claimed it."""
    token = uuid.uuid4().hex
    db = _claim_empty_db(token)
    yield db
    with redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db) as client:
        redis_claim.release(client, token)


@pytest.fixture(scope="session")
def redis_url(redis_db: int) -> str:
    """``redis://host:port/db`` for code that takes a URI (limits, kombu, child processes)."""
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{redis_db}"


@pytest.fixture
def key_prefix() -> str:
    """A prefix no other test (or person) uses."""
    return f"test:{uuid.uuid4().hex}:"


@pytest.fixture
def redis_client(redis_url: str, key_prefix: str) -> Iterator[redis.Redis]:
    """A client on the session database; deletes the test's own keys (``key_prefix*``) after."""
    client = redis.Redis.from_url(redis_url)
    client.ping()  # fail here, loudly, if Redis is not running
    yield client
    own = list(client.scan_iter(match=f"{key_prefix}*", count=1000))
    if own:
        client.delete(*own)
    client.close()


@dataclass
class Backend:
    """A breaker backend under test, and how to build a second, independent handle on it."""

    kind: str  # "memory" | "redis"
    backend: BreakerBackend
    redis_url: str | None = None
    prefix: str | None = None
    clients: list[redis.Redis] = field(default_factory=list)

    def another(self) -> BreakerBackend:
        """A second backend on the same storage (own connection for Redis)."""
        if self.kind == "memory":
            return self.backend  # one process: the shared dict *is* the storage
        assert self.redis_url and self.prefix
        self.clients.append(redis.Redis.from_url(self.redis_url))
        return RedisBreakerBackend(self.clients[-1], self.prefix)


@pytest.fixture(params=["memory", "redis"])
def breaker_backend(request: pytest.FixtureRequest, key_prefix: str,
                    redis_url: str) -> Iterator[Backend]:
    """The same test body runs against the in-memory backend and against real Redis."""
    if request.param == "memory":
        yield Backend("memory", MemoryBreakerBackend())
        return
    client = request.getfixturevalue("redis_client")
    prefix = f"{key_prefix}breaker:"
    backend = Backend("redis", RedisBreakerBackend(client, prefix), redis_url, prefix)
    yield backend
    for extra in backend.clients:
        extra.close()


@pytest.fixture(params=["memory", "redis"])
def rate_storage_uri(request: pytest.FixtureRequest, redis_url: str) -> str:
    """A ``limits`` storage URI: per-process memory, or the real Redis."""
    if request.param == "memory":
        return "memory://"
    request.getfixturevalue("redis_client")  # so the test's own keys are cleaned up
    return redis_url


class FakeClock:
    """A clock the test moves by hand: ``clock()`` reads it, ``clock.advance(s)`` moves it."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    """A fake wall clock, shared by every breaker a test builds."""
    return FakeClock()
