"""The id claim records its user, on both registries (Redis, and the folder of the embedded
broker): a claim answers who owns the id, so a producer can refuse another user (issue 8.B)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pipeline.client.registry import Claim, FileJobRegistry, JobRegistry, RedisJobRegistry
from pipeline.infra.keys import CLAIM_PREFIX


@pytest.fixture(params=["file", "redis"])
def registry(request: pytest.FixtureRequest, tmp_path: Path, redis_url: str) -> Iterator[JobRegistry]:
    if request.param == "file":
        yield FileJobRegistry(tmp_path / "registry")
        return
    client = redis.Redis.from_url(redis_url)
    client.ping()  # fail loudly if Redis is not running
    yield RedisJobRegistry(client)
    client.close()


def test_a_claim_answers_who_owns_the_id(registry: JobRegistry) -> None:
    job_id = f"claim-{uuid.uuid4().hex}"
    try:
        assert registry.owner(job_id) is None and not registry.exists(job_id)
        assert registry.claim(job_id, 60, "alice") == Claim(True, "alice")
        assert registry.claim(job_id, 60, "alice") == Claim(False, "alice")  # idempotent
        assert registry.claim(job_id, 60, "bob") == Claim(False, "alice")  # never handed over
        assert registry.owner(job_id) == "alice" and registry.exists(job_id)
        registry.release(job_id)
        assert registry.owner(job_id) is None
        assert registry.claim(job_id, 60, "bob") == Claim(True, "bob")  # free again once released
    finally:
        registry.release(job_id)


def test_the_file_registry_leaves_only_the_claim_behind(tmp_path: Path) -> None:
    registry = FileJobRegistry(tmp_path)
    registry.claim("job-1", 60, "alice")
    registry.claim("job-1", 60, "bob")
    expected = f"{CLAIM_PREFIX.strip(':').replace(':', '.')}.job-1"
    assert [p.name for p in tmp_path.iterdir()] == [expected]
