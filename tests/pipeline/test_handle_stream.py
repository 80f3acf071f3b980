"""``handle.stream()`` and its async form (issue 25), against real Redis: the chunks of a job's
stream from the first however late the reader starts, then the job's result; the job's error
when it fails; a retried job's next attempt from chunk 0; a job with no stream refused.

The worker's side is written here with the wire format's own builders (``chunk_fields``,
``end_fields``): the entries a worker writes are tested in tests/workers/generation."""

from __future__ import annotations

import array
import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio

from pipeline.aio import AsyncJobHandle
from pipeline.client.handle import JobHandle
from pipeline.client.registry import RedisJobRegistry
from pipeline.config import load_settings
from pipeline.contract.jobs import JobResult
from pipeline.contract.streams import AudioChunk, StreamEnd, chunk_fields, end_fields
from pipeline.errors import GpuOutOfMemory, InvalidRequest, JobFailed, JobTimeout
from pipeline.infra.celery_app import make_celery
from pipeline.infra.keys import stream_key

WAIT = 30.0  # a bound on waiting, not a measured duration


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def job(redis_url: str, tmp_path: Path, client: redis.Redis) -> Iterator[JobHandle]:
    settings = load_settings("development", cwd=tmp_path,
                             overrides={"broker.url": redis_url, "model.preset": "tiny"})
    app = make_celery(settings)
    job_id = f"stream-{uuid.uuid4().hex}"
    registry = RedisJobRegistry(client)
    registry.claim(job_id, 600, "test")
    yield JobHandle(job_id, app, registry)
    client.delete(stream_key(job_id))
    registry.release(job_id)
    app.backend.forget(job_id)


def _chunk(attempt: int, index: int, samples: int = 4) -> AudioChunk:
    values = array.array("f", [index + i / 10 for i in range(samples)])
    return AudioChunk(attempt=attempt, index=index, start_s=index * samples / 32000,
                      sample_rate=32000, channels=1, pcm=values.tobytes())


def _publish(client: redis.Redis, job_id: str, *items: AudioChunk | StreamEnd) -> None:
    for item in items:
        fields = chunk_fields(item) if isinstance(item, AudioChunk) else end_fields(item)
        client.xadd(stream_key(job_id), fields)  # type: ignore[arg-type]


def _result(job_id: str) -> dict[str, Any]:
    return JobResult(job_id=job_id, uri=f"file:///out/{job_id}.wav", format="wav", duration=1.0,
                     sample_rate=32000, channels=1, bit_depth=16, loudness_lufs=None,
                     peak_dbfs=None, model="tiny", seed=1, worker="w",
                     timings={}).model_dump(mode="json")  # type: ignore[arg-type]


def test_a_late_reader_gets_every_chunk_from_the_start_then_the_result(
        job: JobHandle, client: redis.Redis) -> None:
    chunks = [_chunk(1, i) for i in range(3)]
    _publish(client, job.id, *chunks, StreamEnd(1, True))
    job._app.backend.store_result(job.id, _result(job.id), "SUCCESS")
    items = list(job.stream(timeout=WAIT))
    assert items[:3] == chunks
    assert isinstance(items[3], JobResult) and items[3].job_id == job.id and len(items) == 4
    assert list(chunks[1].floats()) == pytest.approx([1.0, 1.1, 1.2, 1.3])
    assert chunks[1].to_numpy().shape == (1, 4) and chunks[1].duration_s == 4 / 32000


def test_a_reader_that_starts_first_gets_chunks_as_they_are_published(
        job: JobHandle, client: redis.Redis) -> None:
    got: list[tuple[float, Any]] = []

    def read() -> None:
        for item in job.stream(timeout=WAIT):
            got.append((time.monotonic(), item))

    reader = threading.Thread(target=read)
    reader.start()
    _publish(client, job.id, _chunk(1, 0))
    deadline = time.monotonic() + WAIT
    while not got and time.monotonic() < deadline:  # the first chunk before the job ends
        time.sleep(0.01)
    assert [item for _, item in got] == [_chunk(1, 0)]
    _publish(client, job.id, _chunk(1, 1), StreamEnd(1, True))
    job._app.backend.store_result(job.id, _result(job.id), "SUCCESS")
    reader.join(WAIT)
    assert [type(item).__name__ for _, item in got] == ["AudioChunk", "AudioChunk", "JobResult"]


def test_a_failed_job_raises_its_error_after_its_chunks(job: JobHandle,
                                                        client: redis.Redis) -> None:
    _publish(client, job.id, _chunk(1, 0), StreamEnd(1, False, "gpu_oom", "out of memory"))
    job._app.backend.store_result(job.id, GpuOutOfMemory("out of memory"), "FAILURE")
    stream = job.stream(timeout=WAIT)
    assert next(stream) == _chunk(1, 0)
    with pytest.raises(JobFailed) as failed:
        next(stream)
    assert failed.value.details["error_code"] == "gpu_oom"


def test_a_retried_job_streams_again_from_chunk_0_under_its_next_attempt(
        job: JobHandle, client: redis.Redis) -> None:
    _publish(client, job.id, _chunk(1, 0), StreamEnd(1, False, "gpu_oom", "out of memory"))
    job._app.backend.store_result(job.id, GpuOutOfMemory("out of memory"), "RETRY")
    items: list[Any] = []

    def read() -> None:
        items.extend(job.stream(timeout=WAIT))

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + WAIT
    while not items and time.monotonic() < deadline:
        time.sleep(0.01)
    client.delete(stream_key(job.id))  # as the worker does when an attempt starts
    _publish(client, job.id, _chunk(2, 0), _chunk(2, 1), StreamEnd(2, True))
    job._app.backend.store_result(job.id, _result(job.id), "SUCCESS")
    reader.join(WAIT)
    assert items[:3] == [_chunk(1, 0), _chunk(2, 0), _chunk(2, 1)]
    assert isinstance(items[3], JobResult)


def test_a_job_without_a_stream_is_refused_once_it_ends(job: JobHandle) -> None:
    job._app.backend.store_result(job.id, _result(job.id), "SUCCESS")
    with pytest.raises(InvalidRequest) as refused:
        list(job.stream(timeout=WAIT))
    assert refused.value.field == "stream"


def test_a_stream_that_does_not_end_in_time_raises_job_timeout(job: JobHandle,
                                                               client: redis.Redis) -> None:
    _publish(client, job.id, _chunk(1, 0))
    stream = job.stream(timeout=0.3)
    assert next(stream) == _chunk(1, 0)
    with pytest.raises(JobTimeout):
        next(stream)


def test_the_async_form_yields_the_same(job: JobHandle, client: redis.Redis,
                                        redis_url: str) -> None:
    chunks = [_chunk(1, i) for i in range(2)]
    _publish(client, job.id, *chunks, StreamEnd(1, True))
    job._app.backend.store_result(job.id, _result(job.id), "SUCCESS")

    async def read() -> list[Any]:
        aio = redis.asyncio.Redis.from_url(redis_url)
        try:
            return [item async for item in AsyncJobHandle(job, aio).stream(timeout=WAIT)]
        finally:
            await aio.aclose()

    items = asyncio.run(read())
    assert items[:2] == chunks and isinstance(items[2], JobResult) and len(items) == 3
