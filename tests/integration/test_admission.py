"""What the producer decides before a job is queued, against real Redis and a real ledger:
quota refusal and refund, backpressure, priorities, clear CLI errors instead of tracebacks, and
a refused job that leaves nothing behind which reads as a job (issue 8.5, 8.D, 8.6)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import pipeline
from pipeline import GenerationRequest, JobStatus
from pipeline.quota.configured import prepare_database

from .conftest import WorkerFactory, base_env

pytest_plugins = ["tests.pipeline.quota_conftest"]
pytestmark = pytest.mark.integration


def producer(workdir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, *,
             migrate: bool = True, **env: str) -> pipeline.Producer:
    for key, value in base_env(workdir, redis_url, **env).items():
        if key.startswith("MUSICGEN_"):
            monkeypatch.setenv(key, value)
    settings = pipeline.load_settings(cwd=workdir)
    if migrate:  # the operator's `db upgrade`: a producer never creates the database itself
        prepare_database(settings)
    return pipeline.Producer(settings)


def assert_no_trace(prod: pipeline.Producer, job_id: str) -> None:
    """Nothing reads as a job: no handle, no claim, no stored state; no quota held."""
    with pytest.raises(pipeline.JobNotFound):
        prod.get_job(job_id)
    assert prod.registry.owner(job_id) is None
    assert prod.app.AsyncResult(job_id).state == "PENDING"  # Celery's word for "no such id"


def test_quota_refuses_past_the_limit_and_a_cancelled_job_gives_its_slot_back(
        tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prod = producer(tmp_path, redis_url, monkeypatch, MUSICGEN_QUOTAS__DEFAULT_TIER="free",
                    MUSICGEN_DATABASE__URL=f"sqlite:///{tmp_path}/ledger.db",
                    MUSICGEN_BROKER__URL=redis_url)
    prod.quota.set_quota("carol", tier="free", daily=2)
    # No worker serves this preset's queue here: the jobs stay queued.
    first = prod.enqueue(GenerationRequest(prompt="one", duration=1.0, user_id="carol", model="musicgen-small"))
    again = prod.enqueue(GenerationRequest(prompt="one", duration=1.0, user_id="carol", model="musicgen-small",
                                           job_id="carol-fixed-id"))
    assert prod.enqueue(GenerationRequest(prompt="one", duration=1.0, user_id="carol", model="musicgen-small",
                                          job_id="carol-fixed-id")).id == again.id  # idempotent: not charged
    with pytest.raises(pipeline.QuotaExceeded) as refused:
        prod.enqueue(GenerationRequest(prompt="three", duration=1.0, user_id="carol", model="musicgen-small"))
    details = refused.value.details
    assert details["limit"] == "daily" and details["used"] == 2 and details["limit_value"] == 2
    assert "resets at" in refused.value.message
    assert first.cancel() and first.status() is JobStatus.cancelled
    assert prod.quota.usage("carol").daily.used == 1  # the cancelled job's slot came back
    assert prod.enqueue(GenerationRequest(prompt="three", duration=1.0, user_id="carol",
                                          model="musicgen-small")).status() is JobStatus.queued


def test_backpressure_refuses_when_the_queue_is_too_deep(tmp_path: Path, redis_url: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    prod = producer(tmp_path, redis_url, monkeypatch, MUSICGEN_MONITORING__BACKLOG_THRESHOLD="3",
                    MUSICGEN_DATABASE__URL=f"sqlite:///{tmp_path}/ledger.db")
    queued = [prod.enqueue(GenerationRequest(prompt=f"fill {i}", duration=1.0, model="musicgen-medium"))
              for i in range(3)]
    with pytest.raises(pipeline.Backpressure) as refused:
        prod.enqueue(GenerationRequest(prompt="one too many", duration=1.0, model="musicgen-medium"))
    assert refused.value.details == {"queue": "musicgen.musicgen-medium", "depth": 3, "threshold": 3}
    refused_id = [r["job_id"] for r in prod.quota.ledger() if r["status"] in ("reserved", "started")]
    assert sorted(refused_id) == sorted(h.id for h in queued)  # the refused job holds no quota
    for handle in queued:
        handle.cancel()


@pytest.mark.slow
def test_higher_priority_runs_first(workers: WorkerFactory, workdir: Path, redis_url: str,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    prod = producer(workdir, redis_url, monkeypatch)
    low = [prod.enqueue(GenerationRequest(prompt=f"low {i}", duration=0.5, priority=0, format="wav"))
           for i in range(3)]
    high = prod.enqueue(GenerationRequest(prompt="urgent", duration=0.5, priority=9, format="wav"))
    workers.start()  # starts with all four waiting
    results = [h.wait(180) for h in (*low, high)]
    finished = sorted(results, key=lambda r: r.timings.queue_wait)
    assert finished[0].job_id == high.id  # waited least: taken first


def test_cli_errors_are_one_clear_line(workdir: Path, tmp_path: Path) -> None:
    env = base_env(tmp_path, "redis://127.0.0.1:1/0", MUSICGEN_DATABASE__URL=f"sqlite:///{tmp_path}/l.db")
    no_db = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "x"], cwd=workdir,
                           env=env, capture_output=True, text=True, timeout=120, check=False)
    assert no_db.returncode == 1 and "Traceback" not in no_db.stderr, no_db.stderr
    assert "musicgen-pipeline db upgrade" in no_db.stderr  # a real broker: nothing is created
    assert not (tmp_path / "l.db").exists()
    subprocess.run([sys.executable, "-m", "pipeline.cli", "db", "upgrade"], cwd=workdir, env=env,
                   capture_output=True, timeout=120, check=True)
    cases = [
        (["generate", "x", "--model", "musicgen-smal"], "model_not_found", "did you mean 'musicgen-small'"),
        (["generate", "x", "--model", "tiny", "--duration", "0.5"], "service_unavailable", "unreachable"),
        (["generate", "x", "--duration", "-1"], "invalid_request", "duration"),
    ]
    for argv, code, words in cases:
        proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *argv], cwd=workdir, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert proc.returncode == 1, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr, proc.stderr
        assert f"error: {code}" in proc.stderr and words in proc.stderr, proc.stderr


class RefusingRedis:
    """A private redis-server without LPUSH: claims, states and the backlog work, but every
    message the broker is asked to queue is refused, as a failed send after the QUEUED write."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                        "--daemonize", "yes", "--save", "", "--appendonly", "no",
                        "--dir", str(folder), "--logfile", str(folder / "redis.log"),
                        "--rename-command", "LPUSH", ""], check=True)
        deadline = time.monotonic() + 20
        while self._cli("ping") != "PONG":
            assert time.monotonic() < deadline, "the private redis did not start"
            time.sleep(0.05)

    def _cli(self, *args: str) -> str:
        return subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                              text=True, check=False).stdout.strip()

    def stop(self) -> None:
        self._cli("shutdown", "nosave")


