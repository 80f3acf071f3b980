"""Building a producer has no side effects, and what it refuses it refuses with typed errors:
no quota database is created or migrated by a producer (issue 8.6), and anything that is not a
``GenerationRequest`` is an ``InvalidRequest`` naming the argument (issue 8.D)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline import GenerationRequest
from pipeline.errors import InvalidRequest, ServiceUnavailable
from pipeline.quota.configured import store_for

pytestmark = pytest.mark.timeout(60)


def _settings(monkeypatch: pytest.MonkeyPatch, redis_url: str, **env: str) -> pipeline.Settings:
    # A broker that is never reached here (nothing is sent): building a producer connects to
    # nothing, and each test below fails before a job would be claimed.
    monkeypatch.setenv("MUSICGEN_BROKER__URL", redis_url)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return pipeline.load_settings()


def test_a_producer_does_not_create_the_default_database_in_the_working_directory(
        isolated_settings_env: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str) -> None:
    settings = _settings(monkeypatch, redis_url)
    assert settings.database.url == "sqlite:///.musicgen/musicgen.db"  # relative to the cwd
    with pytest.raises(ServiceUnavailable) as refused:
        pipeline.Producer(settings)
    assert "musicgen-pipeline db upgrade" in refused.value.message
    assert refused.value.field == "database.url"
    assert list(isolated_settings_env.iterdir()) == []  # no file, no folder


def test_store_for_creates_only_when_asked(isolated_settings_env: Path,
                                           monkeypatch: pytest.MonkeyPatch,
                                           redis_url: str) -> None:
    db = isolated_settings_env / "data" / "ledger.db"
    settings = _settings(monkeypatch, redis_url, MUSICGEN_DATABASE__URL=f"sqlite:///{db}")
    with pytest.raises(ServiceUnavailable, match="db upgrade"):
        store_for(settings)
    assert not db.parent.exists()
    store = store_for(settings, migrate=True)  # the explicit step: folder, file and schema
    try:
        assert store.schema_ready() is True
    finally:
        store.close()
    pipeline.Producer(settings).quota.close()  # and now a producer finds it


@pytest.mark.parametrize("bad", [{"prompt": "a dict"}, None, "a prompt", 42])
def test_enqueue_refuses_what_is_not_a_request(isolated_settings_env: Path,
                                               monkeypatch: pytest.MonkeyPatch, redis_url: str,
                                               bad: Any) -> None:
    db = isolated_settings_env / "q.db"
    settings = _settings(monkeypatch, redis_url, MUSICGEN_DATABASE__URL=f"sqlite:///{db}")
    store_for(settings, migrate=True).close()
    producer = pipeline.Producer(settings)
    with pytest.raises(InvalidRequest) as one:
        producer.enqueue(bad)
    assert (one.value.code, one.value.field) == ("invalid_request", "request")
    with pytest.raises(InvalidRequest) as many:
        producer.enqueue_many([GenerationRequest(prompt="fine", duration=1.0), bad])
    assert many.value.field == "requests[1]"
    with pytest.raises(InvalidRequest) as not_a_list:
        producer.enqueue_many(bad)
    assert not_a_list.value.field == "requests"
    with pytest.raises(InvalidRequest) as bad_id:
        producer.get_job(bad)
    assert bad_id.value.field == "job_id"
    assert producer.quota.ledger() == []  # nothing was reserved
