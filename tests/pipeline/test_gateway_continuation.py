"""A clip to continue over HTTP (issue 25): a multipart ``continuation`` file part beside the
``request`` JSON, queued without a prompt, and every refusal naming its field with the upload
removed again. No worker: jobs just queue (tests/pipeline/test_gateway_jobs.py's setting)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import pytest

from tests.pipeline.test_gateway_jobs import _error, _uploads, _wav

if TYPE_CHECKING:
    from .gateway_conftest import Gateway

pytest_plugins = ["tests.pipeline.gateway_conftest"]
pytestmark = pytest.mark.timeout(60)


def _files(request: dict[str, Any], clip: bytes, **more: Any) -> dict[str, Any]:
    return {"request": (None, json.dumps(request).encode(), "application/json"),
            "continuation": ("clip.wav", clip, "audio/wav"), **more}


def test_a_continuation_upload_is_queued_without_a_prompt(gateway: Gateway) -> None:
    clip = _wav(seconds=2.0)
    key = gateway.key("cleo")
    made = gateway.client.post("/v1/jobs", headers=key, files=_files(
        {"model": "tiny", "duration": 4, "continuation_end": 1.5,
         "continuation_included": False}, clip))
    assert made.status_code == 202, made.text
    request = made.json()["request"]
    assert request["continuation"] is True  # uploaded: the job holds it, the caller sees a flag
    assert (request["continuation_start"], request["continuation_end"],
            request["continuation_included"]) == (0.0, 1.5, False)
    assert request["prompt"] == ""
    [upload] = _uploads(gateway)
    assert upload.read_bytes() == clip and upload.suffix == ".wav"


@pytest.mark.parametrize(("request_json", "extra", "status", "code", "field"), [
    ({"model": "tiny", "duration": 4, "continuation_end": 2.5}, {}, 422, "invalid_request",
     "continuation_end"),
    ({"model": "tiny", "duration": 4, "continuation_start": 1.0, "continuation_end": 0.5}, {},
     422, "invalid_request", "continuation_end"),
    ({"model": "tiny", "duration": 1.0}, {}, 422, "invalid_request", "duration"),  # included
    ({"model": "tiny-melody", "prompt": "x", "duration": 4},
     {"melody": ("tune.wav", _wav(), "audio/wav")}, 422, "unsupported_option", "continuation"),
])
def test_a_bad_continuation_upload_names_its_field_and_leaves_no_file(
        gateway: Gateway, request_json: dict[str, Any], extra: dict[str, Any], status: int,
        code: str, field: str) -> None:
    key = gateway.key("dev")
    _error(gateway.client.post("/v1/jobs", headers=key,
                               files=_files(request_json, _wav(seconds=2.0), **extra)),
           status, code, field)
    assert _uploads(gateway) == []


def test_span_fields_without_a_clip_and_unreadable_clips_are_refused(gateway: Gateway) -> None:
    key = gateway.key("ada")
    _error(gateway.client.post("/v1/jobs", headers=key, json={
        "prompt": "x", "continuation_start": 1.0}), 422, "invalid_request", "continuation_start")
    _error(gateway.client.post("/v1/jobs", headers=key, json={"duration": 2}), 422,
           "invalid_request", "prompt")
    _error(gateway.client.post("/v1/jobs", headers=key, files=_files(
        {"model": "tiny", "duration": 4}, b"RIFF but not really" * 50)), 422, "invalid_request",
        "continuation")
    _error(gateway.client.post("/v1/jobs", headers=key, files=_files(
        {"model": "tiny", "duration": 4}, b"")), 422, "invalid_request", "continuation")
    assert _uploads(gateway) == []


def test_a_continuation_past_the_upload_limit_is_413_on_its_part(make_gateway: Any) -> None:
    gateway = make_gateway(max_upload_mb=0.01)  # ~10 KB
    _error(gateway.client.post("/v1/jobs", headers=gateway.key("max"), files=_files(
        {"model": "tiny", "duration": 4}, _wav(seconds=2.0))), 413, "payload_too_large",
        "continuation")
    assert _uploads(gateway) == []
