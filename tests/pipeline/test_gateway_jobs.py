"""The gateway's /v1/jobs routes with no worker (jobs just queue): API keys, ownership, the
error mapping (status, code, field, Retry-After), body and upload limits, and the audio of a
finished job, whose result a test stores in the result backend as a worker would."""

from __future__ import annotations

import io
import threading
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from pipeline.contract.jobs import JobResult

if TYPE_CHECKING:  # a plugin (below), not an import: pytest must rewrite its asserts first
    from .gateway_conftest import Gateway

pytest_plugins = ["tests.pipeline.gateway_conftest"]
pytestmark = pytest.mark.timeout(60)


def _wav(seconds: float = 1.5, rate: int = 16000) -> bytes:
    """A real mono 16-bit WAV (a ramp), enough for ffprobe and the melody checks."""
    frames = int(seconds * rate)
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(((i * 37) % 20000 - 10000).to_bytes(2, "little", signed=True)
                               for i in range(frames)))
    return out.getvalue()


def _error(response: Any, status: int, code: str, field: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    if field is not None:
        assert body["field"] == field, body
    return body


def test_a_request_needs_a_known_active_key(gateway: Gateway) -> None:
    client = gateway.client
    missing = client.get("/v1/jobs/some-job")
    _error(missing, 401, "unauthorized", "Authorization")
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    for header in ("Bearer not-a-key", "Bearer mgp_00000000_" + "A" * 43, "Basic dXNlcjpwdw=="):
        _error(client.get("/v1/jobs/some-job", headers={"Authorization": header}), 401,
               "unauthorized")
    # Revoked before its first use (a gateway admits a key it checked in the last 10 s).
    new = gateway.keys.create("dora")
    assert gateway.keys.revoke(new.info.label) is not None
    _error(client.get("/v1/jobs/some-job", headers={"Authorization": f"Bearer {new.key}"}),
           401, "unauthorized")
    # A good key gets past auth: the job is simply unknown.
    _error(client.get("/v1/jobs/some-job", headers=gateway.key("dora")), 404, "job_not_found")


def test_a_key_sees_only_its_own_jobs_and_cancels_them(gateway: Gateway) -> None:
    client, alice, bob = gateway.client, gateway.key("alice"), gateway.key("bob")
    made = client.post("/v1/jobs", json={"prompt": "rain on a tin roof", "duration": 2,
                                         "job_id": "alice-1"}, headers=alice)
    assert made.status_code == 202, made.text
    assert made.headers["Location"] == "/v1/jobs/alice-1"
    assert made.json()["status"] == "queued"
    assert gateway.producer.quota.ledger()[0]["user_id"] == "alice"  # charged to the key's user
    assert client.get("/v1/jobs/alice-1", headers=alice).json()["status"] == "queued"
    # Bob's key reaches nothing of it, not even its existence.
    for method, path in (("GET", ""), ("GET", "/events"), ("GET", "/audio"), ("DELETE", "")):
        _error(client.request(method, f"/v1/jobs/alice-1{path}", headers=bob), 404,
               "job_not_found", "job_id")
    _error(client.post("/v1/jobs", json={"prompt": "mine now", "job_id": "alice-1"},
                       headers=bob), 409, "job_id_conflict", "job_id")
    _error(client.get("/v1/jobs/alice-1/audio", headers=alice), 409, "job_not_finished")

    cancelled = client.delete("/v1/jobs/alice-1", headers=alice).json()
    assert cancelled == {"id": "alice-1", "cancelled": True, "status": "cancelled"}
    view = client.get("/v1/jobs/alice-1", headers=alice).json()
    assert view["status"] == "cancelled" and view["error"]["code"] == "job_cancelled"
    assert client.delete("/v1/jobs/alice-1", headers=alice).json()["cancelled"] is False
    _error(client.get("/v1/jobs/alice-1/audio", headers=alice), 409, "job_cancelled")


@pytest.mark.parametrize(("body", "status", "code", "field"), [
    ({"prompt": "x", "duration": 200}, 422, "invalid_request", "duration"),
    ({"prompt": "x", "user_id": "someone-else"}, 422, "invalid_request", "user_id"),
    ({"prompt": "x", "model": "musicgen-smal"}, 422, "model_not_found", "model"),
    ({"prompt": "x", "format": "mp3", "bit_depth": 24}, 422, "unsupported_option", "bit_depth"),
    ({"prompt": "\x07\x08"}, 422, "invalid_request", "prompt"),
    ({"prompt": "x", "priority": 10}, 422, "invalid_request", "priority"),
    (b"{not json", 422, "invalid_request", "request"),
    # Checked before the webhook's host: an empty filter, an unknown event, no webhook_url.
    ({"prompt": "x", "webhook_url": "https://hooks.example.com/x", "webhook_events_filter": []},
     422, "invalid_request", "webhook_events_filter"),
    ({"prompt": "x", "webhook_url": "https://hooks.example.com/x",
      "webhook_events_filter": ["completed", "done"]}, 422, "invalid_request",
     "webhook_events_filter"),
    ({"prompt": "x", "webhook_events_filter": ["start"]}, 422, "invalid_request",
     "webhook_events_filter"),
])
def test_a_refused_request_names_its_field(gateway: Gateway, body: Any, status: int, code: str,
                                           field: str) -> None:
    headers = {**gateway.key("erin"), "Content-Type": "application/json"}
    if isinstance(body, bytes):
        response = gateway.client.post("/v1/jobs", content=body, headers=headers)
    else:
        response = gateway.client.post("/v1/jobs", json=body, headers=headers)
    _error(response, status, code, field)
    assert gateway.producer.quota.ledger() == []  # nothing was charged


def test_other_content_types_are_refused(gateway: Gateway) -> None:
    response = gateway.client.post("/v1/jobs", content=b"prompt=x",
                                   headers={**gateway.key("erin"),
                                            "Content-Type": "application/x-www-form-urlencoded"})
    _error(response, 415, "unsupported_media_type", "Content-Type")


def test_quota_and_key_rate_answer_429_with_retry_after(make_gateway: Any) -> None:
    gateway = make_gateway(rate="2/minute")
    gateway.producer.quota.set_quota("frank", tier="free", daily=1)
    frank = gateway.key("frank")
    assert gateway.client.post("/v1/jobs", json={"prompt": "one"}, headers=frank).status_code == 202
    over = gateway.client.post("/v1/jobs", json={"prompt": "two"}, headers=frank)
    body = _error(over, 429, "quota_exceeded")
    assert body["details"]["limit"] == "daily"
    assert 0 < int(over.headers["Retry-After"]) <= 86400 + 3600  # until the day's reset
    # The third request of this key within the minute is over the key's rate.
    limited = gateway.client.get("/v1/jobs/whatever", headers=frank)
    _error(limited, 429, "rate_limited")
    assert 0 < int(limited.headers["Retry-After"]) <= 60
    # Per key: another key of another user is not held back.
    _error(gateway.client.get("/v1/jobs/whatever", headers=gateway.key("gina")), 404,
           "job_not_found")


def _uploads(gateway: Gateway) -> list[Path]:
    return sorted(Path(gateway.settings.storage.temp_dir).glob("upload-*"))


def test_body_and_upload_limits_are_checked_while_streaming(make_gateway: Any) -> None:
    gateway = make_gateway(max_body_kb=1, max_upload_mb=0.01)  # 1 KB JSON, ~10 KB melody
    key = {**gateway.key("hana")}
    big = {"prompt": "p" * 2000}
    _error(gateway.client.post("/v1/jobs", json=big, headers=key), 413, "payload_too_large",
           "request")

    def chunks(data: bytes) -> Iterator[bytes]:  # no Content-Length: only the stream tells
        for i in range(0, len(data), 512):
            yield data[i:i + 512]

    streamed = gateway.client.post("/v1/jobs", content=chunks(b'{"prompt": "' + b"p" * 2000 + b'"}'),
                                   headers={**key, "Content-Type": "application/json"})
    _error(streamed, 413, "payload_too_large", "request")

    melody = _wav(seconds=2.0)  # 64 KB: over the 10 KB limit
    files = {"request": (None, b'{"prompt": "hum", "model": "tiny-melody"}', "application/json"),
             "melody": ("tune.wav", melody, "audio/wav")}
    _error(gateway.client.post("/v1/jobs", files=files, headers=key), 413, "payload_too_large",
           "melody")
    # The same, streamed in small chunks without a length, so the parser is what stops it.
    boundary = "gwtest"
    raw = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"request\"\r\n\r\n"
           '{"prompt": "hum", "model": "tiny-melody"}\r\n'
           f"--{boundary}\r\nContent-Disposition: form-data; name=\"melody\"; "
           "filename=\"tune.wav\"\r\nContent-Type: audio/wav\r\n\r\n").encode() + melody + \
        f"\r\n--{boundary}--\r\n".encode()
    stopped = gateway.client.post("/v1/jobs", content=chunks(raw),
                                  headers={**key, "Content-Type":
                                           f"multipart/form-data; boundary={boundary}"})
    _error(stopped, 413, "payload_too_large", "melody")
    assert _uploads(gateway) == []  # a refused upload leaves no file behind
    assert gateway.producer.quota.ledger() == []


