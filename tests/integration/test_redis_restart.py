"""Redis goes away while jobs are queued and running, and comes back: no accepted job is lost,
and while it is down the producer says so clearly instead of hanging or half-queueing."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import pipeline
from pipeline import GenerationRequest

from .conftest import WorkerFactory, base_env, settled_ledger

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class RedisServer:
    """A private redis-server on its own port, append-only, so a restart keeps the queue."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.folder = folder
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "yes",
                        "--dir", str(self.folder), "--appendonly", "yes", "--appendfsync", "always",
                        "--save", "", "--logfile", str(self.folder / "redis.log")], check=True)
        deadline = time.monotonic() + 20
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                             text=True).stdout.strip() != "PONG":
            assert time.monotonic() < deadline, "test redis did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "shutdown"], capture_output=True)
        deadline = time.monotonic() + 20
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).returncode == 0:
            assert time.monotonic() < deadline, "test redis did not stop"
            time.sleep(0.1)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


def test_no_accepted_job_is_lost_across_a_redis_restart(private_redis: RedisServer, workers: WorkerFactory,
                                                        workdir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limits = {"MUSICGEN_WORKER__SOFT_TIME_LIMIT": "20", "MUSICGEN_WORKER__HARD_TIME_LIMIT": "25",
              "MUSICGEN_WORKER__TIME_LIMIT_PER_SECOND": "0", "MUSICGEN_BROKER__VISIBILITY_TIMEOUT": "30"}
    for key, value in base_env(workdir, private_redis.url, **limits).items():
        if key.startswith("MUSICGEN_"):
            monkeypatch.setenv(key, value)
    producer = pipeline.Producer(pipeline.load_settings(cwd=workdir))
    workers.start(broker=private_redis.url, **limits)
    accepted = [producer.enqueue(GenerationRequest(prompt=f"outage {i}", duration=1.0, format="wav"))
                for i in range(4)]
    deadline = time.monotonic() + 120
    while accepted[0].progress().fraction <= 0.05:
        assert time.monotonic() < deadline, "first job never started"
        time.sleep(0.05)

    private_redis.stop()  # one job running, three queued
    started = time.monotonic()
    with pytest.raises(pipeline.ServiceUnavailable) as refused:
        producer.enqueue(GenerationRequest(prompt="while down", duration=1.0))
    assert time.monotonic() - started < 10  # a clear answer, not a hang
    assert "unreachable" in str(refused.value)
    time.sleep(3)

    private_redis.start()  # same folder: the append-only file brings the queue back
    for handle in accepted:
        result = handle.wait(240)
        outputs = sorted((workdir / "outputs").glob(f"{handle.id}*"))
        assert [p.name for p in outputs] == [f"{handle.id}.wav", f"{handle.id}.wav.json"], result
    rows = settled_ledger(producer.quota, [h.id for h in accepted])
    assert len(rows) == 4 and {r["status"] for r in rows.values()} == {"succeeded"}  # each charged once
