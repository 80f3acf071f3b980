"""Every way a job ends settles its breaker pass: a verdict on the model, or the probe given back.

Before, a half-open probe job that ended with neither a success nor a model failure (bad input,
a cancel, a deferral) kept its claim until it expired (the hard time limit): the whole model
took no job meanwhile.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from celery.exceptions import Ignore, SoftTimeLimitExceeded

import pipeline
from pipeline import GenerationRequest
from pipeline.errors import (
    GpuOutOfMemory,
    InvalidRequest,
    JobTimeout,
    ModelRuntimeError,
    PoisonJob,
    PostProcessFailed,
    UnsupportedOption,
)
from pipeline.policies import CircuitBreaker, RedisBreakerBackend
from workers.tasks import settle_breaker, verdict_of

from .conftest import WorkerFactory
from .test_failures import producer, wait_for

pytestmark = [pytest.mark.integration]


@pytest.fixture
def half_open(redis_url: str) -> Iterator[CircuitBreaker]:
    """A real Redis breaker, tripped and past its reset timeout: the next admit is the probe."""
    client = redis.Redis.from_url(redis_url)
    prefix = f"settle-{uuid.uuid4().hex[:8]}:"
    now = [1_700_000_000.0]
    breaker = CircuitBreaker("tiny", threshold=1, reset_timeout=5.0, probe_timeout=600.0,
                             backend=RedisBreakerBackend(client, prefix), clock=lambda: now[0])
    breaker.record_failure()
    now[0] += 5.0
    yield breaker
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


# Each exit of run_generate after the breaker pass, and what it must leave behind.
EXITS = [
    (None, "closed"),  # a result
    (GpuOutOfMemory("oom"), "open"), (ModelRuntimeError("nan"), "open"),
    (JobTimeout("soft limit", "duration"), "open"), (SoftTimeLimitExceeded(), "open"),
    (PoisonJob("kills its worker"), "open"),
    # No verdict on the model: the probe is released and the breaker stays half-open.
    (InvalidRequest("bad prompt", "prompt"), "half_open"),
    (UnsupportedOption("no encoder", "format"), "half_open"),
    (PostProcessFailed("ffmpeg crashed"), "half_open"),
    (Ignore(), "half_open"),  # a cancel, or a delivery of a job that already finished
    (KeyError("a bug"), "half_open"),
]


@pytest.mark.parametrize(("exit_", "state"), EXITS, ids=lambda v: type(v).__name__)
def test_each_exit_settles_the_probe(half_open: CircuitBreaker, exit_: BaseException | None,
                                     state: str) -> None:
    admission = half_open.admit()
    assert admission is not None and admission.is_probe
    settle_breaker(half_open, admission, verdict_of(exit_))
    status = half_open.status()
    assert status["state"] == state
    assert status["probe_running"] is False  # nobody waits for an expiry
    if state == "half_open":
        again = half_open.admit()
        assert again is not None and again.is_probe  # the next job probes at once


def test_settling_never_raises(half_open: CircuitBreaker) -> None:
    # Called from finally: a breaker error must not replace the job's own outcome.
    admission = half_open.admit()
    assert admission is not None
    dead = CircuitBreaker("tiny", threshold=1, reset_timeout=5.0, backend=RedisBreakerBackend(
        redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)))
    settle_breaker(dead, admission, "release")


@pytest.mark.slow
def test_probe_job_with_a_permanent_error_releases_the_probe_on_a_real_worker(
        workers: WorkerFactory, workdir: Path, redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"MUSICGEN_CIRCUIT_BREAKER__THRESHOLD": "1", "MUSICGEN_CIRCUIT_BREAKER__RESET_TIMEOUT": "1",
           "MUSICGEN_WORKER__MAX_RETRIES": "0", "MUSICGEN_WORKER__HARD_TIME_LIMIT": "600",
           "MUSICGEN_WORKER__SOFT_TIME_LIMIT": "590"}
    prod = producer(workdir, redis_url, monkeypatch, **env)
    breaker = prod.policies.breaker("tiny")
    assert breaker is not None
    breaker.reset()
    workers.start(faults=True, **env)
    breaker.record_failure()  # threshold 1: open, and half-open a second later
    wait_for(lambda: breaker.state().value == "half_open", 10, "half-open")
    bad = prod.enqueue(GenerationRequest(prompt="FAULT:permanent probe", duration=0.5))
    with pytest.raises(pipeline.JobFailed) as failed:
        bad.wait(120)
    assert failed.value.error_code == "invalid_request"
    status = breaker.status()
    assert status["state"] == "half_open" and status["probe_running"] is False, status
    good = prod.enqueue(GenerationRequest(prompt="the next probe", duration=0.5, format="wav"))
    assert good.wait(120).job_id == good.id  # not held up for probe_timeout (600 s)
    assert breaker.state().value == "closed"
