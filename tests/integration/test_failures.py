"""The failure promises, proved on real worker processes with the tiny model, on both brokers:
Redis, and RabbitMQ (a vhost of the session's own, results on Redis): every case runs twice.

Faults are injected at the model boundary of a real worker (tests/integration/faults.py) by
markers in the prompt; Celery, the broker and the pipeline's own policies do the rest. Each case
logs its time to recovery (``record_recovery``). On RabbitMQ nothing shortens a timeout: a dead
worker's jobs come back when its connection goes, with production settings.
"""

from __future__ import annotations

import re
import signal
import time
import uuid
from collections.abc import Callable
from itertools import combinations, pairwise
from pathlib import Path

import pytest
import redis

import pipeline
from pipeline import GenerationRequest, JobStatus
from pipeline.contract.jobs import queue_for
from pipeline.infra.celery_app import TASK_GENERATE
from pipeline.policies.configured import Policies

from .conftest import (
    WorkerFactory,
    base_env,
    held,
    on_rabbitmq,
    record_recovery,
    release,
    settled_ledger,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
Record = Callable[[str, object], None]  # pytest's record_property


@pytest.fixture
def workers(broker_workers: WorkerFactory) -> WorkerFactory:
    """Here every case's workers are on the broker under test (``broker_url``: both)."""
    return broker_workers


def producer(workdir: Path, broker: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> pipeline.Producer:
    for key, value in base_env(workdir, broker, **env).items():
        if key.startswith("MUSICGEN_"):
            monkeypatch.setenv(key, value)
    return pipeline.Producer(pipeline.load_settings(cwd=workdir))


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def attempts(factory: WorkerFactory, marker: str) -> list[float]:
    log = factory.tmp / "attempts.log"
    if not log.exists():
        return []
    return [float(line.split()[0]) for line in log.read_text().splitlines() if marker in line]


def admissions(factory: WorkerFactory, marker: str) -> list[tuple[float, float]]:
    """The rate limiter's grants as ``(before, after)``: its stamp lies between the two."""
    log = factory.tmp / "attempts.log"
    lines = log.read_text().splitlines() if log.exists() else []
    return [(float(line.split()[-1]), float(line.split()[0])) for line in lines if marker in line]


def outputs(workdir: Path, job_id: str) -> list[Path]:
    return sorted((workdir / "outputs").glob(f"{job_id}*"))


# Short limits so the promises can be watched in seconds, not hours.
# Fixed limits (not scaled with the duration), so a 30 s visibility timeout covers every job.
FAST = {"MUSICGEN_WORKER__SOFT_TIME_LIMIT": "20", "MUSICGEN_WORKER__HARD_TIME_LIMIT": "25",
        "MUSICGEN_WORKER__TIME_LIMIT_PER_SECOND": "0", "MUSICGEN_BROKER__VISIBILITY_TIMEOUT": "30"}


def fast(broker: str) -> dict[str, str]:
    """FAST for ``broker``: RabbitMQ keeps the production visibility timeout (it has none to
    shorten: a dead consumer's messages are requeued when its connection drops)."""
    if on_rabbitmq(broker):
        return {k: v for k, v in FAST.items() if k != "MUSICGEN_BROKER__VISIBILITY_TIMEOUT"}
    return FAST


def test_kill_9_mid_job_redelivers_to_another_worker(workers: WorkerFactory, workdir: Path, broker_url: str,
                                                     redis_url: str, monkeypatch: pytest.MonkeyPatch,
                                                     record_property: Record) -> None:
    env = fast(broker_url)
    prod = producer(workdir, broker_url, monkeypatch, **env)
    first = workers.start(faults=True, **env)
    handle = prod.enqueue(GenerationRequest(prompt="FAULT:hold=dead-node survive a dead node", duration=1.0,
                                            format="wav"))
    wait_for(lambda: held(workers.tmp, "dead-node"), 120, "the job to reach the model")
    first.kill9()
    killed = time.monotonic()
    assert handle.status() in (JobStatus.progress, JobStatus.started)  # not lost, not failed
    release(workers.tmp, "dead-node")  # the next attempt runs straight through
    if on_rabbitmq(broker_url):  # requeued by RabbitMQ the moment the connection dropped
        wait_for(lambda: prod.app.queue_depth(queue_for("tiny")) == 1, 30, "the job to be requeued")
    # On Redis the new worker restores unacked messages older than the visibility timeout.
    workers.start(faults=True, **env)
    result = handle.wait(180)
    record_recovery(record_property, "kill -9 to done, the next worker started after it", killed)
    assert result.job_id == handle.id
    assert [p.name for p in outputs(workdir, handle.id)] == [f"{handle.id}.wav", f"{handle.id}.wav.json"]
    deliveries = redis.Redis.from_url(redis_url).get(f"musicgen:deliveries:{handle.id}")
    assert int(deliveries) == 2
    row = settled_ledger(prod.quota, [handle.id])[handle.id]  # one row per job: charged once
    assert row["status"] == "succeeded" and row["attempts"] == 2


def test_soft_and_hard_time_limits_fail_with_timeout_and_worker_keeps_serving(
        workers: WorkerFactory, workdir: Path, broker_url: str, monkeypatch: pytest.MonkeyPatch,
        record_property: Record) -> None:
    limits = {"MUSICGEN_WORKER__SOFT_TIME_LIMIT": "4", "MUSICGEN_WORKER__HARD_TIME_LIMIT": "8",
              "MUSICGEN_WORKER__TIME_LIMIT_PER_SECOND": "0",
              "MUSICGEN_BROKER__VISIBILITY_TIMEOUT": "60", "MUSICGEN_WORKER__MAX_RETRIES": "0"}
    prod = producer(workdir, broker_url, monkeypatch, **limits)
    worker = workers.start(faults=True, **limits)
    hang = prod.enqueue(GenerationRequest(prompt="FAULT:hang", duration=1.0))
    stubborn = prod.enqueue(GenerationRequest(prompt="FAULT:ignore-soft", duration=1.0))
    for handle in (hang, stubborn):
        with pytest.raises(pipeline.JobFailed) as failed:
            handle.wait(120)
        assert failed.value.error_code == "timeout", failed.value
    # The job failed at its soft limit; the call it left hung ends its process at the hard limit
    # (8 s after the call began) and the pool replaces the child. The call is an engine step
    # with model.engine = static (the default), a generate call with hf.
    wait_for(lambda: re.search(r"hard time limit \(8 s\) passed by (an engine step|a generate call)",
                               worker.log_text()) is not None, 120,
             "the watchdog to end the process of the hung call")
    ended = time.monotonic()
    after = prod.enqueue(GenerationRequest(prompt="still serving", duration=0.5, format="wav"))
    assert after.wait(120).job_id == after.id
    record_recovery(record_property, "hard limit to next job done", ended)
    tmp = workdir / "tmp"
    assert not (tmp / hang.id).exists() and not (tmp / stubborn.id).exists()
    assert not outputs(workdir, hang.id) and not outputs(workdir, stubborn.id)


def test_poison_job_stops_at_the_redelivery_cap_and_the_queue_flows(
        workers: WorkerFactory, workdir: Path, broker_url: str, monkeypatch: pytest.MonkeyPatch,
        record_property: Record) -> None:
    env = {"MUSICGEN_WORKER__REDELIVERY_CAP": "2"}
    prod = producer(workdir, broker_url, monkeypatch, **env)
    workers.start(faults=True, **env)
    poison = prod.enqueue(GenerationRequest(prompt="FAULT:crash", duration=0.5))
    healthy = prod.enqueue(GenerationRequest(prompt="healthy after poison", duration=0.5, format="wav"))
    queued = time.monotonic()
    with pytest.raises(pipeline.JobFailed) as failed:
        poison.wait(240)
    assert failed.value.error_code == "poison_job"
    assert "redelivery_cap=2" in failed.value.details["error_message"]
    # Two deliveries ran (and killed their worker process); the third was refused unrun.
    assert len(attempts(workers, "FAULT:crash")) == 2
    assert failed.value.details["error_message"].startswith("job was delivered 3 times")
    assert healthy.wait(120).job_id == healthy.id
    record_recovery(record_property, "poison queued to the next job done", queued)


def test_transient_fault_retries_with_backoff_and_permanent_error_is_tried_once(
        workers: WorkerFactory, workdir: Path, broker_url: str, monkeypatch: pytest.MonkeyPatch,
        record_property: Record) -> None:
    env = {"MUSICGEN_WORKER__RETRY_BACKOFF": "1.0", "MUSICGEN_WORKER__RETRY_JITTER": "false",
           "MUSICGEN_WORKER__MAX_RETRIES": "3", "MUSICGEN_CIRCUIT_BREAKER__ENABLED": "false"}
    prod = producer(workdir, broker_url, monkeypatch, **env)
    workers.start(faults=True, **env)
    flaky = prod.enqueue(GenerationRequest(prompt="FAULT:oom-twice", duration=0.5, format="wav"))
    assert flaky.wait(120).job_id == flaky.id
    first_try = time.monotonic() - (time.time() - attempts(workers, "FAULT:oom-twice")[0])
    record_recovery(record_property, "first attempt to done after two retries", first_try)
    times = attempts(workers, "FAULT:oom-twice")
    assert len(times) == 3
    gaps = [b - a for a, b in pairwise(times)]
    assert gaps[0] >= 1.0 and gaps[1] >= 2.0, gaps  # exponential: 1 s, then 2 s

    # A permanent error (bad input found by the worker) fails at once: one attempt, no retry.
    permanent = prod.enqueue(GenerationRequest(prompt="FAULT:permanent", duration=0.5))
    with pytest.raises(pipeline.JobFailed) as failed:
        permanent.wait(120)
    assert failed.value.error_code == "invalid_request"
    assert len(attempts(workers, "FAULT:permanent")) == 1


def test_breaker_opens_refuses_fast_probes_and_closes_across_two_workers(
        workers: WorkerFactory, workdir: Path, broker_url: str, redis_url: str,
        monkeypatch: pytest.MonkeyPatch, record_property: Record) -> None:
    env = {"MUSICGEN_CIRCUIT_BREAKER__THRESHOLD": "3", "MUSICGEN_CIRCUIT_BREAKER__RESET_TIMEOUT": "4",
           "MUSICGEN_WORKER__MAX_RETRIES": "0"}
    prod = producer(workdir, broker_url, monkeypatch, **env)
    prod.policies.breaker("tiny").reset()
    workers.start(faults=True, **env)
    workers.start(faults=True, **env)
    failing = [prod.enqueue(GenerationRequest(prompt=f"FAULT:model-error {i}", duration=0.5)) for i in range(3)]
    for handle in failing:
        with pytest.raises(pipeline.JobFailed) as failed:
            handle.wait(120)
        assert failed.value.error_code == "model_runtime_error"
    seen_by = {log.read_text().count("model_runtime_error") for log in (w.log for w in workers.started)}
    assert sum(seen_by) >= 3
    # Both workers and this producer read one state from Redis.
    other = Policies(prod.settings, redis_client=redis.Redis.from_url(redis_url), redis_url=redis_url)
    assert other.breaker("tiny").state().value == "open"
    opened = time.monotonic()
    timings = []
    for _ in range(50):
        started = time.perf_counter()
        with pytest.raises(pipeline.ServiceUnavailable) as refused:
            prod.enqueue(GenerationRequest(prompt="refused", duration=0.5))
        timings.append(time.perf_counter() - started)
    timings.sort()
    # Refused at once: no wait for a worker or a timeout. The bound is loose on purpose (two
    # workers share this 2-core host); benchmarks/, not this test, measure how fast it is.
    assert timings[len(timings) // 2] < 0.25, timings
    assert 0 < refused.value.details["retry_after"] <= 4
    wait_for(lambda: other.breaker("tiny").state().value == "half_open", 10, "half-open")
    probe = prod.enqueue(GenerationRequest(prompt="probe", duration=0.5, format="wav"))
    assert probe.wait(120).job_id == probe.id
    assert other.breaker("tiny").state().value == "closed"
    record_recovery(record_property, "breaker open to closed", opened)


def test_global_rate_limit_holds_across_two_workers(workers: WorkerFactory, workdir: Path, broker_url: str,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    record_property: Record) -> None:
    env = {"MUSICGEN_RATE_LIMIT__ENABLED": "true", "MUSICGEN_RATE_LIMIT__RATE": "2 per 6 seconds"}
    prod = producer(workdir, broker_url, monkeypatch, **env)
    workers.start(faults=True, **env)
    workers.start(faults=True, **env)
    queued = time.monotonic()
    handles = [prod.enqueue(GenerationRequest(prompt=f"rate {i}", duration=0.5, format="wav")) for i in range(6)]
    for handle in handles:
        handle.wait(240)  # every job completes: over the limit means waiting, not failing
    record_recovery(record_property, "6 jobs over a 2 per 6 s limit, all done", queued)
    assert len(attempts(workers, "rate ")) == 6
    # Each grant as (earliest, latest) time the limiter could have stamped it: the window check
    # is made on the bounds, so a correct limiter cannot fail it by a few ms of logging delay.
    grants = admissions(workers, "ADMIT musicgen.tiny")
    assert len(grants) == 6
    for trio in combinations(grants, 3):
        longest_span = max(after for _, after in trio) - min(before for before, _ in trio)
        assert longest_span >= 6.0, grants  # no 6-second window granted more than 2 slots
    # 6 jobs at 2 per 6 s need at least two full windows
    assert max(after for _, after in grants) - min(before for before, _ in grants) >= 12.0, grants


def test_sigterm_finishes_the_running_job_and_starts_no_other(
        workers: WorkerFactory, workdir: Path, broker_url: str, monkeypatch: pytest.MonkeyPatch,
        record_property: Record) -> None:
    """The promise: after SIGTERM a worker lets its running job finish inside the grace period
    and starts no new job; the queued one stays queued (never lost) for the next worker."""
    env = {"MUSICGEN_WORKER__SHUTDOWN_GRACE": "20"}
    prod = producer(workdir, broker_url, monkeypatch, **env)
    worker = workers.start(faults=True, **env)
    running = prod.enqueue(GenerationRequest(prompt="FAULT:hold=running finish me", duration=0.5, format="wav"))
    wait_for(lambda: held(workers.tmp, "running"), 120, "the first job to be running")
    waiting = prod.enqueue(GenerationRequest(prompt="wait for the next worker", duration=0.5, format="wav"))
    assert waiting.status() is JobStatus.queued  # one slot, taken: it waits in the broker
    worker.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "Initiating Soft Shutdown" in worker.log_text(), 60, "the shutdown to begin")
    release(workers.tmp, "running")  # the running job ends now, inside the grace period
    assert worker.proc.wait(90) == 0  # (a second SIGTERM would cancel the running job)
    assert running.wait(5).job_id == running.id
    assert waiting.status() is JobStatus.queued  # not started by the stopping worker
    assert not attempts(workers, "wait for the next worker")
    stopped = time.monotonic()
    workers.start(faults=True, **env)
    assert waiting.wait(120).job_id == waiting.id  # not lost: the next worker ran it
    record_recovery(record_property, "stop to the queued job done on the next worker", stopped)
    assert len(attempts(workers, "wait for the next worker")) == 1
    assert len(attempts(workers, "FAULT:hold=running")) == 1  # and the finished job was not rerun
    rows = settled_ledger(prod.quota, [running.id, waiting.id])
    assert rows[running.id]["status"] == rows[waiting.id]["status"] == "succeeded"


def test_sigterm_past_the_grace_period_requeues_the_running_job(
        workers: WorkerFactory, workdir: Path, broker_url: str, monkeypatch: pytest.MonkeyPatch,
        record_property: Record) -> None:
    env = {"MUSICGEN_WORKER__SHUTDOWN_GRACE": "2", **fast(broker_url)}
    prod = producer(workdir, broker_url, monkeypatch, **env)
    worker = workers.start(faults=True, **env)
    slow = prod.enqueue(GenerationRequest(prompt="FAULT:slow-first finish later", duration=0.5, format="wav"))
    wait_for(lambda: bool(attempts(workers, "FAULT:slow-first")), 120, "the job to reach the model")
    worker.stop(signal.SIGTERM, timeout=60)  # grace 2 s: far shorter than the job
    assert slow.status() is not JobStatus.succeeded
    stopped = time.monotonic()
    log = worker.log_text()  # requeued by the shutdown itself, not by a visibility timeout later
    assert "Initiating Soft Shutdown, terminating in 2.0 seconds" in log
    if on_rabbitmq(broker_url):  # RabbitMQ requeues what the closed channel held, at once
        assert prod.app.queue_depth(queue_for("tiny")) == 1
    else:  # kombu's Redis transport puts the unacked message back itself, and says so
        assert "Restoring 1 unacknowledged message(s)" in log
    workers.start(faults=True, **env)
    assert slow.wait(180).job_id == slow.id  # requeued, then finished by the next worker
    record_recovery(record_property, "stop to the requeued job done", stopped)
    assert len(attempts(workers, "FAULT:slow-first")) == 2
    assert [p.name for p in outputs(workdir, slow.id)] == [f"{slow.id}.wav", f"{slow.id}.wav.json"]


def test_a_late_delivery_of_a_finished_job_is_dropped_before_it_takes_a_rate_limit_slot(
        workers: WorkerFactory, workdir: Path, broker_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A redelivery of a finished job (a node thought dead finished it after fast recovery
    re-published it) makes nothing twice and takes no slot from the jobs that wait: with one slot
    per ten minutes, had it asked the limiter it would be deferred instead of dropped."""
    # A window of its own (the limiter keys on the rate): each broker's run starts with its slot free.
    window = 600 + uuid.uuid4().int % 10**6
    env = {"MUSICGEN_RATE_LIMIT__ENABLED": "true", "MUSICGEN_RATE_LIMIT__RATE": f"1 per {window} seconds"}
    prod = producer(workdir, broker_url, monkeypatch, **env)
    worker = workers.start(faults=True, **env)
    publish, sent = prod.app.send_task, []
    monkeypatch.setattr(prod.app, "send_task", lambda *a, **kw: sent.append(kw) or publish(*a, **kw))
    handle = prod.enqueue(GenerationRequest(prompt="finished once", duration=0.5, format="wav"))
    handle.wait(120)
    assert prod.app.AsyncResult(handle.id).state == "SUCCESS"
    # The same message again, as a recovery would re-publish it.
    publish(TASK_GENERATE, args=sent[0]["args"], task_id=handle.id, queue=sent[0]["queue"])
    wait_for(lambda: f"job {handle.id} already ended; dropping this delivery" in worker.log_text(),
             120, "the duplicate to be dropped")
    assert len(admissions(workers, "ADMIT musicgen.tiny")) == 1
    assert [p.name for p in outputs(workdir, handle.id)] == [f"{handle.id}.wav", f"{handle.id}.wav.json"]
    rows = [r for r in prod.quota.ledger() if r["job_id"] == handle.id]
    assert len(rows) == 1 and rows[0]["attempts"] == 1
