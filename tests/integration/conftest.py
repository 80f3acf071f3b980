"""Real parts for the integration tests: a Redis database of our own, the tiny models, real
worker processes started with the project's own command line, and a caller in its own process.

A Redis that is not running, or a worker that cannot start, fails the tests (never skips).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.quota.tables import TERMINAL_STATUSES
from tests import redis_claim

from . import rabbitmq

REDIS = "redis://127.0.0.1:6379"
REPO = Path(__file__).resolve().parents[2]
#: RabbitMQ broker URL -> the Redis its processes keep results (and our keys) on; base_env reads
#: it, so a test passes one broker URL around whichever broker it runs on.
RESULTS_FOR: dict[str, str] = {}
#: RabbitMQ broker URLs whose processes declare quorum queues (``broker.queue_type``); base_env
#: reads it, like RESULTS_FOR (tests/integration/test_quorum_queues.py).
QUORUM: set[str] = set()
#: A ledger row's final statuses: the worker has settled it.
FINAL = frozenset(s.value for s in TERMINAL_STATUSES)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """An empty database claimed for this session; all of its keys are ours to delete after."""
    token = uuid.uuid4().hex
    for db in range(1, 15):
        client = redis.Redis.from_url(f"{REDIS}/{db}")
        if redis_claim.claim(client, token):
            break
        client.close()
    else:
        pytest.fail("no free Redis database to claim for the integration tests")
    yield f"{REDIS}/{db}"
    redis_claim.release(client, token)
    client.close()


@pytest.fixture(scope="session")
def rabbitmq_url(redis_url: str) -> Iterator[str]:
    """A vhost of this session's own on the shared RabbitMQ (deleted at the end), its results
    on the session's Redis database. A RabbitMQ that is not running fails the tests."""
    vhost = rabbitmq.add_vhost()
    url = rabbitmq.amqp_url(vhost)
    RESULTS_FOR[url] = redis_url
    yield url
    rabbitmq.delete_vhost(vhost)


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """The failure suite runs on both brokers: the session's Redis database, or its RabbitMQ
    vhost (with production settings: nothing shortens a timeout RabbitMQ does not have)."""
    if request.param == "redis":
        return redis_url
    return str(request.getfixturevalue("rabbitmq_url"))


def on_rabbitmq(broker: str) -> bool:
    return broker.startswith("amqp://")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project directory with the tiny models built by the project's own command."""
    root = tmp_path_factory.mktemp("musicgen")
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "models", "make-tiny", ".musicgen/models"],
                          cwd=root, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (root / ".musicgen/models/tiny/config.json").is_file()
    assert (root / ".musicgen/models/tiny-melody/config.json").is_file()
    # The quota database is created by the operator's explicit step, never by a producer.
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "db", "upgrade"], cwd=root,
                          env=base_env(root, None), capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root


