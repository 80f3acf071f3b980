"""Webhooks: Standard Webhooks signatures (the spec's own example), verify's refusals, one POST
to a real local receiver per outcome, and the URL checks (shape and host allowlist)."""

from __future__ import annotations

import json
import socket
import time

import pytest
from pydantic import ValidationError
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from pipeline import webhooks
from pipeline.client.resolve import resolve
from pipeline.config.schema import ApiSettings, Settings, WebhookSettings
from pipeline.contract.jobs import GenerationRequest
from pipeline.contract.user_context import UserContext
from pipeline.errors import InvalidRequest, UnsupportedOption, WebhookSignatureInvalid
from tests.webhook_receiver import receiver

pytestmark = pytest.mark.timeout(30)

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


def test_the_signature_is_the_standard_webhooks_one() -> None:
    # The example of the Standard Webhooks specification (and of its reference libraries).
    body = b'{"test": 2432232314}'
    assert webhooks.signature(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_text_secret_signs_as_its_utf8_bytes_for_the_reference_package_too() -> None:
    # Any text but whsec_<base64> is its UTF-8 bytes (the package alone would base64-decode
    # text): a receiver gives the package those bytes.
    text = "a-plain-text-secret-of-24"
    event = webhooks.event("j", "failed", error_code="gpu_oom")
    body = webhooks.body_of(event)
    with receiver() as hook:
        assert webhooks.post(hook.url, "msg_j_failed", event, text, timeout_s=5).ok
        [got] = hook.received
    assert got.body == body
    assert Webhook(text.encode()).verify(got.body, got.headers) == webhooks.verify(
        got.body, got.headers, text)
    with pytest.raises(WebhookVerificationError):
        Webhook(text.encode()).verify(got.body.replace(b"gpu_oom", b"none"), got.headers)


def test_verify_accepts_what_was_signed_and_nothing_else() -> None:
    event = webhooks.event("job-1", "failed", error_code="gpu_oom", at=1_700_000_000)
    body = webhooks.body_of(event)
    headers = webhooks.headers(SECRET, "msg_job-1_failed", body)
    assert webhooks.verify(body, headers, SECRET) == event
    assert event["type"] == "job.failed"
    assert event["data"]["error"] == {"code": "gpu_oom", "message": "gpu_oom"}
    upper = {k.upper(): v for k, v in headers.items()}
    assert webhooks.verify(body, upper, SECRET) == event  # header names in any case

    cases = {
        "body": (body.replace(b"gpu_oom", b"none"), headers, SECRET, "webhook-signature"),
        "secret": (body, headers, "another-secret-of-sixteen", "webhook-signature"),
        "id": (body, {**headers, "webhook-id": "msg_other"}, SECRET, "webhook-signature"),
        "old": (body, webhooks.headers(SECRET, "m", body, now=time.time() - 3600), SECRET,
                "webhook-timestamp"),
        "unsigned": (body, {"webhook-id": "m", "webhook-timestamp": "1"}, SECRET,
                     "webhook-signature"),
    }
    for name, (b, h, s, field) in cases.items():
        with pytest.raises(WebhookSignatureInvalid) as refused:
            webhooks.verify(b, h, s)
        assert refused.value.field == field, name


def test_one_post_per_outcome_against_a_real_receiver() -> None:
    event = webhooks.event("job-2", "succeeded", result={"format": "wav", "duration": 1.0})
    with receiver([500, 404]) as hook:
        failed = webhooks.post(hook.url, "msg_2", event, SECRET, timeout_s=5)
        refused = webhooks.post(hook.url, "msg_2", event, SECRET, timeout_s=5)
        delivered = webhooks.post(hook.url, "msg_2", event, SECRET, timeout_s=5)
        assert (failed.ok, failed.retryable, failed.status) == (False, True, 500)
        assert (refused.ok, refused.retryable, refused.status) == (False, False, 404)
        assert (delivered.ok, delivered.status) == (True, 200)
        last = hook.received[-1]
        assert webhooks.verify(last.body, last.headers, SECRET)["data"]["job_id"] == "job-2"
        assert last.path == "/hooks/musicgen" and last.headers["content-type"] == "application/json"


def test_the_event_is_the_public_job_view() -> None:
    result = {"job_id": "j", "uri": "s3://bucket/j.wav", "output_path": None,
              "sidecar_path": None, "download_url": "https://bucket.example/j.wav?sig=1",
              "format": "wav", "duration": 2.0, "seed": 3}
    data = webhooks.event("j", "succeeded", result=result,
                          public_url="https://music.example.com/base")["data"]
    assert data == {"job_id": "j", "status": "succeeded", "error": None,
                    "result": {"job_id": "j", "download_url": "https://bucket.example/j.wav?sig=1",
                               "format": "wav", "duration": 2.0, "seed": 3},
                    "audio_url": "https://music.example.com/base/v1/jobs/j/audio"}
    assert webhooks.event("j", "succeeded", result=result)["data"]["audio_url"] == \
        "/v1/jobs/j/audio"  # no api.public_url: the path on the gateway
    failed = webhooks.event("j", "timeout", error_code="timeout", error_message="too slow",
                            public_url="https://music.example.com")["data"]
    assert (failed["error"], failed["result"], failed["audio_url"]) == (
        {"code": "timeout", "message": "too slow"}, None, None)


@pytest.mark.parametrize("url", ["https://music.example.com/", "ftp://music.example.com",
                                 "https://music.example.com/v1?x=1", "music.example.com",
                                 "https://user@music.example.com", "https://music.example.com#a"])
def test_a_public_url_of_the_wrong_shape_is_refused(url: str) -> None:
    with pytest.raises(ValidationError) as refused:
        ApiSettings(public_url=url)
    assert refused.value.errors()[0]["loc"] == ("public_url",)


def test_a_redirect_is_never_followed() -> None:
    with receiver(redirect_to="http://169.254.169.254/latest/meta-data/") as hook:
        outcome = webhooks.post(hook.url, "m", webhooks.event("j", "cancelled"), SECRET,
                                timeout_s=5)
    assert (outcome.ok, outcome.retryable, outcome.status) == (False, False, 307)
    assert len(hook.received) == 1


def test_an_unreachable_receiver_is_worth_another_try() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = webhooks.post(f"http://127.0.0.1:{port}/x", "m", webhooks.event("j", "failed"),
                            SECRET, timeout_s=2)
    assert (outcome.ok, outcome.retryable, outcome.status) == (False, True, None)
    assert outcome.error


@pytest.mark.parametrize("url", ["ftp://hooks.example.com/x", "https://user:pw@hooks.example.com/x",
                                 "https:///x", "https://hooks.example.com/a b",
                                 "file:///etc/passwd"])
def test_a_webhook_url_of_the_wrong_shape_is_refused(url: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        GenerationRequest(prompt="x", webhook_url=url)
    assert refused.value.field == "webhook_url"


def test_only_allowed_hosts_get_webhooks() -> None:
    hooks = WebhookSettings(allowed_hosts=["hooks.example.com", "*.callbacks.example.org"],
                            secret=SECRET)  # type: ignore[arg-type]
    settings = Settings(webhooks=hooks)
    for allowed in ("https://hooks.example.com/done", "http://a.callbacks.example.org:8080/x"):
        spec = resolve(GenerationRequest(prompt="x", webhook_url=allowed), settings, job_id="j")
        assert spec.webhook_url == allowed
        assert len(json.dumps(spec.model_dump(mode="json"))) < 2048
    for refused_url in ("http://127.0.0.1:6379/", "http://169.254.169.254/latest",
                        "https://callbacks.example.org/x", "https://hooks.example.com.evil.net/"):
        with pytest.raises(InvalidRequest) as refused:
            resolve(GenerationRequest(prompt="x", webhook_url=refused_url), settings, job_id="j")
        assert refused.value.field == "webhook_url"
    with pytest.raises(UnsupportedOption) as off:  # no allowlist: webhooks are off
        resolve(GenerationRequest(prompt="x", webhook_url="https://hooks.example.com/done"),
                Settings(), job_id="j")
    assert off.value.field == "webhook_url"


def test_the_webhooks_flag_decides_per_user() -> None:
    hooks = WebhookSettings(allowed_hosts=["hooks.example.com"], secret=SECRET)  # type: ignore[arg-type]
    settings = Settings.model_validate({"webhooks": hooks.model_dump(),
                                        "features": {"webhooks": {"allow": ["ops"], "percentage": 0}}})
    request = GenerationRequest(prompt="x", webhook_url="https://hooks.example.com/done")
    spec = resolve(request, settings, job_id="j", user=UserContext("ops", "free"))
    assert spec.webhook_url == "https://hooks.example.com/done"
    with pytest.raises(UnsupportedOption) as off:
        resolve(request, settings, job_id="j", user=UserContext("someone", "free"))
    assert off.value.field == "webhook_url" and "switched off for this user" in off.value.message


@pytest.mark.parametrize(("events", "url"), [
    ([], "https://hooks.example.com/done"),
    (["start", "finished"], "https://hooks.example.com/done"),
    (["progress", 1], "https://hooks.example.com/done"),
    (["start"], None),  # events with nowhere to send them
])
def test_a_webhook_events_filter_that_cannot_be_met_is_refused(events: list[object],
                                                                url: str | None) -> None:
    with pytest.raises(InvalidRequest) as refused:
        GenerationRequest(prompt="x", webhook_url=url, webhook_events_filter=events)
    assert (refused.value.code, refused.value.field) == ("invalid_request",
                                                         "webhook_events_filter")


def test_the_events_filter_travels_in_the_job_payload() -> None:
    settings = Settings(webhooks=WebhookSettings(allowed_hosts=["hooks.example.com"],
                                                 secret=SECRET))  # type: ignore[arg-type]
    url = "https://hooks.example.com/done"
    asked = resolve(GenerationRequest(prompt="x", webhook_url=url,
                                      webhook_events_filter=["partial", "start", "partial"]),
                    settings, job_id="j")
    assert asked.model_dump(mode="json")["webhook_events_filter"] == ["partial", "start"]
    plain = resolve(GenerationRequest(prompt="x", webhook_url=url), settings, job_id="j")
    assert plain.webhook_events_filter == ["completed"]  # the default: the job's end only


def test_the_events_before_the_end_carry_the_same_data_keys() -> None:
    end = webhooks.event("j", "succeeded", result={"format": "wav"})["data"]
    started = webhooks.started_event("j", attempt=2)
    progress = webhooks.progress_event("j", 0.456789, "generating")
    partial = webhooks.partial_event("j", window=1, windows=3, seconds=30.0,
                                     public_url="https://music.example.com")
    assert [e["type"] for e in (started, progress, partial)] == [
        "job.started", "job.progress", "job.partial"]
    for each in (started, progress, partial):
        assert set(end) <= set(each["data"]) and each["data"]["audio_url"] is None
    assert progress["data"]["progress"] == {"fraction": 0.4568, "message": "generating"}
    assert partial["data"]["partial"] == {"window": 1, "windows": 3, "seconds": 30.0}
    assert partial["data"]["partial_url"] == "https://music.example.com/v1/jobs/j/partial"
    assert started["data"]["attempt"] == 2
