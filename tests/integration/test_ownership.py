"""A job belongs to the user who enqueued it (issue 8.B): another user's enqueue with the same
client ``job_id`` is refused and changes nothing, and a lookup for a user never finds another
user's job. Real Redis, and the ledger on both quota databases."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

import pipeline
from pipeline import GenerationRequest, JobStatus
from pipeline.errors import JobIdConflict, JobNotFound

from .conftest import base_env

pytest_plugins = ["tests.pipeline.quota_conftest"]
pytestmark = pytest.mark.integration


def _request(user: str, job_id: str, prompt: str = "a job") -> GenerationRequest:
    # No worker serves this preset's queue in these tests: the job stays queued.
    return GenerationRequest(prompt=prompt, duration=1.0, user_id=user, model="musicgen-small",
                             job_id=job_id)


def test_another_users_job_id_is_refused_and_a_lookup_never_crosses_users(
        tmp_path: Path, redis_url: str, quota_db_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in base_env(tmp_path, redis_url, MUSICGEN_DATABASE__URL=quota_db_url).items():
        if key.startswith("MUSICGEN_"):
            monkeypatch.setenv(key, value)
    settings = pipeline.load_settings(cwd=tmp_path)
    prod = pipeline.Producer(settings)
    job_id = f"shared-{uuid.uuid4().hex[:12]}"
    alices = prod.enqueue(_request("alice", job_id))
    try:
        with pytest.raises(JobIdConflict) as taken:
            prod.enqueue(_request("bob", job_id, prompt="bob wants it"))
        assert (taken.value.code, taken.value.field) == ("job_id_conflict", "job_id")
        assert "alice" not in taken.value.message  # whose it is stays private
        # Nothing changed: alice's job, her ledger row, and no charge to bob.
        assert alices.status() is JobStatus.queued
        rows = [(r["job_id"], r["user_id"], r["status"]) for r in prod.quota.ledger()]
        assert rows == [(job_id, "alice", "reserved")]
        assert prod.quota.usage("bob").daily.used == 0
        # Its owner still gets idempotency: the same job, not a second one.
        assert prod.enqueue(_request("alice", job_id)).id == job_id
        assert len(prod.quota.ledger()) == 1
        # A lookup for bob finds nothing, exactly like an unknown id; alice's finds her job.
        for lookup in (lambda: prod.get_job(job_id, user_id="bob"),
                       lambda: pipeline.get_job(job_id, settings, user_id="bob")):
            with pytest.raises(JobNotFound):
                lookup()  # refused before the module's producer touches the database
        assert prod.get_job(job_id, user_id="alice").status() is JobStatus.queued
        assert prod.get_job(job_id).id == job_id  # without a user: the operator's view
        assert alices.cancel()
        assert prod.quota.ledger()[0]["status"] == "cancelled"
    finally:
        prod.quota.close()  # before the fixture drops the database
