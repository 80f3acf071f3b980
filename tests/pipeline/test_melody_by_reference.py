"""Melodies by reference: a 10 MB melody reaches the broker as a URI in a message of a few KB
(read back from the real Redis queue), the upload sits in the storage's inputs prefix, a
melody URI is held to the scheme, bucket and host allowlists, and old messages and results
(base64 melodies, results without a uri) still parse."""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import wave
from pathlib import Path
from typing import Any

import pytest
import redis

import pipeline
from pipeline.client.resolve import resolve
from pipeline.config.schema import Settings, StorageSettings
from pipeline.contract.jobs import GenerationRequest, JobResult, MelodyInput, queue_for
from pipeline.errors import InvalidRequest
from pipeline.infra.keys import CLAIM_PREFIX, queue_list_keys
from pipeline.infra.storage_backends import backend_for
from pipeline.quota.configured import store_for

pytestmark = pytest.mark.timeout(60)


def wav_bytes(seconds: float, rate: int = 32000) -> bytes:
    """A real mono 16-bit WAV of a 440 Hz tone (64 kB per second at 32 kHz)."""
    period = [int(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(rate // 40)]
    frames = struct.pack(f"<{len(period)}h", *period) * int(seconds * 40)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(frames)
    return out.getvalue()


def test_a_10_mb_melody_crosses_the_broker_as_a_uri(
        isolated_settings_env: Path, monkeypatch: pytest.MonkeyPatch, redis_url: str,
        s3_storage: StorageSettings) -> None:
    monkeypatch.setenv("MUSICGEN_BROKER__URL", redis_url)
    monkeypatch.setenv("MUSICGEN_DATABASE__URL", f"sqlite:///{isolated_settings_env}/q.db")
    storage_env = {"URL": s3_storage.url, "ENDPOINT_URL": s3_storage.endpoint_url,
                   "REGION": "us-east-1", "ADDRESSING_STYLE": "path",
                   "ACCESS_KEY_ID": s3_storage.access_key_id,
                   "SECRET_ACCESS_KEY": s3_storage.secret_access_key.get_secret_value()
                   if s3_storage.secret_access_key else ""}
    for key, value in storage_env.items():
        monkeypatch.setenv(f"MUSICGEN_STORAGE__{key}", str(value))
    settings = pipeline.load_settings()
    store_for(settings, migrate=True).close()
    melody = wav_bytes(164.0)
    assert len(melody) > 10 * 1024 * 1024

    producer = pipeline.Producer(settings)
    client = redis.Redis.from_url(redis_url)
    handle = producer.enqueue(GenerationRequest(prompt="a tune", model="tiny-melody",
                                                duration=1.0, melody=melody))
    found: list[Any] = []
    try:
        found = [raw for key in queue_list_keys(queue_for("tiny-melody"))
                 for raw in client.lrange(key, 0, -1)
                 if json.loads(raw)["headers"]["id"] == handle.id]
        assert len(found) == 1
        assert len(found[0]) < 4096, len(found[0])  # the whole broker message, envelope and all
        args = json.loads(base64.b64decode(json.loads(found[0])["body"]))[0]
        uri = args[0]["melody"]["uri"]
        assert args[0]["melody"]["owned"] is True and args[0]["melody"]["data_b64"] is None
        assert uri.startswith(f"{s3_storage.url}/inputs/{handle.id}-")
        backend = backend_for(settings.storage)
        [stored] = [o for o in backend.list("inputs/")]
        assert stored.size == len(melody) and backend.uri(stored.key) == uri
    finally:
        for key in queue_list_keys(queue_for("tiny-melody")):
            for raw in found:
                client.lrem(key, 0, raw)
        client.delete(f"celery-task-meta-{handle.id}", CLAIM_PREFIX + handle.id)
        client.close()
        producer.quota.close()


def test_a_melody_uri_is_held_to_the_allowlists() -> None:
    settings = Settings(storage=StorageSettings(url="s3://our-bucket/results",
                                                melody_url_hosts=["cdn.example.com"]))

    def melody_of(uri: str) -> MelodyInput | None:
        request = GenerationRequest(prompt="x", model="tiny-melody", duration=1.0, melody=uri)
        return resolve(request, settings, job_id="j").melody

    ours = melody_of("s3://our-bucket/uploads/theme.mp3")
    assert ours == MelodyInput(uri="s3://our-bucket/uploads/theme.mp3", suffix=".mp3")
    assert ours is not None and ours.owned is False  # the caller's: never deleted by us
    assert melody_of("https://cdn.example.com/a/theme.flac") is not None
    for uri in ("s3://someone-else/theme.mp3", "https://169.254.169.254/theme.wav",
                "https://cdn.example.com.evil.net/theme.wav"):
        with pytest.raises(InvalidRequest) as refused:
            melody_of(uri)
        assert refused.value.field == "melody", uri
    for uri in ("http://cdn.example.com/theme.wav", "ftp://cdn.example.com/theme.wav",
                "https://user:pw@cdn.example.com/theme.wav"):
        with pytest.raises(InvalidRequest) as bad_shape:
            GenerationRequest(prompt="x", melody=uri)
        assert bad_shape.value.field == "melody", uri
    assert isinstance(GenerationRequest(prompt="x", melody="relative/theme.wav").melody, Path)


def test_old_messages_and_results_still_parse(tmp_path: Path) -> None:
    legacy = MelodyInput.model_validate({"data_b64": base64.b64encode(b"RIFF").decode()})
    assert legacy.materialise(tmp_path).read_bytes() == b"RIFF"
    old = {"job_id": "j", "output_path": "/srv/out/j.wav", "sidecar_path": "/srv/out/j.wav.json",
           "format": "wav", "duration": 1.0, "sample_rate": 32000, "channels": 1,
           "bit_depth": 16, "loudness_lufs": -14.0, "peak_dbfs": -1.0, "model": "tiny",
           "seed": 1, "worker": "w", "timings": {}}
    result = JobResult.model_validate(old)
    assert result.uri == "file:///srv/out/j.wav" and result.download_url is None
    with pytest.raises(ValueError, match="exactly one"):
        MelodyInput.model_validate({"uri": "s3://b/k.wav", "path": "/srv/k.wav"})