def test_a_melody_upload_becomes_a_file_the_job_reads(gateway: Gateway) -> None:
    melody = _wav()
    key = gateway.key("iris")
    files = {"request": (None, b'{"prompt": "hum along", "model": "tiny-melody", "duration": 1}',
                         "application/json"),
             "melody": ("../../tune.wav", melody, "audio/wav")}
    made = gateway.client.post("/v1/jobs", files=files, headers=key)
    assert made.status_code == 202, made.text
    [upload] = _uploads(gateway)
    assert upload.parent == Path(gateway.settings.storage.temp_dir).resolve()  # not ../..
    assert upload.suffix == ".wav" and upload.read_bytes() == melody
    # A melody the model cannot take is refused, and its upload removed.
    files["request"] = (None, b'{"prompt": "hum", "model": "tiny"}', "application/json")
    _error(gateway.client.post("/v1/jobs", files=files, headers=key), 422,
           "unsupported_option", "melody")
    # Not audio at all: ffprobe says so before anything is queued.
    files["request"] = (None, b'{"prompt": "hum", "model": "tiny-melody"}', "application/json")
    files["melody"] = ("tune.wav", b"RIFF but not really" * 50, "audio/wav")
    _error(gateway.client.post("/v1/jobs", files=files, headers=key), 422, "invalid_request",
           "melody")
    _error(gateway.client.post("/v1/jobs", files={"prompt": (None, b"x")}, headers=key), 422,
           "invalid_request", "request")
    assert _uploads(gateway) == [upload]


