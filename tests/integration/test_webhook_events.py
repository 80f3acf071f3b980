"""The events a job asks for with ``webhook_events_filter``, end to end: a real worker process
runs a long job (two windows of the tiny model) and a real local receiver gets, signed,
``job.started``, ``job.progress``, ``job.partial`` and the end, each with its own message id and
delivery record, every body the public view (no server path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pipeline
from pipeline import GenerationRequest
from pipeline.webhooks import verify
from tests.integration.conftest import WorkerFactory, base_env, wait_for
from tests.webhook_receiver import receiver

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(420)]

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
PUBLIC_URL = "https://music.example.com"


def test_a_long_job_sends_the_events_it_asked_for(workers: WorkerFactory, workdir: Path,
                                                  redis_url: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    hooks = {"MUSICGEN_WEBHOOKS__ALLOWED_HOSTS": '["127.0.0.1"]',
             "MUSICGEN_WEBHOOKS__SECRET": SECRET, "MUSICGEN_WEBHOOKS__PROGRESS_INTERVAL_S": "1",
             "MUSICGEN_API__PUBLIC_URL": PUBLIC_URL}
    # Several slots (threads pool): the delivery tasks run beside the job.
    workers.start(pool="threads", **hooks)
    for key, value in base_env(workdir, redis_url, **hooks).items():
        if key.startswith("MUSICGEN_"):
            monkeypatch.setenv(key, value)
    producer = pipeline.Producer(pipeline.load_settings(cwd=workdir))
    with receiver() as hook:
        handle = producer.enqueue(GenerationRequest(
            prompt="a long one", duration=40.0, format="wav", normalization="none", seed=3,
            webhook_url=hook.url,
            webhook_events_filter=["start", "progress", "partial", "completed"]))
        handle.wait(300)
        wait_for(lambda: any(b'"job.succeeded"' in r.body for r in hook.received), 60,
                 "the job's end to be delivered")
        received = list(hook.received)
    events = {r.headers["webhook-id"]: verify(r.body, r.headers, SECRET) for r in received}
    assert len(events) == len(received)  # each event its own message id, each sent once
    types = [e["type"] for e in events.values()]
    assert types.count("job.started") == 1 and types.count("job.succeeded") == 1
    assert types.count("job.progress") >= 1
    [partial] = [e["data"] for e in events.values() if e["type"] == "job.partial"]
    assert (partial["partial"]["window"], partial["partial"]["windows"]) == (1, 2)
    assert partial["partial_url"] == f"{PUBLIC_URL}/v1/jobs/{handle.id}/partial"
    [end] = [e["data"] for e in events.values() if e["type"] == "job.succeeded"]
    assert end["audio_url"] == f"{PUBLIC_URL}/v1/jobs/{handle.id}/audio"
    bodies = b"".join(r.body for r in received).decode()
    assert str(workdir) not in bodies and "file://" not in bodies
    assert all(json.loads(r.body)["data"]["job_id"] == handle.id for r in received)

    wait_for(lambda: all(d.status == "delivered" for d in handle.webhook_deliveries()), 60,
             "every delivery to be recorded")
    deliveries = handle.webhook_deliveries()
    assert {d.message_id for d in deliveries} == set(events)
    assert deliveries[0].event == "job.started" and deliveries[-1].event == "job.succeeded"
