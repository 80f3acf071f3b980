"""RabbitMQ goes away while jobs are queued and running, and comes back: no accepted job is lost,
each finishes once, and while it is down the producer says so clearly instead of hanging.

The broker is a PRIVATE node (tests/integration/rabbitmq.py: its own name, ports and data
folder), so stopping it touches nobody else; results stay on the session's Redis database.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pipeline
from pipeline import GenerationRequest
from pipeline.contract.jobs import queue_for

from .conftest import (
    RESULTS_FOR,
    WorkerFactory,
    base_env,
    held,
    record_recovery,
    release,
    settled_ledger,
    wait_for,
)
from .rabbitmq import PrivateRabbit
from .test_failures import Record

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Fixed short limits (not scaled with the duration); no visibility timeout: RabbitMQ has none.
LIMITS = {"MUSICGEN_WORKER__SOFT_TIME_LIMIT": "20", "MUSICGEN_WORKER__HARD_TIME_LIMIT": "25",
          "MUSICGEN_WORKER__TIME_LIMIT_PER_SECOND": "0"}


@pytest.fixture
def private_rabbit(redis_url: str) -> Iterator[PrivateRabbit]:
    node = PrivateRabbit()
    try:
        node.start()
        RESULTS_FOR[node.url] = redis_url
        yield node
    finally:
        RESULTS_FOR.pop(node.url, None)
        node.remove()


def test_no_accepted_job_is_lost_across_a_rabbitmq_restart(
        private_rabbit: PrivateRabbit, workers: WorkerFactory, workdir: Path,
        monkeypatch: pytest.MonkeyPatch, record_property: Record) -> None:
    for key, value in base_env(workdir, private_rabbit.url, **LIMITS).items():
        if key.startswith("MUSICGEN_"):
            monkeypatch.setenv(key, value)
    producer = pipeline.Producer(pipeline.load_settings(cwd=workdir))
    worker = workers.start(broker=private_rabbit.url, faults=True, **LIMITS)
    # The first job holds at the model until the broker is gone: "one running, the others queued"
    # is a state, not a race against a tiny job that can finish in a fifth of a second.
    accepted = [producer.enqueue(GenerationRequest(
        prompt=f"rabbit outage {i}" + (" FAULT:hold=rabbit-outage" if i == 0 else ""), duration=1.0,
        format="wav")) for i in range(4)]
    wait_for(lambda: held(workers.tmp, "rabbit-outage"), 120, "the first job to be running")

    private_rabbit.stop()  # one job running, the others queued or reserved
    stopped = time.monotonic()
    with pytest.raises(pipeline.ServiceUnavailable) as refused:
        producer.enqueue(GenerationRequest(prompt="while down", duration=1.0))
    assert time.monotonic() - stopped < 15  # a clear answer, not a hang
    assert "unreachable" in str(refused.value)
    wait_for(lambda: "Connection to broker lost" in worker.log_text(), 60, "the worker to see the outage")
    release(workers.tmp, "rabbit-outage")  # its copy may finish or be ended; either way it comes back

    private_rabbit.start()  # same data folder: durable queues and persistent messages come back
    restarted = time.monotonic()
    for handle in accepted:
        result = handle.wait(240)
        outputs = sorted((workdir / "outputs").glob(f"{handle.id}*"))
        assert [p.name for p in outputs] == [f"{handle.id}.wav", f"{handle.id}.wav.json"], result
    record_recovery(record_property, "broker back to every job done", restarted)
    # A job that finished while the broker was down could not ack: its message comes back too,
    # and the worker drops it once it reaches it. Wait for that, then check it ran nothing twice.
    wait_for(lambda: producer.app.queue_depth(queue_for("tiny")) == 0, 120,
             "the queue to drain, redelivered copies of finished jobs included")
    rows = settled_ledger(producer.quota, [h.id for h in accepted])
    assert len(rows) == 4 and {r["status"] for r in rows.values()} == {"succeeded"}  # each charged once
    for handle in accepted:
        assert len(list((workdir / "outputs").glob(f"{handle.id}*"))) == 2  # one file, one sidecar
    # And the producer works again on the same process, through a fresh connection.
    after = producer.enqueue(GenerationRequest(prompt="after the outage", duration=0.5, format="wav"))
    assert after.wait(120).job_id == after.id
