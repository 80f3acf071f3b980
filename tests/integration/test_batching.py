"""The batching worker through the real queue: real Redis, real `worker --pool threads` processes,
the tiny model and real ffmpeg.

Batches are made states, not races: jobs are queued before the worker starts (it reserves them
all at once) and the batch wait is far longer than any test, so a batch runs because it is full;
holds (``FAULT:hold=NAME``, tests/integration/faults.py) keep a batch at the model boundary while
a test kills its worker or counts what the broker still holds.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
import soundfile

import pipeline
from pipeline import GenerationRequest, JobStatus
from pipeline.contract.jobs import queue_for
from pipeline.policies.backpressure import queue_depth

from .conftest import WorkerFactory, held, on_rabbitmq, record_recovery, release, settled_ledger
from .test_failures import Record, attempts, fast, outputs, producer, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A batch runs when it is full; no test reaches this wait (the schema's upper bound). These tests
# are about the HF batcher (batch keys, waiting for company, OOM split, faults injected at HF
# generate), so they pin it whatever model.engine defaults to; the continuous loop has its own
# (tests/integration/test_continuous_batching.py).
BATCHING = {"MUSICGEN_GENERATION__MAX_BATCH_SIZE": "4", "MUSICGEN_GENERATION__BATCH_WAIT_MS": "60000",
            "MUSICGEN_MODEL__ENGINE": "hf"}


def test_queued_jobs_share_one_batch_and_each_gets_its_own_file(
        workers: WorkerFactory, workdir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prod = producer(workdir, redis_url, monkeypatch, **BATCHING)
    # Different prompts, seeds, sampling and durations (0.5 s and 0.6 s share a duration bucket).
    requests = [GenerationRequest(prompt="soft piano", duration=0.5, seed=1, format="wav"),
                GenerationRequest(prompt="loud drums and bass", duration=0.6, seed=2, temperature=1.2,
                                  format="flac"),
                GenerationRequest(prompt="strings", duration=0.5, seed=3, top_k=50, format="mp3"),
                GenerationRequest(prompt="a choir", duration=0.6, seed=4, top_p=0.9, format="wav")]
    handles = [prod.enqueue(r) for r in requests]
    workers.start(pool="threads", **BATCHING)
    results = [h.wait(180) for h in handles]
    assert [r.batch_size for r in results] == [4, 4, 4, 4]
    assert [r.seed for r in results] == [1, 2, 3, 4]
    assert [Path(r.output_path).suffix for r in results] == [".wav", ".flac", ".mp3", ".wav"]
    for result, request in zip(results, requests, strict=True):
        assert result.duration == pytest.approx(request.duration, abs=0.03)
        sidecar = json.loads(Path(result.sidecar_path).read_text())
        assert sidecar["result"]["batch_size"] == 4 and sidecar["request"]["prompt"] == request.prompt
    # The ledger charges each job once, with its share of the call's GPU time.
    rows = settled_ledger(prod.quota, [h.id for h in handles])
    for handle, result in zip(handles, results, strict=True):
        assert rows[handle.id]["status"] == "succeeded"
        assert rows[handle.id]["gpu_seconds"] == pytest.approx(result.timings.generate / 4)


def test_the_same_seeded_job_sounds_the_same_alone_and_in_a_batch(
        workers: WorkerFactory, workdir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prod = producer(workdir, redis_url, monkeypatch, **BATCHING)
    job = GenerationRequest(prompt="the same job", duration=0.5, seed=99, format="wav", normalization="none")
    crowd = [prod.enqueue(job)] + [prod.enqueue(GenerationRequest(prompt=f"neighbour {i}", duration=0.5,
                                                                  seed=i, format="wav")) for i in range(3)]
    worker = workers.start(pool="threads", **BATCHING)
    batched = crowd[0].wait(180)
    assert batched.batch_size == 4
    worker.stop()
    alone_env = {**BATCHING, "MUSICGEN_GENERATION__MAX_BATCH_SIZE": "1"}
    workers.start(pool="threads", **alone_env)
    alone = prod.enqueue(job).wait(180)
    assert alone.batch_size == 1
    # The batched decoder's float rounding (< 1e-6, see test_sampling) can move a sample across a
    # rounding edge of 16-bit audio: at most one step apart. One different token anywhere would
    # move samples by ~1e-2, hundreds of steps.
    alone_pcm, _ = soundfile.read(alone.output_path, dtype="int16")
    batched_pcm, _ = soundfile.read(batched.output_path, dtype="int16")
    assert alone_pcm.shape == batched_pcm.shape
    assert np.abs(alone_pcm.astype(np.int32) - batched_pcm.astype(np.int32)).max() <= 1


def test_kill_9_mid_batch_redelivers_every_job_and_each_finishes_once(
        broker_workers: WorkerFactory, workdir: Path, broker_url: str, monkeypatch: pytest.MonkeyPatch,
        record_property: Record) -> None:
    """On both brokers (``broker_url``): Redis and RabbitMQ."""
    workers = broker_workers
    env = {**fast(broker_url), **BATCHING, "MUSICGEN_GENERATION__MAX_BATCH_SIZE": "3"}
    prod = producer(workdir, broker_url, monkeypatch, **env)
    hold = f"batch-{uuid.uuid4().hex[:6]}"
    handles = [prod.enqueue(GenerationRequest(prompt=f"dead node {i} FAULT:hold={hold}", duration=0.5,
                                              format="wav")) for i in range(3)]
    first = workers.start(pool="threads", faults=True, **env)
    wait_for(lambda: held(workers.tmp, hold), 120, "the batch to reach the model")
    assert len(attempts(workers, "dead node")) == 3  # one call, all three jobs in it
    first.kill9()
    killed = time.monotonic()
    release(workers.tmp, hold)  # the next attempt runs straight through
    if on_rabbitmq(broker_url):  # all three requeued by RabbitMQ when the connection dropped
        wait_for(lambda: prod.app.queue_depth(queue_for("tiny")) == 3, 30, "the jobs to be requeued")
    workers.start(pool="threads", faults=True, **env)  # on Redis: restores the unacked messages
    for handle in handles:
        assert handle.wait(180).job_id == handle.id
        assert [p.name for p in outputs(workdir, handle.id)] == [f"{handle.id}.wav", f"{handle.id}.wav.json"]
        row = settled_ledger(prod.quota, [handle.id])[handle.id]  # one row per job: charged once
        assert row["status"] == "succeeded" and row["attempts"] == 2
    record_recovery(record_property, "kill -9 mid-batch to all done, the next worker started after it", killed)
    assert len(attempts(workers, "dead node")) == 6


def test_one_jobs_permanent_error_fails_that_job_only(
        workers: WorkerFactory, workdir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**BATCHING, "MUSICGEN_GENERATION__MAX_BATCH_SIZE": "3"}
    prod = producer(workdir, redis_url, monkeypatch, **env)
    bad = prod.enqueue(GenerationRequest(prompt="FAULT:unsupported", duration=0.5, format="wav"))
    good = [prod.enqueue(GenerationRequest(prompt=f"fine {i}", duration=0.5, format="wav")) for i in range(3)]
    workers.start(pool="threads", faults=True, **env)
    with pytest.raises(pipeline.JobFailed) as failed:
        bad.wait(180)
    assert failed.value.error_code == "unsupported_option"
    assert [h.wait(180).batch_size for h in good] == [3, 3, 3]  # the other three still made a batch
    assert len(attempts(workers, "FAULT:unsupported")) == 0  # it never reached the model


def test_out_of_memory_splits_the_batch_without_spending_retries(
        workers: WorkerFactory, workdir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prod = producer(workdir, redis_url, monkeypatch, **BATCHING)
    handles = [prod.enqueue(GenerationRequest(prompt=f"big {i} FAULT:oom-batch", duration=0.5, format="wav"))
               for i in range(4)]
    workers.start(pool="threads", faults=True, **BATCHING)
    results = [h.wait(180) for h in handles]
    assert [r.batch_size for r in results] == [1, 1, 1, 1]  # 4 -> 2 + 2 -> 1 + 1 + 1 + 1
    rows = {r["job_id"]: r for r in prod.quota.ledger()}
    assert [rows[h.id]["attempts"] for h in handles] == [1, 1, 1, 1]  # no Celery retry was used
    assert len(attempts(workers, "FAULT:oom-batch")) == 4 + 4 + 4  # calls of 4, 2+2, 1+1+1+1


def test_cancel_of_one_job_in_a_batch_leaves_its_neighbours_going(
        broker_workers: WorkerFactory, workdir: Path, broker_url: str, monkeypatch: pytest.MonkeyPatch,
        record_property: Record) -> None:
    """On both brokers (``broker_url``): Redis and RabbitMQ."""
    workers = broker_workers
    env = {**BATCHING, "MUSICGEN_GENERATION__MAX_BATCH_SIZE": "2"}
    prod = producer(workdir, broker_url, monkeypatch, **env)
    hold = f"cancel-{uuid.uuid4().hex[:6]}"
    doomed = prod.enqueue(GenerationRequest(prompt=f"doomed FAULT:hold-progress={hold}", duration=1.0,
                                            format="wav"))
    neighbour = prod.enqueue(GenerationRequest(prompt="neighbour", duration=1.0, format="wav"))
    workers.start(pool="threads", faults=True, **env)
    wait_for(lambda: held(workers.tmp, hold), 120, "the batch to be generating")
    assert doomed.cancel() is True
    cancelled = time.monotonic()
    # The doomed job's task thread sees its flag while the batch is still held: it ends first.
    with pytest.raises(pipeline.JobCancelled):
        doomed.wait(120)
    record_recovery(record_property, "cancel to the job ended", cancelled)
    assert neighbour.status() in (JobStatus.started, JobStatus.progress)
    release(workers.tmp, hold)
    result = neighbour.wait(120)
    assert result.batch_size == 2
    assert not outputs(workdir, doomed.id)


def test_a_job_past_its_soft_limit_times_out_and_the_worker_serves_on(
        workers: WorkerFactory, workdir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**BATCHING, "MUSICGEN_GENERATION__MAX_BATCH_SIZE": "2", "MUSICGEN_WORKER__SOFT_TIME_LIMIT": "4",
           "MUSICGEN_WORKER__HARD_TIME_LIMIT": "600", "MUSICGEN_WORKER__MAX_RETRIES": "0",
           "MUSICGEN_CIRCUIT_BREAKER__ENABLED": "false"}
    prod = producer(workdir, redis_url, monkeypatch, **env)
    hangs = [prod.enqueue(GenerationRequest(prompt=f"FAULT:hang {i}", duration=0.5, format="wav"))
             for i in range(2)]
    workers.start(pool="threads", faults=True, **env)
    for handle in hangs:
        with pytest.raises(pipeline.JobFailed) as failed:
            handle.wait(120)
        assert failed.value.error_code == "timeout"
    # Both jobs gone, the hanging call was abandoned at its next step: the loop is free again.
    after = [prod.enqueue(GenerationRequest(prompt=f"after {i}", duration=0.5, format="wav")) for i in range(2)]
    assert [h.wait(120).batch_size for h in after] == [2, 2]
    for handle in hangs:
        assert not outputs(workdir, handle.id)


def test_a_worker_holds_one_batch_beyond_the_one_it_runs_so_a_second_node_gets_work(
        workers: WorkerFactory, workdir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**BATCHING, "MUSICGEN_GENERATION__MAX_BATCH_SIZE": "2"}
    prod = producer(workdir, redis_url, monkeypatch, **env)
    hold = f"fair-{uuid.uuid4().hex[:6]}"
    handles = [prod.enqueue(GenerationRequest(prompt=f"fair {i} FAULT:hold={hold}", duration=0.5,
                                              format="wav")) for i in range(10)]
    client = redis.Redis.from_url(redis_url)

    def waiting_in_broker() -> int:
        return queue_depth(client, queue_for("tiny"))

    first = workers.start(pool="threads", faults=True, **env)
    wait_for(lambda: held(workers.tmp, hold), 120, "the first node's batch to reach the model")
    # 2 generating + 2 waiting for the next batch = 2 x max_batch_size unacked; the rest stay
    # in the broker for other nodes.
    wait_for(lambda: waiting_in_broker() == 6, 60, "the first node to reserve its 4 jobs")
    second = workers.start(pool="threads", faults=True, **env)
    wait_for(lambda: waiting_in_broker() == 2, 120, "the second node to reserve its 4 jobs")
    release(workers.tmp, hold)
    results = [h.wait(240) for h in handles]
    by_worker = {w.name: sum(1 for r in results if r.worker == w.name) for w in (first, second)}
    assert all(count > 0 for count in by_worker.values()), by_worker
