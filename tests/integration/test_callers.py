"""What a Python caller expects of the client (issue 23), against real Redis, a real ledger and,
where a job must run, one real worker with the tiny model shared by the module's tests:
idempotent job ids compared by request, all-or-nothing ``enqueue_many``, a Future-like handle
woken by the result backend's messages, job records and listing from the ledger after the
result backend has forgotten a job, and the asyncio client."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

import pipeline
import pipeline.aio
from pipeline import GenerationRequest, JobStatus
from pipeline.gateway.app import create_app
from pipeline.gateway.keystore import ApiKeyStore
from pipeline.infra.keys import queue_list_keys

from .conftest import Worker, held, release, settled_ledger, sse_events, wait_for
from .test_admission import producer

pytest_plugins = ["tests.pipeline.quota_conftest"]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

# No worker serves these presets, and no other module queues to them: their jobs stay queued
# here, and are removed after each test (test_admission counts musicgen-medium's depth).
IDLE = "musicgen-stereo-large"
BUSY = "musicgen-stereo-medium"


@pytest.fixture(autouse=True)
def _empty_idle_queues(redis_url: str) -> Iterator[None]:
    yield
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(*(key for preset in (IDLE, BUSY)
                        for key in queue_list_keys(f"musicgen.{preset}")))
    finally:
        client.close()


def uid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def expire(prod: pipeline.Producer, job_id: str) -> None:
    """What ``broker.result_expires`` does a day later: the state and the claim are gone."""
    prod.app.backend.forget(job_id)
    prod.registry.release(job_id)


def no_trace(prod: pipeline.Producer, job_id: str) -> bool:
    return (prod.registry.owner(job_id) is None
            and prod.app.AsyncResult(job_id).state == "PENDING"
            and all(r["job_id"] != job_id for r in prod.quota.ledger()))


# --- idempotency ------------------------------------------------------------------------------

def test_a_repeated_job_id_replays_the_same_request_and_refuses_another(
        tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prod = producer(tmp_path, redis_url, monkeypatch)
    job_id, user = uid("order"), uid("erin")
    ask = {"prompt": "brass fanfare", "duration": 1.0, "user_id": user, "model": IDLE,
           "job_id": job_id}
    first = prod.enqueue(GenerationRequest(**ask))
    assert first.replayed is False
    # The same request (an unset field equals one set to its None) is the same job, marked.
    again = prod.enqueue(GenerationRequest(**ask, seed=None))
    assert (again.id, again.replayed) == (job_id, True)
    with pytest.raises(pipeline.JobIdConflict) as conflict:
        prod.enqueue(GenerationRequest(**{**ask, "prompt": "brass fanfare, louder"}))
    assert conflict.value.code == "job_id_conflict"
    assert conflict.value.details == {"reason": "different_request"}
    assert [r["job_id"] for r in prod.quota.ledger(user_id=user)] == [job_id]  # charged once

    # A day later the claim is gone; the ledger still tells a replay from a conflict.
    expire(prod, job_id)
    assert prod.enqueue(GenerationRequest(**ask)).replayed is True
    assert prod.registry.owner(job_id) is None  # a replay found in the ledger claims nothing
    with pytest.raises(pipeline.JobIdConflict):
        prod.enqueue(GenerationRequest(**{**ask, "duration": 2.0}))
    assert prod.get_job(job_id, user_id=user).status() is JobStatus.queued


# --- enqueue_many -----------------------------------------------------------------------------

def test_enqueue_many_is_all_or_nothing(tmp_path: Path, redis_url: str,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    prod = producer(tmp_path, redis_url, monkeypatch, MUSICGEN_QUOTAS__DEFAULT_TIER="free")
    user = uid("fay")
    prod.quota.set_quota(user, tier="free", daily=2)
    ids = [uid("many") for _ in range(3)]
    idle_queue = f"musicgen.{IDLE}"
    waiting = prod.app.queue_depth(idle_queue)  # other tests' jobs share this Redis

    def batch(model: str = IDLE, n: int = 3) -> list[GenerationRequest]:
        return [GenerationRequest(prompt=f"take {i}", duration=1.0, user_id=user, model=model,
                                  job_id=ids[i]) for i in range(n)]

    with pytest.raises(pipeline.QuotaExceeded):  # the third does not fit: none is queued
        prod.enqueue_many(batch())
    assert all(no_trace(prod, job_id) for job_id in ids)
    assert prod.quota.usage(user).daily.used == 0
    assert prod.app.queue_depth(idle_queue) == waiting

    # Room for the list, and one more, but not for the list after that one.
    medium = BUSY
    limit = max(prod.app.queue_depth(f"musicgen.{p}") for p in (IDLE, medium)) + 3
    prod = producer(tmp_path, redis_url, monkeypatch, MUSICGEN_QUOTAS__DEFAULT_TIER="free",
                    MUSICGEN_MONITORING__BACKLOG_THRESHOLD=str(limit))
    prod.quota.set_quota(user, tier="free", daily=10)
    for i in range(limit - prod.app.queue_depth(f"musicgen.{medium}") - 2):
        prod.enqueue(GenerationRequest(prompt=f"ahead {i}", duration=1.0, user_id=user,
                                       model=medium))
    with pytest.raises(pipeline.Backpressure):  # the list's third would pass the threshold
        prod.enqueue_many(batch(medium))
    assert all(no_trace(prod, job_id) for job_id in ids)
    used = prod.quota.usage(user).daily.used

    handles = prod.enqueue_many(batch(n=2))
    assert [h.id for h in handles] == ids[:2]
    # A list holding a conflict changes nothing, not even its new third job.
    other = [GenerationRequest(prompt="take 0 again", duration=1.0, user_id=user, model=IDLE,
                               job_id=ids[0]),
             GenerationRequest(prompt="new", duration=1.0, user_id=user, model=IDLE,
                               job_id=ids[2])]
    with pytest.raises(pipeline.JobIdConflict):
        prod.enqueue_many(other)
    assert no_trace(prod, ids[2])
    replayed = prod.enqueue_many(batch())  # two replays and one new job
    assert [h.replayed for h in replayed] == [True, True, False]
    assert prod.quota.usage(user).daily.used == used + 3


# --- priority by tier ---------------------------------------------------------------------------

def test_a_priority_above_the_tier_maximum_is_clamped_or_refused(
        tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prod = producer(tmp_path, redis_url, monkeypatch, MUSICGEN_QUOTAS__DEFAULT_TIER="free")
    user = uid("ida")  # on the free tier: max_priority 5
    urgent = prod.enqueue(GenerationRequest(prompt="now", duration=1.0, user_id=user, model=IDLE,
                                            priority=9))
    calm = prod.enqueue(GenerationRequest(prompt="later", duration=1.0, user_id=user, model=IDLE,
                                          priority=5))
    assert (urgent.priority_clamped, calm.priority_clamped) == (True, False)
    assert urgent.record().request["priority"] == 5  # what was queued
    prod.quota.set_quota(user, tier="enterprise")
    assert prod.enqueue(GenerationRequest(prompt="now", duration=1.0, user_id=user, model=IDLE,
                                          priority=9)).priority_clamped is False

    strict = producer(tmp_path, redis_url, monkeypatch, MUSICGEN_QUOTAS__DEFAULT_TIER="free",
                      MUSICGEN_QUOTAS__PRIORITY_OVER_MAX="refuse")
    job_id = uid("too-urgent")
    with pytest.raises(pipeline.UnsupportedOption) as refused:
        strict.enqueue(GenerationRequest(prompt="now", duration=1.0, user_id=uid("jo"),
                                         model=IDLE, priority=6, job_id=job_id))
    assert refused.value.field == "priority"
    assert refused.value.details == {"max_priority": 5, "tier": "free"}
    assert no_trace(strict, job_id)


def test_an_async_wait_past_its_timeout_is_a_job_timeout(
        tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prod = producer(tmp_path, redis_url, monkeypatch)
    handle = prod.enqueue(GenerationRequest(prompt="queued", duration=1.0, model=IDLE,
                                            user_id=uid("una")))

    async def main() -> None:
        client = pipeline.aio.AsyncProducer(prod)
        try:
            await client.wrap(handle).wait(timeout=0.3)
        finally:
            await client.close()

    # A TimeoutError is an OSError: it must not read as the backend being unreachable.
    with pytest.raises(pipeline.JobTimeout):
        asyncio.run(main())
    assert handle.status() is JobStatus.queued


# --- the handle, with a real worker ---------------------------------------------------------------

@pytest.fixture(scope="module")
def prod(shared_worker: Worker, workdir: Path, redis_url: str) -> pipeline.Producer:
    monkeypatch = pytest.MonkeyPatch()
    try:
        return producer(workdir, redis_url, monkeypatch)
    finally:
        monkeypatch.undo()  # the settings are loaded: the environment is the test process's again


def test_the_handle_is_future_like_and_woken_by_state_changes(
        prod: pipeline.Producer, shared_worker: Worker) -> None:
    faults = Path(shared_worker.env["FAULTS_DIR"])
    name = uid("hold")
    handle = prod.enqueue(GenerationRequest(prompt=f"pulse FAULT:hold-progress={name}",
                                            duration=1.0, model="tiny", user_id="gus"))
    wait_for(lambda: held(faults, name), 60, "the job to report its first step")
    assert handle.done() is False and handle.result() is None
    with pytest.raises(TimeoutError) as late:  # JobTimeout is a TimeoutError
        handle.result(timeout=0.2)
    assert isinstance(late.value, pipeline.JobTimeout)
    seen: list[pipeline.Progress] = []
    release(faults, name)
    # A fallback read only every 60 s, and 30 s to finish: only the backend's messages can
    # wake this wait in time; each progress is reported once.
    result = handle.wait(timeout=30, poll=60, on_progress=seen.append)
    assert result.job_id == handle.id and handle.done()
    assert handle.result(timeout=1) == result
    assert seen and all(a != b for a, b in zip(seen, seen[1:], strict=False))


def test_a_job_is_found_and_listed_from_the_ledger_after_its_state_expires(
        prod: pipeline.Producer, shared_worker: Worker) -> None:
    user = uid("hana")
    since = datetime.now(UTC) - timedelta(seconds=1)
    ok = prod.enqueue(GenerationRequest(prompt="warm pad", duration=1.0, model="tiny",
                                        user_id=user, format="flac"))
    bad = prod.enqueue(GenerationRequest(prompt="FAULT:permanent", duration=1.0, model="tiny",
                                         user_id=user))
    result = ok.wait(timeout=60)
    with pytest.raises(pipeline.JobFailed):
        bad.wait(timeout=60)
    settled_ledger(prod.quota, [ok.id, bad.id])
    queued = prod.enqueue(GenerationRequest(prompt="later", duration=1.0, model=IDLE,
                                            user_id=user))
    for job_id in (ok.id, bad.id, queued.id):
        expire(prod, job_id)

    found = prod.get_job(ok.id, user_id=user)
    assert found.status() is JobStatus.succeeded and found.result() == result
    record = found.record()
    assert record.request is not None and record.request["prompt"] == "warm pad"
    assert record.request["output"]["format"] == "flac"
    assert record.created_at <= (record.started_at or record.created_at) <= record.finished_at
    failed = prod.get_job(bad.id, user_id=user)
    with pytest.raises(pipeline.JobFailed) as why:
        failed.result()
    assert failed.record().error == {"code": why.value.error_code,
                                     "message": why.value.details["error_message"]}
    with pytest.raises(pipeline.JobNotFound):  # still nobody else's
        prod.get_job(ok.id, user_id="someone-else")

    first = prod.list_jobs(user, limit=2, since=since)
    assert [j.job_id for j in first.jobs] == [queued.id, bad.id]  # newest first
    assert first.next_cursor is not None
    rest = prod.list_jobs(user, limit=2, since=since, cursor=first.next_cursor)
    assert [j.job_id for j in rest.jobs] == [ok.id] and rest.next_cursor is None
    assert [j.job_id for j in prod.list_jobs(user, status="failed").jobs] == [bad.id]
    assert prod.list_jobs(user, status=JobStatus.queued).jobs[0].status is JobStatus.queued
    with pytest.raises(pipeline.InvalidRequest):
        prod.list_jobs(user, cursor="not-a-cursor")


def test_the_asyncio_client_enqueues_waits_and_streams_progress(
        prod: pipeline.Producer, shared_worker: Worker) -> None:
    faults = Path(shared_worker.env["FAULTS_DIR"])
    name = uid("hold")

    async def main() -> tuple[list[pipeline.Progress], pipeline.JobResult, JobStatus]:
        client = pipeline.aio.AsyncProducer(prod)
        try:
            handle = await client.enqueue(GenerationRequest(
                prompt=f"pluck FAULT:hold-progress={name}", duration=1.0, model="tiny"))
            events: list[pipeline.Progress] = []
            async for progress in handle.events(timeout=60):
                events.append(progress)
                if len(events) == 1:  # the job waits at its first step until released here
                    await asyncio.to_thread(wait_for, lambda: held(faults, name), 60, "the hold")
                    release(faults, name)
            return events, await handle.wait(timeout=30), await handle.status()
        finally:
            await client.close()

    events, result, status = asyncio.run(main())
    assert status is JobStatus.succeeded and result.duration > 0
    assert events[-1] == pipeline.Progress(1.0, "done")
    assert all(a != b for a, b in zip(events, events[1:], strict=False))


def test_the_gateway_event_stream_is_woken_by_state_changes(
        prod: pipeline.Producer, shared_worker: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    """``GET /v1/jobs/{id}/events`` waits on the asyncio client: with its fallback read every
    60 s, only the result backend's messages can bring each change to the stream in time."""
    monkeypatch.setattr(pipeline.aio, "FALLBACK_S", 60.0)
    faults = Path(shared_worker.env["FAULTS_DIR"])
    name, user = uid("hold"), uid("ivy")
    auth = {"Authorization": f"Bearer {ApiKeyStore(prod.quota.engine).create(user).key}"}
    handle = prod.enqueue(GenerationRequest(prompt=f"drone FAULT:hold-progress={name}",
                                            duration=1.0, model="tiny", user_id=user))
    seen: list[tuple[str, dict[str, Any]]] = []
    released_at = None
    with TestClient(create_app(prod.settings, producer=prod)) as client, \
            client.stream("GET", f"/v1/jobs/{handle.id}/events", headers=auth) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for event, data in sse_events(stream.iter_lines()):
            seen.append((event, data))
            if released_at is None and event == "progress" and data["progress"]["fraction"] > 0:
                assert held(faults, name)  # the job waits at its first step until released
                release(faults, name)
                released_at = time.monotonic()
    assert released_at is not None, seen
    assert time.monotonic() - released_at < 30, "the stream waited for a fallback read"
    # Each event is a change of (status, fraction, message): queued and then "loading the
    # model" are both at 0.0, and a loaded machine's stream may see both.
    changes = [(data["status"], data["progress"]["fraction"], data["progress"]["message"])
               for event, data in seen if event == "progress"]
    fractions = [fraction for _, fraction, _ in changes]
    assert fractions == sorted(fractions), changes
    assert all(one != two for one, two in zip(changes, changes[1:], strict=False)), changes
    assert seen[-1][0] == "state" and seen[-1][1]["status"] == "succeeded", seen
    assert seen[-1][1]["audio_url"] == f"/v1/jobs/{handle.id}/audio"
