"""The circuit breaker: each test body runs against the memory backend and real Redis."""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from typing import Any

import pytest
import redis

from pipeline.errors import PipelineError, ServiceUnavailable
from pipeline.infra import keys
from pipeline.policies import (
    BreakerState,
    CircuitBreaker,
    MemoryBreakerBackend,
    RedisBreakerBackend,
)

NAME = "musicgen-small"
THRESHOLD, RESET = 3, 30.0


def make(b: Any, clock: Any, *, backend: Any = None, **kw: Any) -> CircuitBreaker:
    kw.setdefault("threshold", THRESHOLD)
    kw.setdefault("reset_timeout", RESET)
    return CircuitBreaker(NAME, backend=backend or b.backend, clock=clock, **kw)


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.threshold):
        breaker.record_failure()


def test_starts_closed(breaker_backend: Any, clock: Any) -> None:
    br = make(breaker_backend, clock)
    br.check()
    assert br.state() is BreakerState.CLOSED
    assert br.try_acquire() is True
    assert br.status() == {
        "breaker": NAME, "state": "closed", "failures": 0, "opened_at": None, "retry_after": 0.0,
        "threshold": THRESHOLD, "reset_timeout": RESET, "probe_timeout": RESET,
        "probe_running": False}


def test_threshold_consecutive_failures_open_it(breaker_backend: Any, clock: Any) -> None:
    br = make(breaker_backend, clock)
    for _ in range(THRESHOLD - 1):
        br.record_failure()
    assert br.state() is BreakerState.CLOSED
    assert br.try_acquire() is True
    br.record_failure()
    assert br.state() is BreakerState.OPEN
    assert br.try_acquire() is False
    assert br.status()["failures"] == THRESHOLD
    assert br.status()["opened_at"] == "2023-11-14T22:13:20.000+00:00"  # the fake clock's start


def test_a_success_in_between_resets_the_count(breaker_backend: Any, clock: Any) -> None:
    br = make(breaker_backend, clock)
    br.record_failure()
    br.record_failure()
    br.record_success()
    assert br.status()["failures"] == 0
    br.record_failure()
    br.record_failure()
    assert br.state() is BreakerState.CLOSED  # 4 failures, but never 3 in a row
    br.record_failure()
    assert br.state() is BreakerState.OPEN


def test_open_refuses_fast_with_retry_after(breaker_backend: Any, clock: Any) -> None:
    br = make(breaker_backend, clock)
    trip(br)
    clock.advance(10)
    with pytest.raises(ServiceUnavailable) as caught:
        br.check()
    err = caught.value
    assert err.code == "service_unavailable"
    assert err.details == {"breaker": NAME, "state": "open", "retry_after": 20.0,
                           "failures": THRESHOLD}
    assert "retry in 20.0 s (after 2023-11-14T22:13:50.000+00:00)" in err.message
    # the details survive the JSON that crosses the broker
    assert PipelineError.from_dict(err.to_dict()).details["retry_after"] == 20.0

    timings = []
    for _ in range(200):
        start = time.perf_counter()
        with pytest.raises(ServiceUnavailable):
            br.check()
        timings.append(time.perf_counter() - start)
    # A local decision, no waiting: loose enough for a loaded CI host (the figure is a benchmark's).
    assert statistics.median(timings) < 0.05, f"median check took {statistics.median(timings)}"


def test_half_open_after_reset_timeout_and_producer_accepts(breaker_backend: Any,
                                                            clock: Any) -> None:
    br = make(breaker_backend, clock)
    trip(br)
    clock.advance(RESET - 0.1)
    assert br.state() is BreakerState.OPEN
    clock.advance(0.2)
    assert br.state() is BreakerState.HALF_OPEN
    br.check()  # the producer accepts in HALF_OPEN, so a probe job can exist
    assert br.status()["retry_after"] == 0.0


def test_probe_success_closes(breaker_backend: Any, clock: Any) -> None:
    br = make(breaker_backend, clock)
    trip(br)
    clock.advance(RESET)
    assert br.try_acquire() is True  # this worker is the probe
    assert br.try_acquire() is False  # nobody else runs while it does
    assert br.status()["probe_running"] is True
    br.record_success()
    assert br.state() is BreakerState.CLOSED
    assert br.status()["failures"] == 0
    assert br.try_acquire() is True