@pytest.fixture
def refusing_redis(tmp_path: Path) -> Iterator[RefusingRedis]:
    server = RefusingRedis(tmp_path)
    yield server
    server.stop()


def test_a_refused_send_leaves_no_queued_job(tmp_path: Path, refusing_redis: RefusingRedis,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    prod = producer(tmp_path, refusing_redis.url, monkeypatch,
                    MUSICGEN_DATABASE__URL=f"sqlite:///{tmp_path}/ledger.db")
    with pytest.raises(pipeline.ServiceUnavailable) as refused:
        prod.enqueue(GenerationRequest(prompt="never sent", duration=1.0, user_id="dan",
                                       job_id="never-sent"))
    assert refused.value.details == {"retry_after": 5}
    assert_no_trace(prod, "never-sent")  # it said "queued" before: the QUEUED write stayed
    assert prod.quota.ledger() == []  # its reservation was deleted: nothing to count or list
    assert prod.quota.usage("dan").daily.used == 0


def test_an_unmigrated_database_is_refused_naming_the_command(
        tmp_path: Path, redis_url: str, quota_empty_db_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    if quota_empty_db_url.startswith("sqlite"):  # an empty SQLite file: there, but no schema
        Path(quota_empty_db_url.split(":///", 1)[1]).touch()
    prod = producer(tmp_path, redis_url, monkeypatch, migrate=False,
                    MUSICGEN_DATABASE__URL=quota_empty_db_url)
    job_id = f"no-schema-{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(pipeline.ServiceUnavailable) as refused:
            prod.enqueue(GenerationRequest(prompt="x", duration=1.0, job_id=job_id))
        assert "musicgen-pipeline db upgrade" in refused.value.message
        assert refused.value.field == "database.url"
        assert_no_trace(prod, job_id)
        assert prod.quota.schema_ready() is False  # and the producer created none
    finally:
        prod.quota.close()  # before the fixture drops the database


def test_an_unreachable_database_is_service_unavailable_not_a_driver_error(
        tmp_path: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "ledger-Pw-never-shown"
    prod = producer(tmp_path, redis_url, monkeypatch, migrate=False,
                    MUSICGEN_DATABASE__URL="postgresql+psycopg://ops@127.0.0.1:1/ledger",
                    MUSICGEN_DATABASE__PASSWORD=secret)
    job_id = f"no-db-{uuid.uuid4().hex[:8]}"
    with pytest.raises(pipeline.ServiceUnavailable) as refused:
        prod.enqueue(GenerationRequest(prompt="x", duration=1.0, job_id=job_id))
    assert refused.value.details == {"retry_after": 5}
    assert secret not in str(refused.value)
    # No claim and no stored state; get_job itself cannot say "no such job" while the ledger,
    # which keeps jobs past the result backend's expiry, is out of reach: it says so instead.
    assert prod.registry.owner(job_id) is None
    assert prod.app.AsyncResult(job_id).state == "PENDING"
    with pytest.raises(pipeline.ServiceUnavailable):
        prod.get_job(job_id)
