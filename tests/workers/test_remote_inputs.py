"""The worker's side of storage by reference, on a real S3 server (moto's, over HTTP) and real
folders: melody inputs fetched within the limits (or refused with a typed permanent error),
uploaded inputs deleted, the retention sweep on the object store, and a webhook's attempts
with their backoff and record in Redis."""

from __future__ import annotations

import io
import os
import socket
import time
import uuid
from pathlib import Path

import pytest
import redis

from pipeline.client.inputs import discard
from pipeline.config.schema import (
    BrokerSettings,
    Settings,
    StorageSettings,
    ValidationSettings,
    WebhookSettings,
)
from pipeline.contract.jobs import MelodyInput
from pipeline.errors import InputUnavailable
from pipeline.infra.celery_app import make_celery
from pipeline.infra.keys import WEBHOOK_PREFIX
from pipeline.infra.storage_backends import backend_for
from pipeline.webhooks import DeliveryLog, event, verify
from tests.pipeline.test_melody_by_reference import wav_bytes
from tests.webhook_receiver import receiver
from workers.inputs import fetch_melody
from workers.maintenance import sweep_results
from workers.webhook_task import deliver

pytestmark = pytest.mark.timeout(60)
DAY = 86400.0


def _settings(storage: StorageSettings, **validation: float) -> Settings:
    return Settings(storage=storage, validation=ValidationSettings.model_validate(validation))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_uploaded_melody_is_fetched_checked_and_deleted_after(
        s3_storage: StorageSettings, tmp_path: Path) -> None:
    settings = _settings(s3_storage)
    backend = backend_for(s3_storage)
    uri = backend.put_stream(io.BytesIO(wav_bytes(2.0)), "inputs/job-1-abc.wav")
    melody = MelodyInput(uri=uri, owned=True)
    path = fetch_melody(melody, settings, tmp_path)
    assert path.parent == tmp_path and path.read_bytes()[:4] == b"RIFF"

    theirs = backend.put_stream(io.BytesIO(b"RIFF"), "uploads/theirs.wav")
    assert discard(MelodyInput(uri=theirs), s3_storage) is False  # the caller's: kept
    assert discard(melody, s3_storage) is True
    assert [o.key for o in backend.list()] == ["uploads/theirs.wav"]


def test_what_cannot_be_fetched_is_a_typed_permanent_error(
        s3_storage: StorageSettings, tmp_path: Path) -> None:
    storage = s3_storage.model_copy(update={"melody_url_hosts": ["127.0.0.1"]})
    settings = _settings(storage, max_melody_size_mb=1)
    backend = backend_for(storage)
    big = backend.put_stream(io.BytesIO(wav_bytes(20.0)), "inputs/big.wav")  # 1.3 MB
    bucket = storage.url.split("/")[2] if storage.url else ""
    cases = {
        "max_size_mb": big,
        "missing": backend.uri("inputs/none.wav"),
        "unreachable": f"https://127.0.0.1:{_closed_port()}/theme.wav",
        "refused": "s3://another-bucket/inputs/x.wav",
    }
    for rule, uri in cases.items():
        with pytest.raises(InputUnavailable) as refused:
            fetch_melody(MelodyInput(uri=uri), settings, tmp_path)
        assert (refused.value.code, refused.value.field) == ("input_unavailable", "melody")
        assert refused.value.details["rule"] == rule and not refused.value.retryable
    assert list(tmp_path.iterdir()) == []  # nothing half-fetched is left
    assert bucket in big


def test_a_file_uri_is_read_only_inside_the_storage_folder(tmp_path: Path) -> None:
    storage = StorageSettings(output_dir=str(tmp_path / "store"))
    secret = tmp_path / "settings.local.toml"
    secret.write_text("[default.broker]\npassword = 'x'\n")
    with pytest.raises(InputUnavailable) as refused:
        fetch_melody(MelodyInput(uri=secret.as_uri()), _settings(storage), tmp_path)
    assert refused.value.details["rule"] == "refused"


def test_the_retention_sweep_works_on_the_object_store(s3_storage: StorageSettings) -> None:
    backend = backend_for(s3_storage)
    for key in ("job-1.wav", "job-1.wav.json", "inputs/job-2-abc.mp3", "notes/keep.txt"):
        backend.put_stream(io.BytesIO(b"data"), key)
    days = s3_storage.retention_days
    kept = sweep_results(s3_storage, now=time.time() + (days - 1) * DAY)
    assert kept.removed_files == 0 and len(list(backend.list())) == 4
    swept = sweep_results(s3_storage, now=time.time() + (days + 1) * DAY)
    assert (swept.removed_files, swept.removed_bytes, swept.errors) == (3, 12, 0)
    assert [o.key for o in backend.list()] == ["notes/keep.txt"]  # not the pipeline's


def test_the_retention_sweep_removes_old_inputs_from_the_folder(tmp_path: Path) -> None:
    storage = StorageSettings(output_dir=str(tmp_path / "out"), retention_days=2)
    inputs = tmp_path / "out" / "inputs"
    inputs.mkdir(parents=True)
    old, new = inputs / "a-1.wav", inputs / "b-2.wav"
    for path, age in ((old, 3 * DAY), (new, 1 * DAY)):
        path.write_bytes(b"x")
        os.utime(path, (time.time() - age, time.time() - age))
    assert sweep_results(storage).removed_files == 1
    assert sorted(p.name for p in inputs.iterdir()) == ["b-2.wav"]


def test_a_webhook_is_retried_with_backoff_and_recorded() -> None:
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    settings = Settings(broker=BrokerSettings(url="redis://127.0.0.1:6379/0"),
                        webhooks=WebhookSettings(allowed_hosts=["127.0.0.1"], secret=secret,  # type: ignore[arg-type]
                                                 backoff=1.5, max_attempts=3))
    app = make_celery(settings)
    job = f"test-hook-{uuid.uuid4().hex}"
    client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        with receiver([500, 503]) as hook:
            DeliveryLog(app.redis, 60).open(job, hook.url, "job.succeeded", f"msg_{job}")
            payload = event(job, "succeeded", result={"uri": "s3://b/x.wav"})
            countdowns = [deliver(app, n, job, hook.url, f"msg_{job}", payload)[1]
                          for n in range(3)]
            assert countdowns == [1.5, 3.0, None]  # Celery's retry waits these, then stops
            assert [r.answered for r in hook.received] == [500, 503, 200]
            ids = {r.headers["webhook-id"] for r in hook.received}
            assert ids == {f"msg_{job}"}  # one message, whatever the attempt
            assert verify(hook.received[-1].body, hook.received[-1].headers, secret) == payload
        [record] = DeliveryLog(app.redis, 60).read(job)
        assert (record.status, record.attempts, record.last_status) == ("delivered", 3, 200)

        with receiver() as hook:  # the host left the allowlist: no POST at all
            moved = settings.model_copy(update={"webhooks": settings.webhooks.model_copy(
                update={"allowed_hosts": ["hooks.example.com"]})})
            app.settings = moved
            outcome, again = deliver(app, 0, job, hook.url, f"msg_{job}", payload)
            assert (outcome.ok, again, hook.received) == (False, None, [])
            assert "allowed_hosts" in (outcome.error or "")
    finally:
        client.delete(WEBHOOK_PREFIX + job)
        client.close()
        app.close()