def _finish(gateway: Gateway, job_id: str, audio: bytes, **extra: Any) -> Path:
    """Store a succeeded result for ``job_id`` in the result backend, as a worker does."""
    out = Path(gateway.settings.storage.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{job_id}.wav"
    path.write_bytes(audio)
    result = {"job_id": job_id, "output_path": str(path), "sidecar_path": str(path) + ".json",
              "format": "wav", "duration": 1.5, "sample_rate": 16000, "channels": 1,
              "bit_depth": 16, "loudness_lufs": -14.0, "peak_dbfs": -1.0, "model": "tiny",
              "seed": 7, "worker": "w1@test", "timings": {}, **extra}
    JobResult.model_validate(result)  # what the handle will read back
    gateway.producer.app.backend.store_result(job_id, result, "SUCCESS")
    return path


def test_the_audio_of_a_finished_job_streams_with_range_support(gateway: Gateway) -> None:
    client, key = gateway.client, gateway.key("jo")
    assert client.post("/v1/jobs", json={"prompt": "done soon", "job_id": "jo-1"},
                       headers=key).status_code == 202
    audio = _wav()
    _finish(gateway, "jo-1", audio)
    view = client.get("/v1/jobs/jo-1", headers=key).json()
    assert view["status"] == "succeeded" and view["audio_url"] == "/v1/jobs/jo-1/audio"
    assert view["result"]["format"] == "wav" and view["result"]["seed"] == 7
    assert "output_path" not in view["result"] and "uri" not in view["result"]

    whole = client.get("/v1/jobs/jo-1/audio", headers=key)
    assert whole.status_code == 200 and whole.content == audio
    assert whole.headers["content-type"] == "audio/wav"
    assert whole.headers["accept-ranges"] == "bytes"
    part = client.get("/v1/jobs/jo-1/audio", headers={**key, "Range": "bytes=10-109"})
    assert part.status_code == 206 and part.content == audio[10:110]
    assert part.headers["content-range"] == f"bytes 10-109/{len(audio)}"
    tail = client.get("/v1/jobs/jo-1/audio", headers={**key, "Range": "bytes=-4"})
    assert tail.status_code == 206 and tail.content == audio[-4:]
    outside = client.get("/v1/jobs/jo-1/audio", headers={**key, "Range": f"bytes={len(audio)}-"})
    _error(outside, 416, "range_not_satisfiable", "Range")
    assert outside.headers["content-range"] == f"bytes */{len(audio)}"
    # A Range header that does not parse is ignored (RFC 9110): the whole file.
    odd = client.get("/v1/jobs/jo-1/audio", headers={**key, "Range": "pages=1-2"})
    assert odd.status_code == 200 and odd.content == audio


def test_a_result_with_a_presigned_url_redirects_there(gateway: Gateway) -> None:
    if "download_url" not in JobResult.model_fields:
        pytest.skip("JobResult has no download_url (object storage, issue 13, not merged)")
    key = gateway.key("kim")
    gateway.client.post("/v1/jobs", json={"prompt": "in the bucket", "job_id": "kim-1"},
                        headers=key)
    url = "https://bucket.example.com/outputs/kim-1.wav?X-Amz-Signature=abc"
    fresh = ({"download_expires_at": time.time() + 3600}  # not due for signing again
             if "download_expires_at" in JobResult.model_fields else {})
    _finish(gateway, "kim-1", b"RIFF", download_url=url, **fresh)
    moved = gateway.client.get("/v1/jobs/kim-1/audio", headers=key, follow_redirects=False)
    assert moved.status_code == 307 and moved.headers["location"] == url


def test_an_idempotency_key_replays_the_same_request_and_refuses_another(gateway: Gateway) -> None:
    client, alice, bob = gateway.client, gateway.key("alice"), gateway.key("bob")
    body = {"prompt": "slow cello drone", "duration": 2}
    first = client.post("/v1/jobs", json=body, headers={**alice, "Idempotency-Key": "order-7"})
    assert first.status_code == 202 and "Idempotent-Replayed" not in first.headers, first.text
    again = client.post("/v1/jobs", json=body, headers={**alice, "Idempotency-Key": "order-7"})
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Location"] == first.headers["Location"]
    _error(client.post("/v1/jobs", json={**body, "duration": 3},
                       headers={**alice, "Idempotency-Key": "order-7"}),
           409, "job_id_conflict", "job_id")
    # Keys are the user's own: bob's "order-7" is another job, not a conflict with alice's.
    other = client.post("/v1/jobs", json=body, headers={**bob, "Idempotency-Key": "order-7"})
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert [r["user_id"] for r in gateway.producer.quota.ledger()] == ["alice", "bob"]
    _error(client.post("/v1/jobs", json={**body, "job_id": "mine"},
                       headers={**alice, "Idempotency-Key": "order-8"}),
           422, "invalid_request", "Idempotency-Key")
    _error(client.post("/v1/jobs", json=body, headers={**alice, "Idempotency-Key": "a b"}),
           422, "invalid_request", "Idempotency-Key")


def test_a_job_carries_its_times_request_and_urls(gateway: Gateway) -> None:
    client, key = gateway.client, gateway.key("lee")
    made = client.post("/v1/jobs", json={"prompt": "tape hiss", "job_id": "lee-1"}, headers=key)
    assert made.status_code == 202, made.text
    view = made.json()
    assert view["urls"] == {"get": "/v1/jobs/lee-1", "cancel": "/v1/jobs/lee-1",
                            "events": "/v1/jobs/lee-1/events", "audio": None,
                            "partial": None, "stream": None}
    assert view["created_at"] is not None and view["completed_at"] is None
    assert view["request"]["prompt"] == "tape hiss"
    assert view["request"]["duration"] == gateway.settings.generation.default_duration
    _finish(gateway, "lee-1", _wav())
    done = client.get("/v1/jobs/lee-1", headers=key).json()
    assert done["urls"]["audio"] == done["audio_url"] == "/v1/jobs/lee-1/audio"


def test_the_key_lists_its_own_jobs_newest_first_page_by_page(gateway: Gateway) -> None:
    client, ann, ben = gateway.client, gateway.key("ann"), gateway.key("ben")
    for n in range(3):
        assert client.post("/v1/jobs", json={"prompt": f"take {n}", "job_id": f"ann-{n}"},
                           headers=ann).status_code == 202
    client.post("/v1/jobs", json={"prompt": "not ann's", "job_id": "ben-0"}, headers=ben)
    client.delete("/v1/jobs/ann-1", headers=ann)
    first = client.get("/v1/jobs", params={"limit": 2}, headers=ann)
    assert first.status_code == 200, first.text
    page = first.json()
    assert [j["id"] for j in page["jobs"]] == ["ann-2", "ann-1"] and page["next_cursor"]
    assert page["jobs"][0]["request"]["prompt"] == "take 2"
    assert page["jobs"][0]["urls"]["events"] == "/v1/jobs/ann-2/events"
    rest = client.get("/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]},
                      headers=ann).json()
    assert [j["id"] for j in rest["jobs"]] == ["ann-0"] and rest["next_cursor"] is None
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}, headers=ann).json()
    assert [j["id"] for j in cancelled["jobs"]] == ["ann-1"]
    assert [j["id"] for j in client.get("/v1/jobs", headers=ben).json()["jobs"]] == ["ben-0"]
    _error(client.get("/v1/jobs", params={"cursor": "not-a-cursor"}, headers=ann),
           422, "invalid_request", "cursor")
    assert client.get("/v1/jobs").status_code == 401


