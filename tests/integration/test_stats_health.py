"""`stats`, `health` and the worker's Prometheus metrics, over a ledger filled by real jobs.

One real worker (prefork, fault injection loaded) serves the whole module: 3 tiny jobs succeed
and one fails permanently ("FAULT:permanent" makes the model call raise InvalidRequest). The
worker, the callers and the CLI share a ledger database of this module's own, so jobs other
modules ran in the session's work dir cannot change the numbers.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.quota import DEFAULT_TIERS, QuotaStore, make_engine

from .conftest import CALLER, Worker, WorkerFactory, base_env

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FAILING_PROMPT = "FAULT:permanent a sound no model can make"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def call(workdir: Path, redis_url: str, request: dict[str, Any], env: dict[str, str]) -> Any:
    """conftest's run_caller, with this module's ledger: enqueue from its own process, wait."""
    proc = subprocess.run([sys.executable, "-c", CALLER, json.dumps({"request": request,
                                                                     "timeout": 120})],
                          cwd=workdir, env=base_env(workdir, redis_url, **env),
                          capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class Run:
    """What the module's jobs left behind."""

    workdir: Path
    redis_url: str
    env: dict[str, str]
    worker: Worker
    port: int
    ok: list[dict[str, Any]]
    failed: dict[str, Any]
    tmp: Path

    def cli(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess[str]:
        """`musicgen-pipeline ARGS` as an operator or a probe runs it, on the worker's settings."""
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=self.workdir,
                              env=base_env(self.workdir, self.redis_url, **{**self.env,
                                                                           **extra_env}),
                              capture_output=True, text=True, timeout=120, check=False)


def wait_all_settled(db_url: str, count: int, timeout: float = 30) -> None:
    # The caller sees a result as soon as it is stored; the task's on_success/on_failure hooks
    # (ledger, metrics) run just after, so wait for the ledger to settle.
    engine = make_engine(db_url)
    try:
        store = QuotaStore(engine, tiers=DEFAULT_TIERS, default_tier="enterprise")
        deadline = time.monotonic() + timeout
        while True:
            statuses = [r["status"] for r in store.ledger()]
            if len(statuses) == count and all(s in ("succeeded", "failed") for s in statuses):
                return
            assert time.monotonic() < deadline, f"ledger never settled: {statuses}"
            time.sleep(0.1)
    finally:
        engine.dispose()


@pytest.fixture(scope="module")
def run(workdir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Start one worker (the `workers` fixture's factory, for the module), run 4 jobs through it."""
    tmp = tmp_path_factory.mktemp("stats")
    port = free_port()
    env = {"MUSICGEN_DATABASE__URL": f"sqlite:///{tmp}/ledger.db",
           "MUSICGEN_MONITORING__METRICS_PORT": str(port),
           # One job per pool child, each loading the model itself: the metrics must add up
           # the files of four dead children, and each load time reaches them with its job.
           "MUSICGEN_WORKER__MAX_TASKS_PER_CHILD": "1",
           "MUSICGEN_MODEL__PRELOAD": "false"}
    # The ledger is set up explicitly, as a deployment does before its producers run.
    upgrade = subprocess.run([sys.executable, "-m", "pipeline.cli", "db", "upgrade"], cwd=workdir,
                             env=base_env(workdir, redis_url, **env), capture_output=True,
                             text=True, timeout=120, check=False)
    assert upgrade.returncode == 0, upgrade.stderr[-2000:]
    factory = WorkerFactory(workdir, redis_url, tmp)
    worker = factory.start(faults=True, **env)
    try:
        request = {"prompt": "ambient pads", "duration": 1.0, "format": "wav", "user_id": "stats"}
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda r: call(workdir, redis_url, r, env), [
                request, {**request, "prompt": "soft drums"}, {**request, "prompt": "bass line"},
                {**request, "prompt": FAILING_PROMPT}]))
        ok = [o["result"] for o in outs if "result" in o]
        failed = [o for o in outs if "error" in o]
        assert len(ok) == 3 and len(failed) == 1, outs
        wait_all_settled(env["MUSICGEN_DATABASE__URL"], 4)
        yield Run(workdir, redis_url, env, worker, port, ok, failed[0], tmp)
    finally:
        factory.stop_all()


