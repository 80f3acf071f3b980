"""`musicgen-pipeline health` shows the engine serving each model on each live worker, read
from the workers' heartbeat records in the broker's (real) Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner

from pipeline.cli import app
from tests.integration.conftest import redis_url  # noqa: F401 (the fixture)
from workers.heartbeat import HeartbeatStore, new_worker_id


@pytest.fixture
def store(redis_url: str, isolated_settings_env: Path,  # noqa: F811 (the imported fixture)
          monkeypatch: pytest.MonkeyPatch) -> Iterator[HeartbeatStore]:
    monkeypatch.setenv("MUSICGEN_BROKER__URL", redis_url)
    monkeypatch.setenv("MUSICGEN_APP__DATA_DIR", str(isolated_settings_env / "data"))
    monkeypatch.setenv("MUSICGEN_DATABASE__URL", f"sqlite:///{isolated_settings_env}/q.db")
    client = redis.Redis.from_url(redis_url)
    heartbeats = HeartbeatStore(client, ttl=600)
    yield heartbeats
    client.close()


def test_health_lists_the_serving_engine_of_each_live_worker(store: HeartbeatStore) -> None:
    ids = [new_worker_id("w1@host"), new_worker_id("w2@host"), new_worker_id("w3@host")]
    store.beat(ids[0], hostname="w1@host", held={}, beat_local=0.0, pid=11,
               engines={"tiny": "static", "musicgen-small": "hf"})
    store.beat(ids[1], hostname="w2@host", held={}, beat_local=0.0, pid=12,
               engines={"tiny": "hf"})
    store.beat(ids[2], hostname="w3@host", held={}, beat_local=0.0, pid=13)  # nothing decided
    try:
        runner = CliRunner()
        assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
        text = runner.invoke(app, ["health"])
        assert text.exit_code == 0, text.output
        assert text.stdout.splitlines()[-1] == (
            "engines: w1@host: musicgen-small hf, tiny static; w2@host: tiny hf")
        report = json.loads(runner.invoke(app, ["health", "--json"]).stdout)
        assert sorted(report["checks"]["engines"], key=lambda w: w["pid"]) == [
            {"worker": "w1@host", "pid": 11, "engines": {"musicgen-small": "hf", "tiny": "static"}},
            {"worker": "w2@host", "pid": 12, "engines": {"tiny": "hf"}}]
    finally:
        for worker in ids:
            store.forget(worker)


def test_without_heartbeats_health_has_no_engines_to_show(isolated_settings_env: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MUSICGEN_APP__DATA_DIR", str(isolated_settings_env / "data"))
    monkeypatch.setenv("MUSICGEN_DATABASE__URL", f"sqlite:///{isolated_settings_env}/q.db")
    runner = CliRunner()  # development's embedded broker: no Redis, no heartbeats
    assert runner.invoke(app, ["db", "upgrade"]).exit_code == 0
    report = json.loads(runner.invoke(app, ["health", "--json"]).stdout)
    assert report["checks"]["engines"] is None