def test_prefer_wait_answers_with_the_finished_job_or_202(gateway: Gateway) -> None:
    client, key = gateway.client, gateway.key("max")
    # No worker here: the job stays queued, and the answer comes when the wait is over.
    queued = client.post("/v1/jobs", json={"prompt": "queued"},
                         headers={**key, "Prefer": "respond-async, wait=1"})
    assert queued.status_code == 202 and queued.headers["Preference-Applied"] == "wait=1"
    assert queued.json()["status"] == "queued"

    def finish_once_queued() -> None:  # what a worker does, once the job exists
        deadline = time.monotonic() + 30
        while gateway.producer.registry.owner("max-2") is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        _finish(gateway, "max-2", _wav())

    finisher = threading.Thread(target=finish_once_queued)
    finisher.start()
    done = client.post("/v1/jobs", json={"prompt": "soon", "job_id": "max-2"},
                       headers={**key, "Prefer": "wait=30"})
    finisher.join()
    assert done.status_code == 201, done.text
    assert done.json()["status"] == "succeeded" and done.headers["Location"] == "/v1/jobs/max-2"
    ignored = client.post("/v1/jobs", json={"prompt": "no wait"},
                          headers={**key, "Prefer": "wait=soon"})
    assert ignored.status_code == 202 and "Preference-Applied" not in ignored.headers


