"""Every Redis touch of a running job, against a Redis that is not there (a real client on a
closed port): the ones before the job runs become a retryable error once the outage outlasts the
wait; the ones after it never replace the job's outcome."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.client.registry import RedisJobRegistry
from pipeline.errors import (
    Backpressure,
    CoordinationUnavailable,
    PipelineError,
    ServiceUnavailable,
    TransientError,
)
from pipeline.policies.breaker import Admission, CircuitBreaker, RedisBreakerBackend
from pipeline.policies.rate_limit import GlobalRateLimit
from workers.outage import through_outage
from workers.tasks import settle_breaker


@pytest.fixture
def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def dead_redis(closed_port: int) -> Iterator[redis.Redis]:
    # No client-side retries (redis-py 8 retries a refused connection 10 times, ~4 s): the waits
    # under test are the worker's own.
    client = redis.Redis(port=closed_port, socket_connect_timeout=0.5, socket_timeout=0.5,
                         retry=Retry(NoBackoff(), 0))
    yield client
    client.close()


class FakeTime:
    """A clock the waits advance, so a 45 s outage is tested in no time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.pauses: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now


def breaker_on(client: redis.Redis) -> CircuitBreaker:
    return CircuitBreaker("tiny", threshold=3, reset_timeout=30, backend=RedisBreakerBackend(client))


def touches(dead: redis.Redis, port: int) -> dict[str, Callable[[], Any]]:
    """The Redis touches a job makes before it runs, each on the unreachable Redis."""
    registry = RedisJobRegistry(dead)
    limit = GlobalRateLimit("5/minute", storage_uri=f"redis://127.0.0.1:{port}/0")
    return {
        "cancel flag": lambda: registry.is_cancelled("job-1"),
        "delivery count": lambda: registry.count_delivery("job-1", 60),
        "rate limit": lambda: limit.try_acquire("musicgen.tiny"),
        "breaker admission": breaker_on(dead).admit,
    }


@pytest.mark.parametrize("what", ["cancel flag", "delivery count", "rate limit", "breaker admission"])
def test_a_touch_before_the_job_runs_becomes_a_retryable_error(
        what: str, dead_redis: redis.Redis, closed_port: int) -> None:
    fake = FakeTime()
    with pytest.raises(CoordinationUnavailable) as raised:
        through_outage(what, touches(dead_redis, closed_port)[what], wait_s=10,
                       sleep=fake.sleep, clock=fake.clock)
    err = raised.value
    # Celery's autoretry_for=(TransientError,) retries it; it is never a final failure.
    assert isinstance(err, TransientError) and err.retryable
    assert err.code == "coordination_unavailable" and what in err.message
    assert isinstance(err.__cause__, (redis.RedisError, ServiceUnavailable))
    # It waited the outage out with growing pauses before giving up, not at once.
    assert len(fake.pauses) > 3 and fake.pauses == sorted(fake.pauses)
    assert sum(fake.pauses) <= 10
    # It crosses the broker intact, as Celery stores a retried job's exception.
    again = PipelineError.from_dict(err.to_dict())
    assert type(again) is CoordinationUnavailable and again.retryable


def test_a_touch_goes_on_once_redis_is_back(dead_redis: redis.Redis) -> None:
    """The failover ends: the promoted master answers the same call within the wait."""
    live = redis.Redis(port=6379)
    clients = iter([dead_redis, dead_redis, live])
    fake = FakeTime()
    assert through_outage("the cancel flag",
                          lambda: RedisJobRegistry(next(clients)).is_cancelled("no-such-job"),
                          sleep=fake.sleep, clock=fake.clock) is False
    assert len(fake.pauses) == 2
    live.close()


def test_backpressure_is_not_an_outage() -> None:
    def refuse() -> None:
        raise Backpressure("queue full", None, {"retry_after": 5})

    with pytest.raises(Backpressure):
        through_outage("the backlog", refuse, sleep=pytest.fail)


@pytest.mark.parametrize("verdict", ["success", "failure", "release"])
def test_settling_the_breaker_never_fails_a_job(verdict: str, dead_redis: redis.Redis) -> None:
    """After the job: its file is written; a breaker that cannot be told is logged, not raised."""
    breaker = breaker_on(dead_redis)
    with pytest.raises(ServiceUnavailable):
        breaker.record_failure()  # the breaker itself does reach for the dead Redis
    settle_breaker(breaker, Admission(probe_until=123.0), verdict)  # type: ignore[arg-type]


def test_progress_on_a_dead_redis_is_skipped(dead_redis: redis.Redis) -> None:
    """Progress writes and the cancel-flag read during a job are best effort (workers/tasks.py)."""
    from workers.tasks import _JobProgress

    class Task:
        class request:  # noqa: N801 (Celery's attribute name)
            id = "job-1"

        def update_state(self, **_: Any) -> None:
            raise AssertionError("not reached: the cancel read fails first")

    progress = _JobProgress(Task(), RedisJobRegistry(dead_redis))  # type: ignore[arg-type]
    progress(0.5, "generating")  # no exception: the job goes on


def test_a_finished_job_whose_state_a_failover_lost_gets_it_back_from_its_sidecar(
        tmp_path: Path) -> None:
    """The old master took the SUCCESS and resynced it away; the redelivery restores it."""
    import uuid

    from pipeline.config.schema import Settings
    from pipeline.contract.jobs import JobResult
    from pipeline.infra.celery_app import make_celery
    from workers.outage import restore_lost_result
    from workers.storage import write_sidecar

    app = make_celery(Settings.model_validate({"broker": {"url": "redis://127.0.0.1:6379/0"}}))
    job_id = f"lost-{uuid.uuid4().hex}"
    output = tmp_path / f"{job_id}.wav"
    output.write_bytes(b"RIFF")
    result = {"job_id": job_id, "uri": output.as_uri(), "format": "wav", "duration": 1.0,
              "sample_rate": 32000, "bit_depth": 16, "loudness_lufs": None, "peak_dbfs": None,
              "channels": 1, "model": "tiny", "seed": 7, "worker": "w1",
              "timings": {"queue_wait": 0.1, "model_load": 0.0, "generate": 0.5,
                          "postprocess": 0.1, "total": 0.7}}
    write_sidecar(output, {"request": {}, "result": result})
    try:
        assert app.backend.get_state(job_id) == "PENDING"  # lost: no state at all
        assert restore_lost_result(app.backend, [tmp_path / f"{job_id}.mp3", output], job_id)
        assert app.backend.get_state(job_id) == "SUCCESS"
        assert JobResult.model_validate(app.backend.get_result(job_id)).seed == 7
        # A state that is there already is left alone (the common late redelivery).
        assert not restore_lost_result(app.backend, [output], job_id)
    finally:
        app.backend.forget(job_id)
        app.close()


def test_no_sidecar_no_restore(tmp_path: Path) -> None:
    """A failed or cancelled job's files are gone: there is nothing to restore from."""
    from workers.outage import restore_lost_result

    class Backend:
        def get_state(self, job_id: str) -> str:
            return "STARTED"

        def store_result(self, *args: Any, **kwargs: Any) -> None:
            raise AssertionError("nothing to restore from")

    assert not restore_lost_result(Backend(), [tmp_path / "job.wav"], "job")