def base_env(workdir: Path, broker: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MUSICGEN_")}
    env.update({
        "MUSICGEN_ENV": "development",
        "MUSICGEN_MODEL__PRESET": "tiny",
        "MUSICGEN_APP__DATA_DIR": str(workdir / ".musicgen"),
        "MUSICGEN_STORAGE__OUTPUT_DIR": str(workdir / "outputs"),
        "MUSICGEN_STORAGE__TEMP_DIR": str(workdir / "tmp"),
        "MUSICGEN_DATABASE__URL": f"sqlite:///{workdir}/quota.db",
        "MUSICGEN_RATE_LIMIT__ENABLED": "false",
        "MUSICGEN_QUOTAS__DEFAULT_TIER": "enterprise",  # unlimited: quota tests set their own
        "MUSICGEN_MONITORING__METRICS_PORT": "0",  # many workers on one host; the metrics test sets one
        "PYTHONUNBUFFERED": "1",
    })
    if broker:
        env["MUSICGEN_BROKER__URL"] = broker
    if broker and on_rabbitmq(broker):
        env["MUSICGEN_BROKER__PASSWORD"] = rabbitmq.PASSWORD
        env["MUSICGEN_BROKER__RESULT_BACKEND"] = RESULTS_FOR[broker.split("?")[0]]
        if broker.split("?")[0] in QUORUM:
            env["MUSICGEN_BROKER__QUEUE_TYPE"] = "quorum"
    env.update(extra)
    return env


@dataclass
class Worker:
    """A real `celery worker` process started the way an operator starts one."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    env: dict[str, str] = field(repr=False)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill9(self) -> None:
        """SIGKILL the worker and its pool children at once, as a node dying would."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class WorkerFactory:
    def __init__(self, workdir: Path, redis_url: str, tmp: Path) -> None:
        self.workdir, self.redis_url, self.tmp = workdir, redis_url, tmp
        self.started: list[Worker] = []

    def start(self, *, queues: str = "musicgen.tiny,musicgen.tiny-melody", pool: str = "prefork",
              ready_timeout: float = 120, faults: bool = False, broker: str | None = None,
              **env: str) -> Worker:
        """Start `musicgen-pipeline worker`; ``faults`` loads tests/integration/faults.py into it
        (fault injection at the model boundary, driven by markers in the prompt)."""
        name = f"w{len(self.started) + 1}-{uuid.uuid4().hex[:6]}@test"
        full_env = base_env(self.workdir, broker or self.redis_url, **env)
        log = self.tmp / f"{name.split('@')[0]}.log"
        argv = [sys.executable, "-m", "pipeline.cli", "worker", "-Q", queues, "--pool", pool,
                "-n", name, "--loglevel", "info"]
        if faults:
            argv += ["--include", "tests.integration.faults"]
            full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            full_env["FAULTS_DIR"] = str(self.tmp)
        with log.open("wb") as out:  # the child keeps its own copy of the descriptor
            # Its own session, so a test can kill -9 the whole worker (parent and children).
            proc = subprocess.Popen(argv, cwd=self.workdir, env=full_env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        worker = Worker(name, proc, log, full_env)
        self.started.append(worker)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail(f"worker exited with {proc.returncode}:\n{worker.log_text()[-3000:]}")
            if " ready." in worker.log_text():
                return worker
            time.sleep(0.2)
        pytest.fail(f"worker not ready after {ready_timeout} s:\n{worker.log_text()[-3000:]}")

    def stop_all(self) -> None:
        for worker in self.started:
            worker.stop()


@pytest.fixture
def workers(workdir: Path, redis_url: str, tmp_path: Path) -> Iterator[WorkerFactory]:
    factory = WorkerFactory(workdir, redis_url, tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture
def broker_workers(workdir: Path, broker_url: str, tmp_path: Path) -> Iterator[WorkerFactory]:
    """Workers on the broker under test (``broker_url``: Redis, then RabbitMQ)."""
    factory = WorkerFactory(workdir, broker_url, tmp_path)
    yield factory
    factory.stop_all()


def record_recovery(record_property: Callable[[str, object], None], what: str, started: float) -> float:
    """Log a case's time to recovery (seconds since ``started``, a ``time.monotonic()``): in
    the junit XML as a property and on stdout (``pytest -s`` or the captured output)."""
    seconds = time.monotonic() - started
    record_property(f"recovery_s[{what}]", round(seconds, 2))
    print(f"time to recovery ({what}): {seconds:.1f} s")
    return seconds


@pytest.fixture(scope="module")
def shared_worker(workdir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One worker (faults loaded) for a module's tests that do not kill or stop it."""
    factory = WorkerFactory(workdir, redis_url, tmp_path_factory.mktemp("worker"))
    # Faults react only to markers in a prompt; with them loaded a test can hold a job at a step.
    yield factory.start(faults=True)
    factory.stop_all()


CALLER = textwrap.dedent("""
    import json, sys
    import pipeline
    from pipeline import GenerationRequest

    spec = json.loads(sys.argv[1])
    handle = pipeline.enqueue(GenerationRequest(**spec["request"]))
    seen = []
    def on_progress(p):
        if not seen or seen[-1] != [p.fraction, p.message]:
            seen.append([p.fraction, p.message])
            if spec.get("progress_log"):  # so a test can wait until this caller saw a step
                with open(spec["progress_log"], "a") as fh:
                    fh.write(json.dumps(seen[-1]) + "\\n")
    try:
        result = handle.wait(spec.get("timeout", 120), poll=0.05, on_progress=on_progress)
        on_progress(handle.progress())  # the final step, as a caller polling progress sees it
        print(json.dumps({"job_id": handle.id, "result": result.model_dump(mode="json"), "progress": seen,
                          "imported": sorted(m for m in ("torch", "transformers", "ffmpeg") if m in sys.modules)}))
    except pipeline.PipelineError as exc:
        print(json.dumps({"job_id": handle.id, "error": exc.to_dict(), "progress": seen}))
""")


def start_caller(workdir: Path, redis_url: str, request: dict[str, Any], timeout: float = 120,
                 progress_log: Path | None = None) -> subprocess.Popen[str]:
    """Enqueue from a separate Python process, as a calling service would; it waits for the job
    and writes each progress step it sees to ``progress_log`` (if given) as a JSON line."""
    spec = {"request": request, "timeout": timeout, "progress_log": str(progress_log or "")}
    return subprocess.Popen([sys.executable, "-c", CALLER, json.dumps(spec)], cwd=workdir,
                            env=base_env(workdir, redis_url), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def caller_output(proc: subprocess.Popen[str], timeout: float = 180) -> dict[str, Any]:
    """The caller's last line: its result or error, and the progress steps it saw."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_caller(workdir: Path, redis_url: str, request: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    """Enqueue from a separate Python process, as a calling service would, and wait."""
    return caller_output(start_caller(workdir, redis_url, request, timeout), timeout + 60)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll until ``predicate`` holds; ``timeout`` only bounds a failure, it is never a pause."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def settled_ledger(quota: Any, job_ids: Iterable[str],
                   timeout: float = 60) -> dict[str, dict[str, Any]]:
    """The ledger rows of ``job_ids`` (by job id) once every one has a final status.

    A caller's ``wait()`` returns as soon as the worker stores the result; Celery runs the task's
    ``on_success``/``on_failure`` hook, which settles the ledger, just after that. So a test that
    reads the ledger right after a wait waits for this state, not for luck.
    """
    wanted = set(job_ids)
    rows: dict[str, dict[str, Any]] = {}

    def settled() -> bool:
        rows.clear()
        rows.update({r["job_id"]: r for r in quota.ledger() if r["job_id"] in wanted})
        return set(rows) == wanted and all(r["status"] in FINAL for r in rows.values())

    wait_for(settled, timeout, f"the ledger rows of {sorted(wanted)} to settle")
    return dict(rows)


def release(folder: Path, name: str) -> None:
    """Let a job held by ``FAULT:hold=NAME`` or ``FAULT:hold-progress=NAME`` go on."""
    (folder / f"{name}.release").touch()


def held(folder: Path, name: str) -> bool:
    """True once a job with ``FAULT:hold=NAME`` (or ``hold-progress``) reached its hold."""
    return (folder / f"{name}.held").exists()


def sse_events(lines: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """(event, data) of each Server-Sent Event as its lines arrive."""
    event, data = "message", ""
    for line in lines:
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif not line and data:
            yield event, json.loads(data)
            event, data = "message", ""


def ffprobe(path: Path) -> dict[str, Any]:
    out = subprocess.run(["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams",
                          str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def measured_lufs(path: Path) -> float:
    """Integrated loudness measured independently of the pipeline (ffmpeg's ebur128 filter)."""
    out = subprocess.run(["ffmpeg", "-nostats", "-hide_banner", "-i", str(path), "-af", "ebur128",
                          "-f", "null", "-"], capture_output=True, text=True, check=True)
    lines = [line for line in out.stderr.splitlines() if line.strip().startswith("I:")]
    return float(lines[-1].split()[1])