def test_ratelimit_headers_and_the_keys_usage(make_gateway: Any) -> None:
    gateway = make_gateway(rate="3/minute")
    gateway.producer.quota.set_quota("hal", tier="free", daily=5)
    hal = gateway.key("hal")
    made = gateway.client.post("/v1/jobs", json={"prompt": "one", "duration": 4}, headers=hal)
    assert made.status_code == 202
    assert (made.headers["RateLimit-Limit"], made.headers["RateLimit-Remaining"]) == ("3", "2")
    assert 0 < int(made.headers["RateLimit-Reset"]) <= 60
    usage = gateway.client.get("/v1/usage", headers=hal)
    assert usage.status_code == 200, usage.text
    assert usage.headers["RateLimit-Remaining"] == "1"
    body = usage.json()
    assert (body["user_id"], body["tier"], body["rate"]) == ("hal", "free", "3/minute")
    day = body["jobs"]["day"]
    assert (day["used"], day["limit"], day["remaining"]) == (1, 5, 4)
    assert body["jobs"]["month"]["used"] == 1 and day["resets_at"]
    assert body["audio_seconds"]["day"]["used"] == 4.0  # reserved while the job is open
    # Past the rate: a 429 that says so in the same headers (a stream's answer gets them too).
    gateway.client.get("/v1/jobs", headers=hal)
    over = gateway.client.get("/v1/usage", headers=hal)
    _error(over, 429, "rate_limited")
    assert over.headers["RateLimit-Remaining"] == "0" and over.headers["RateLimit-Limit"] == "3"
    assert gateway.client.get("/v1/usage").status_code == 401