def test_stats_json_counts_the_jobs_that_ran(run: Run) -> None:
    assert run.failed["error"]["details"]["error_code"] == "invalid_request"
    proc = run.cli("stats", "--since", "1h", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    o = data["overall"]
    assert (o["jobs"], o["succeeded"], o["failed"], o["timeout"], o["open"]) == (4, 3, 1, 0, 0)
    assert o["error_rate_percent"] == 25.0
    assert o["errors_by_code"] == {"invalid_request": 1}
    # What the worker reported to the callers is what the ledger (and so stats) holds.
    audio = sum(r["duration"] for r in run.ok)
    gpu = sum(r["timings"]["generate"] for r in run.ok)
    assert o["audio_seconds"] == pytest.approx(audio)
    assert o["gpu_seconds"] == pytest.approx(gpu)
    assert o["audio_per_gpu_second"] == pytest.approx(audio / gpu)
    assert o["latency"]["count"] == 3 and o["queue_wait"]["count"] == 4
    assert 0 < o["latency"]["p50"] <= o["latency"]["p95"] < 300
    # Nearest-rank over 3 values: p95 is the slowest, p50 the middle one; each is some job's own.
    totals = sorted(r["timings"]["total"] for r in run.ok)
    assert o["latency"]["p95"] >= totals[-1]  # end to end includes the queue and the wrap-up
    assert data["percentile_method"] == "nearest-rank"
    assert data["jobs_per_minute"] == pytest.approx(4 / 60)
    assert data["window"] == "1h" and data["window_seconds"] == 3600.0
    assert list(data["by_model"]) == ["tiny"] and data["by_model"]["tiny"]["jobs"] == 4
    assert list(data["by_worker"]) == [run.worker.name]
    assert data["by_worker"][run.worker.name]["errors_by_code"] == {"invalid_request": 1}
    assert data["backlog"]["musicgen.tiny"] == 0 and "musicgen.tiny-melody" in data["backlog"]


def test_stats_text_is_readable(run: Run) -> None:
    proc = run.cli("stats", "--since", "30m")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("stats over the last 30m (")
    assert "jobs:             4 (3 succeeded, 1 failed, 0 timed out, 0 cancelled, 0 open)" in lines
    assert "error rate:       25.0% (1 of 4 finished)" in lines
    assert any(line.split() == ["invalid_request", "1", "(25.0%)"] for line in lines)
    assert any(line.split()[:5] == ["tiny", "4", "3", "1", "25.0%"] for line in lines)
    assert any(line.split()[:2] == [run.worker.name, "4"] for line in lines)


def test_stats_refuses_a_bad_window(run: Run) -> None:
    proc = run.cli("stats", "--since", "yesterday")
    assert proc.returncode == 2
    assert "30m, 1h, 2d or 1w" in proc.stderr


def test_health_fails_on_the_error_rate_and_passes_under_a_higher_threshold(run: Run) -> None:
    strict = run.cli("health", MUSICGEN_MONITORING__ERROR_RATE_THRESHOLD_PERCENT="10")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert strict.stdout.splitlines() == ["error rate 25.0% > 10.0% over the last 1h"]
    lenient = run.cli("health", MUSICGEN_MONITORING__ERROR_RATE_THRESHOLD_PERCENT="50")
    assert lenient.returncode == 0, lenient.stdout + lenient.stderr
    # The session's Redis may hold other tests' queued jobs: the backlog is below its threshold
    # (50), which is all health decides on; its figure is checked by the backlog tests.
    assert re.match(r"healthy: error rate 25\.0% \(<= 50\.0%\), max backlog \d+ \(threshold 50\)",
                    lenient.stdout), lenient.stdout
    as_json = run.cli("health", "--json", "--since", "2d",
                      MUSICGEN_MONITORING__ERROR_RATE_THRESHOLD_PERCENT="10",
                      MUSICGEN_MONITORING__LATENCY_THRESHOLD="0.001")
    assert as_json.returncode == 1
    data = json.loads(as_json.stdout)
    assert data["healthy"] is False and data["checks"]["finished_jobs"] == 4
    broker = data["checks"]["broker"]  # kind, version, depths (pipeline/infra/brokers.py)
    assert broker["kind"] == "redis" and broker["reachable"] and broker["version"].startswith("Redis ")
    assert "musicgen.tiny" in broker["depths"]
    assert data["problems"][0] == "error rate 25.0% > 10.0% over the last 2d"
    assert data["problems"][1].startswith("latency p95 ") and len(data["problems"]) == 2


def test_health_fails_when_the_broker_or_the_database_cannot_be_reached(run: Run) -> None:
    no_broker = run.cli("health", MUSICGEN_BROKER__URL="redis://127.0.0.1:1/0",
                        MUSICGEN_MONITORING__ERROR_RATE_THRESHOLD_PERCENT="50")
    assert no_broker.returncode == 1
    first_line = no_broker.stdout.splitlines()[0]
    assert first_line.startswith("broker unreachable at redis://127.0.0.1:1/0: ")
    secret = "ledger-Pw-never-printed"
    no_db = run.cli("health", MUSICGEN_DATABASE__URL="postgresql+psycopg://ops@127.0.0.1:1/ledger",
                    MUSICGEN_DATABASE__PASSWORD=secret)
    assert no_db.returncode == 1
    assert no_db.stdout.splitlines() == [line for line in no_db.stdout.splitlines()
                                         if line.startswith("database unreachable at ")]
    assert "ops:***@127.0.0.1:1/ledger" in no_db.stdout
    assert secret not in no_db.stdout + no_db.stderr
    missing = run.cli("health", MUSICGEN_DATABASE__URL=f"sqlite:///{run.tmp}/nowhere.db")
    assert missing.returncode == 1 and "no SQLite file at" in missing.stdout
    assert not (run.tmp / "nowhere.db").exists()


def test_backlog_of_the_embedded_broker_counts_its_queue_files(
        isolated_settings_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app
    from pipeline.config import load_settings
    from pipeline.infra.celery_app import TASK_GENERATE, make_celery

    monkeypatch.setenv("MUSICGEN_APP__DATA_DIR", str(isolated_settings_env / "data"))
    monkeypatch.setenv("MUSICGEN_DATABASE__URL", f"sqlite:///{isolated_settings_env}/q.db")
    monkeypatch.setenv("MUSICGEN_MONITORING__BACKLOG_THRESHOLD", "1")
    settings = load_settings()
    assert settings.broker.url is None  # development without Redis: the file-system broker
    celery = make_celery(settings)
    for _ in range(2):  # kombu itself writes the messages: its file names are what we count
        celery.send_task(TASK_GENERATE, args=[{}], queue="musicgen.tiny")
    celery.send_task(TASK_GENERATE, args=[{}], queue="musicgen.tiny-melody")
    celery.close()
    runner = CliRunner()
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    result = runner.invoke(app, ["stats", "--json"])
    assert result.exit_code == 0, result.output
    backlog = json.loads(result.stdout)["backlog"]
    assert (backlog["musicgen.tiny"], backlog["musicgen.tiny-melody"]) == (2, 1)
    assert backlog["musicgen.musicgen-small"] == 0
    health = runner.invoke(app, ["health"])
    assert health.exit_code == 1
    assert health.stdout.splitlines() == ["backlog 2 jobs in musicgen.tiny > 1"]


def _samples(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_worker_serves_prometheus_metrics_of_its_children(run: Run) -> None:
    assert "serving Prometheus metrics on" in run.worker.log_text()
    ok = (("error_code", ""), ("model", "tiny"), ("outcome", "succeeded"))
    deadline = time.monotonic() + 15
    while (samples := _samples(run.port)).get(("musicgen_jobs_total", ok)) != 3.0:
        assert time.monotonic() < deadline, samples
        time.sleep(0.2)
    failed = (("error_code", "invalid_request"), ("model", "tiny"), ("outcome", "failed"))
    assert samples[("musicgen_jobs_total", failed)] == 1.0
    tiny = (("model", "tiny"),)
    gpu = sum(r["timings"]["generate"] for r in run.ok)
    assert samples[("musicgen_generation_seconds_count", tiny)] == 3.0
    assert samples[("musicgen_generation_seconds_sum", tiny)] == pytest.approx(gpu) and gpu > 0
    assert samples[("musicgen_realtime_factor_count", tiny)] == 3.0
    assert samples[("musicgen_realtime_factor_sum", tiny)] == pytest.approx(
        sum(r["duration"] / (r["timings"]["generate"] / r["batch_size"]) for r in run.ok))
    assert samples[("musicgen_queue_wait_seconds_count", tiny)] == 3.0
    assert samples[("musicgen_audio_seconds_total", tiny)] == pytest.approx(
        sum(r["duration"] for r in run.ok))
    # Each job ran in a fresh child with preload off, so each succeeded job loaded the model.
    loads = [r["timings"]["model_load"] for r in run.ok]
    assert samples[("musicgen_model_load_seconds_count", tiny)] == 3.0 and min(loads) > 0.001
    assert samples[("musicgen_model_load_seconds_sum", tiny)] == pytest.approx(sum(loads))
    # The samples came from the files of (at least) 4 pool children, in the worker's own folder.
    folder = run.workdir / ".musicgen" / "metrics" / run.worker.name.replace("@", "_")
    pids = {path.stem.rsplit("_", 1)[-1] for path in folder.glob("*.db")}
    assert len(pids) >= 4, sorted(p.name for p in folder.iterdir())
