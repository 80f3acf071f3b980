"""``broker.wait_replicas``: an enqueue is accepted only once that many Redis replicas have it.

Here against the shared Redis, which has no replica, so every wait runs out: the refusal is a
typed ``service_unavailable`` naming the job, the job stays queued, and enqueueing its id again
makes no second job. The confirmed case runs against a real replica in
tests/integration/test_sentinel_failover.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import pipeline
from pipeline import GenerationRequest
from pipeline.config.rules import RULES
from pipeline.config.schema import Settings
from pipeline.infra import brokers, keys
from pipeline.policies.backpressure import queue_depth
from pipeline.quota.configured import prepare_database

WAIT_MS = 30


@pytest.fixture
def producer(isolated_settings_env: Path, redis_url: str,
             monkeypatch: pytest.MonkeyPatch) -> Iterator[pipeline.Producer]:
    client = redis.Redis.from_url(redis_url)
    before = set(client.scan_iter(count=1000))
    monkeypatch.setenv("MUSICGEN_BROKER__URL", redis_url)
    monkeypatch.setenv("MUSICGEN_BROKER__WAIT_REPLICAS", "1")
    monkeypatch.setenv("MUSICGEN_BROKER__WAIT_TIMEOUT_MS", str(WAIT_MS))
    monkeypatch.setenv("MUSICGEN_DATABASE__URL", f"sqlite:///{isolated_settings_env}/ledger.db")
    monkeypatch.setenv("MUSICGEN_QUOTAS__DEFAULT_TIER", "enterprise")
    settings = pipeline.load_settings()
    prepare_database(settings)
    prod = pipeline.Producer(settings)
    yield prod
    prod.quota.close()
    prod.app.close()
    prod.app.redis.close()
    new = set(client.scan_iter(count=1000)) - before  # queued messages, claims, states
    if new:
        client.delete(*new)
    client.close()


def test_an_unconfirmed_enqueue_is_refused_but_stays_one_queued_job(producer: pipeline.Producer) -> None:
    request = GenerationRequest(prompt="replicated?", duration=1.0, job_id="replica-wait-1")
    started = time.monotonic()
    with pytest.raises(pipeline.ServiceUnavailable) as refused:
        producer.enqueue(request)
    assert time.monotonic() - started >= WAIT_MS / 1000  # it did wait for a replica
    err = refused.value
    assert err.code == "service_unavailable"
    assert err.details == {"retry_after": 1, "job_ids": ["replica-wait-1"], "replicas": 0}
    assert "replica-wait-1" in err.message and "enqueue again with the same job_id" in err.message
    # Queued all the same (a publish cannot be taken back), and known to the producer.
    assert producer.get_job("replica-wait-1").status() == "queued"
    assert queue_depth(producer.app.redis, "musicgen.musicgen-small") == 1
    with pytest.raises(pipeline.ServiceUnavailable):
        producer.enqueue(request)  # the caller's retry: still unconfirmed, still one job
    assert queue_depth(producer.app.redis, "musicgen.musicgen-small") == 1


def test_wait_for_replicas_counts_what_redis_confirms(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        assert brokers.wait_for_replicas(client, 1, WAIT_MS) == 0  # no replica here
        assert client.exists(keys.REPLICATION_FENCE)
    finally:
        client.close()


@pytest.mark.parametrize(("url", "refused"), [
    ("redis://h:6379/0", False), ("sentinel://a:26379;sentinel://b:26379", False),
    ("amqp://u@h:5672/v", True), (None, True)])
def test_the_replica_wait_is_a_redis_setting(url: str | None, refused: bool) -> None:
    raw = Settings.model_validate({"broker": {"url": url, "wait_replicas": 1,
                                              "result_backend": "redis://h:6379/1"}}).model_dump()
    rule = next(r for r in RULES if r.name == "broker: replica wait on Redis only")
    problem = rule.check(raw)
    assert (problem is not None) is refused
    if problem is not None:
        assert problem.path == "broker.wait_replicas"
