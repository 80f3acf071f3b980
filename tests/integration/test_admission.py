"""What the producer decides before a job is queued, against real Redis and a real ledger:
quota refusal and refund, backpressure, priorities, and clear CLI errors instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import pipeline
from pipeline import GenerationRequest, JobStatus

from .conftest import WorkerFactory, base_env

pytestmark = pytest.mark.integration


def producer(workdir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch, **env: str) -> pipeline.Producer:
    for key, value in base_env(workdir, redis_url, **env).items():
        if key.startswith("MUSICGEN_"):
            monkeypatch.setenv(key, value)
    return pipeline.Producer(pipeline.load_settings(cwd=workdir))


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