def test_probe_failure_reopens_for_a_full_timeout(breaker_backend: Any, clock: Any) -> None:
    br = make(breaker_backend, clock)
    trip(br)
    clock.advance(RESET + 5)
    assert br.try_acquire() is True
    br.record_failure()
    assert br.state() is BreakerState.OPEN
    with pytest.raises(ServiceUnavailable) as caught:
        br.check()
    assert caught.value.details["retry_after"] == RESET
    clock.advance(RESET)
    assert br.try_acquire() is True  # the failed probe's claim went with the re-open


def test_probe_claim_expires(breaker_backend: Any, clock: Any) -> None:
    br = make(breaker_backend, clock, probe_timeout=5.0)
    other = make(breaker_backend, clock, backend=breaker_backend.another(), probe_timeout=5.0)
    trip(br)
    clock.advance(RESET)
    assert br.try_acquire() is True
    clock.advance(4.9)
    assert other.try_acquire() is False
    clock.advance(0.2)  # the probe worker died without reporting
    assert other.try_acquire() is True
    assert br.try_acquire() is False


def test_released_probe_lets_the_next_job_probe_at_once(breaker_backend: Any, clock: Any) -> None:
    # A probe job that ends without a verdict (bad input, cancel, deferral) gives its claim back;
    # without release_probe every worker waited probe_timeout (up to the hard time limit).
    br = make(breaker_backend, clock, probe_timeout=600.0)
    other = make(breaker_backend, clock, backend=breaker_backend.another(), probe_timeout=600.0)
    trip(br)
    clock.advance(RESET)
    probe = br.admit()
    assert probe is not None and probe.is_probe
    assert other.admit() is None
    assert br.release_probe(probe) is True
    assert br.state() is BreakerState.HALF_OPEN  # no verdict: still half-open, not closed
    assert br.status()["probe_running"] is False and br.status()["failures"] == THRESHOLD
    clock.advance(0.5)  # a claim is known by its expiry; a later claim has a later one
    again = other.admit()
    assert again is not None and again.is_probe
    assert br.release_probe(probe) is False  # releasing twice takes nothing from the new probe
    assert br.admit() is None
    other.record_success()
    assert br.state() is BreakerState.CLOSED


def test_release_takes_only_its_own_claim(breaker_backend: Any, clock: Any) -> None:
    br = make(breaker_backend, clock, probe_timeout=5.0)
    other = make(breaker_backend, clock, backend=breaker_backend.another(), probe_timeout=5.0)
    trip(br)
    clock.advance(RESET)
    stale = br.admit()
    assert stale is not None and stale.is_probe
    clock.advance(5.1)  # the first claim expired and another worker took the probe
    fresh = other.admit()
    assert fresh is not None and fresh.is_probe
    assert br.release_probe(stale) is False
    assert br.status()["probe_running"] is True


def test_a_closed_admission_is_not_a_probe(breaker_backend: Any, clock: Any) -> None:
    br = make(breaker_backend, clock)
    admission = br.admit()
    assert admission is not None and not admission.is_probe
    assert br.release_probe(admission) is False
    assert br.status()["state"] == "closed"


def test_late_outcomes_while_open_do_not_move_the_timeout(breaker_backend: Any,
                                                          clock: Any) -> None:
    br = make(breaker_backend, clock)
    trip(br)
    clock.advance(10)
    br.record_success()  # a job started before the trip is not a probe
    br.record_failure()  # nor does a late failure push the reset further away
    assert br.state() is BreakerState.OPEN
    assert br.status()["retry_after"] == 20.0
    assert br.status()["failures"] == THRESHOLD + 1


def test_reset(breaker_backend: Any, clock: Any) -> None:
    br = make(breaker_backend, clock)
    trip(br)
    clock.advance(RESET)
    assert br.try_acquire() is True
    br.reset()
    assert br.state() is BreakerState.CLOSED
    assert br.status()["failures"] == 0
    br.check()
    br.record_failure()
    assert br.state() is BreakerState.CLOSED  # the count really restarted


def test_two_breaker_objects_share_one_state(breaker_backend: Any, clock: Any) -> None:
    a = make(breaker_backend, clock)
    b = make(breaker_backend, clock, backend=breaker_backend.another())
    a.record_failure()
    a.record_failure()
    assert b.status()["failures"] == 2
    b.record_failure()  # consecutive across processes: a's two plus b's one
    assert a.state() is BreakerState.OPEN
    assert a.status() == b.status()
    b.reset()
    assert a.state() is BreakerState.CLOSED


