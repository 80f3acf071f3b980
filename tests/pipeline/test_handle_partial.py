"""``JobHandle.partial()`` (issue 11): the latest partial of a running long job, read from the
job's PROGRESS state in the real result backend (Redis), and None once the job has ended."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis

from pipeline.client.handle import JobHandle, Partial
from pipeline.client.registry import RedisJobRegistry
from pipeline.config import load_settings
from pipeline.infra.celery_app import make_celery


@pytest.fixture
def app_and_registry(redis_url: str, tmp_path: Path) -> tuple[object, RedisJobRegistry]:
    settings = load_settings("development", cwd=tmp_path,
                             overrides={"broker.url": redis_url, "model.preset": "tiny"})
    return make_celery(settings), RedisJobRegistry(redis.Redis.from_url(redis_url))


def test_partial_follows_the_progress_state_and_ends_with_the_job(
        app_and_registry: tuple[object, RedisJobRegistry]) -> None:
    app, registry = app_and_registry
    job_id = uuid.uuid4().hex
    handle = JobHandle(job_id, app, registry)  # type: ignore[arg-type]
    backend = app.backend  # type: ignore[attr-defined]
    backend.store_result(job_id, {"progress": 0.3, "message": "window 1 of 4"}, "PROGRESS")
    assert handle.partial() is None  # no window finished yet
    info = {"uri": "file:///out/j.partial.wav", "path": "/out/j.partial.wav", "seconds": 30.0,
            "window": 1, "windows": 4, "format": "wav", "published_at": 1.0}
    backend.store_result(job_id, {"progress": 0.4, "message": "window 2 of 4", "partial": info},
                         "PROGRESS")
    assert handle.partial() == Partial(uri="file:///out/j.partial.wav", path="/out/j.partial.wav",
                                       seconds=30.0, window=1, windows=4, format="wav")
    backend.store_result(job_id, {"progress": 0.5, "partial": {"uri": "x"}}, "PROGRESS")
    assert handle.partial() is None  # a malformed state is no partial
    backend.store_result(job_id, {"job_id": job_id}, "SUCCESS")
    assert handle.partial() is None  # ended: the result is the only file that counts
    backend.forget(job_id)