def test_breakers_of_different_models_are_independent(breaker_backend: Any,
                                                      clock: Any) -> None:
    small = make(breaker_backend, clock)
    large = CircuitBreaker("musicgen-large", threshold=THRESHOLD, reset_timeout=RESET,
                           backend=breaker_backend.backend, clock=clock)
    trip(small)
    assert small.state() is BreakerState.OPEN
    assert large.state() is BreakerState.CLOSED


# --- exactly one probe among many concurrent claims -----------------------------------------

# A bound on waiting for the contenders, not a duration: eight spawned interpreters importing
# the package take over a minute to reach the barrier on a loaded two-core host.
START_BOUND = 240

def _claim_in_process(redis_url: str, prefix: str, now: float, barrier: Any,
                      results: Any) -> None:
    with redis.Redis.from_url(redis_url) as client:
        # The parent's fake clock, stopped where the breaker is half-open.
        br = CircuitBreaker(NAME, threshold=1, reset_timeout=RESET, probe_timeout=60,
                            backend=RedisBreakerBackend(client, prefix), clock=lambda: now)
        barrier.wait(timeout=START_BOUND)
        results.put(br.try_acquire())


def test_exactly_one_concurrent_claim_wins_the_probe(breaker_backend: Any, clock: Any) -> None:
    contenders = 8
    br = CircuitBreaker(NAME, threshold=1, reset_timeout=RESET, probe_timeout=60,
                        backend=breaker_backend.backend, clock=clock)
    br.record_failure()
    clock.advance(RESET)  # the reset timeout has passed, for every contender alike
    if breaker_backend.kind == "memory":  # one process: threads
        barrier = threading.Barrier(contenders + 1)
        wins: list[bool] = []

        def claim() -> None:
            barrier.wait(timeout=START_BOUND)
            wins.append(br.try_acquire())

        workers: list[Any] = [threading.Thread(target=claim) for _ in range(contenders)]
    else:  # separate OS processes, each with its own connection, as real workers are
        ctx = multiprocessing.get_context("spawn")
        barrier, results = ctx.Barrier(contenders + 1), ctx.Queue()
        workers = [ctx.Process(target=_claim_in_process,
                               args=(breaker_backend.redis_url, breaker_backend.prefix,
                                     clock(), barrier, results)) for _ in range(contenders)]
    for w in workers:
        w.start()
    assert br.state() is BreakerState.HALF_OPEN
    barrier.wait(timeout=START_BOUND)  # release them all at once
    for w in workers:
        w.join(timeout=60)
    if breaker_backend.kind == "redis":
        assert all(w.exitcode == 0 for w in workers)
        wins = [results.get(timeout=5) for _ in range(contenders)]
    assert len(wins) == contenders
    assert sum(wins) == 1


# --- Redis specifics ---------------------------------------------------------------------------

def test_redis_layout_is_one_hash_per_model(redis_client: redis.Redis, key_prefix: str,
                                            clock: Any) -> None:
    br = CircuitBreaker(NAME, threshold=1, reset_timeout=RESET, clock=clock,
                        backend=RedisBreakerBackend(redis_client, key_prefix))
    br.record_failure()
    key = keys.breaker_key(NAME, key_prefix)
    assert key == f"{key_prefix}{NAME}"
    assert redis_client.hgetall(key) == {b"failures": b"1", b"opened_at": b"1700000000.0"}
    br.reset()
    assert redis_client.exists(key) == 0  # closed with no failures leaves nothing behind


def test_redis_down_is_service_unavailable() -> None:
    dead = redis.Redis(port=1, socket_connect_timeout=0.5, retry_on_error=[])
    br = CircuitBreaker(NAME, threshold=1, reset_timeout=RESET,
                        backend=RedisBreakerBackend(dead, "test:unused:"))
    with pytest.raises(ServiceUnavailable) as caught:
        br.check()
    assert isinstance(caught.value.__cause__, redis.ConnectionError)
    dead.close()


def test_rejects_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="threshold"):
        CircuitBreaker(NAME, threshold=0, reset_timeout=1, backend=MemoryBreakerBackend())
    with pytest.raises(ValueError, match="reset_timeout"):
        CircuitBreaker(NAME, threshold=1, reset_timeout=0, backend=MemoryBreakerBackend())
