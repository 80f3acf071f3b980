"""Signed URLs (pipeline/gateway/url_tokens.py) and the partial route, over the real app and a
real producer on the embedded broker: a test stores a job's states in the result backend as a
worker does. A browser's EventSource and <audio> send no Authorization header; the job view's
``signed_urls`` must open that job's events, audio and partial, and nothing else."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import redis

from pipeline.contract.outcome import Outcome
from pipeline.gateway.url_tokens import UrlSigner, signing_key
from pipeline.infra.keys import URL_TOKEN_KEY
from pipeline.quota.outcomes import record

from .test_gateway_jobs import _finish, _wav

if TYPE_CHECKING:
    from .gateway_conftest import Gateway

pytest_plugins = ["tests.pipeline.gateway_conftest"]
pytestmark = pytest.mark.timeout(60)


def _code(response: Any) -> tuple[int, str, str | None]:
    body = response.json()
    return response.status_code, body["code"], body.get("field")


def _enqueue(gateway: Gateway, key: dict[str, str], job_id: str) -> dict[str, Any]:
    response = gateway.client.post("/v1/jobs", json={"prompt": "x", "job_id": job_id},
                                   headers=key)
    assert response.status_code == 202, response.text
    view: dict[str, Any] = response.json()
    return view


def test_a_signed_url_opens_its_jobs_events_and_audio_without_a_header(gateway: Gateway) -> None:
    key = gateway.key("sam")
    queued = _enqueue(gateway, key, "sam-1")
    signed = queued["signed_urls"]
    assert signed["events"].startswith("/v1/jobs/sam-1/events?token=")
    assert signed["audio"] is None and signed["partial"] is None  # nothing to hear yet
    assert signed["expires_at"] > queued["created_at"]

    audio = _wav()
    _finish(gateway, "sam-1", audio)
    result = gateway.producer.get_job("sam-1").result()
    assert result is not None  # the ledger says so too, as the worker's settler writes it
    record(gateway.producer.quota, Outcome.succeeded("sam-1", result.model_dump(mode="json")))
    view = gateway.client.get("/v1/jobs/sam-1", headers=key).json()
    assert view["signed_urls"]["audio"].startswith("/v1/jobs/sam-1/audio?token=")
    # No Authorization header: what an <audio src> or an EventSource sends.
    heard = gateway.client.get(view["signed_urls"]["audio"])
    assert heard.status_code == 200 and heard.content == audio
    assert heard.headers["content-type"] == "audio/wav"
    ranged = gateway.client.get(view["signed_urls"]["audio"], headers={"Range": "bytes=0-9"})
    assert ranged.status_code == 206 and ranged.content == audio[:10]  # seeking works
    events = gateway.client.get(view["signed_urls"]["events"])
    assert events.status_code == 200 and '"status": "succeeded"' in events.text
    # The stream's final view is the GET's, signed URLs included (a page plays from it).
    assert '"audio": "/v1/jobs/sam-1/audio?token=' in events.text
    # The list carries them too (the page's history plays from them).
    listed = gateway.client.get("/v1/jobs", headers=key).json()["jobs"]
    assert listed[0]["id"] == "sam-1" and listed[0]["signed_urls"]["audio"]
    assert gateway.client.get(listed[0]["signed_urls"]["audio"]).content == audio


def test_a_token_opens_nothing_else(gateway: Gateway) -> None:
    key = gateway.key("tia")
    token = _enqueue(gateway, key, "tia-1")["signed_urls"]["events"].split("token=")[1]
    _enqueue(gateway, key, "tia-2")
    client = gateway.client
    # Another job of the same user, the job's own view, the list and a cancel: refused.
    assert _code(client.get(f"/v1/jobs/tia-2/events?token={token}")) == (401, "unauthorized",
                                                                          "token")
    assert _code(client.get(f"/v1/jobs/tia-1?token={token}"))[:2] == (401, "unauthorized")
    assert _code(client.get(f"/v1/jobs?token={token}"))[:2] == (401, "unauthorized")
    assert _code(client.delete(f"/v1/jobs/tia-1?token={token}"))[:2] == (401, "unauthorized")
    assert client.get("/v1/jobs/tia-1", headers=key).json()["status"] == "queued"
    # A forged user, a changed expiry, garbage: refused, naming the token.
    expires, user, signature = token.split(".")
    for bad in (f"{expires}.Ym9i.{signature}", f"{int(expires) + 3600}.{user}.{signature}",
                "not-a-token", f"{expires}.{user}.{signature[:-2]}xx"):
        assert _code(client.get(f"/v1/jobs/tia-1/events?token={bad}")) == (401, "unauthorized",
                                                                            "token"), bad


def test_a_token_expires(make_gateway: Any) -> None:
    signer = UrlSigner(lambda: b"k" * 32, ttl_s=60)
    token, expires = signer.token("job-1", "uma", now=1000.0)
    assert expires == 1060
    assert signer.user_of(token, "job-1", now=1059.0) == "uma"
    with pytest.raises(Exception, match="expired") as raised:
        signer.user_of(token, "job-1", now=1060.0)
    assert getattr(raised.value, "code", None) == "unauthorized"
    # Over HTTP: a gateway with the shortest lifetime, and a token made in the past.
    gateway = make_gateway(url_token_ttl_s=30)
    key = gateway.key("uma")
    _enqueue(gateway, key, "uma-1")
    old, _ = gateway.app.state.authenticator.signer.token("uma-1", "uma", now=time.time() - 31)
    response = gateway.client.get(f"/v1/jobs/uma-1/events?token={old}")
    assert _code(response) == (401, "unauthorized", "token")
    assert "expired" in response.json()["message"]


def test_the_partial_of_a_running_long_job_is_served_and_signed(gateway: Gateway,
                                                                 tmp_path: Path) -> None:
    key = gateway.key("val")
    _enqueue(gateway, key, "val-1")
    assert _code(gateway.client.get("/v1/jobs/val-1/partial", headers=key)) == (
        404, "no_partial", "job_id")
    so_far = _wav()
    path = tmp_path / "val-1.partial.wav"
    path.write_bytes(so_far)
    info = {"uri": path.as_uri(), "path": str(path), "seconds": 30.0, "window": 1,
            "windows": 3, "format": "wav"}
    gateway.producer.app.backend.store_result(
        "val-1", {"progress": 0.33, "message": "window 1 of 3", "partial": info}, "PROGRESS")
    view = gateway.client.get("/v1/jobs/val-1", headers=key).json()
    assert view["partial"] == {"window": 1, "windows": 3, "seconds": 30.0}
    assert view["urls"]["partial"] == "/v1/jobs/val-1/partial"
    # The event stream says so too: a page shows "listen" as the window ends, without polling.
    stream = gateway.client.stream("GET", "/v1/jobs/val-1/events", headers=key)
    with stream as events:
        for line in events.iter_lines():
            if line.startswith("data: ") and '"partial"' in line:
                assert '"partial": {"window": 1, "windows": 3, "seconds": 30.0}' in line
                break
    served = gateway.client.get(view["signed_urls"]["partial"])  # no header: an <audio src>
    assert served.status_code == 200 and served.content == so_far
    assert served.headers["content-type"] == "audio/wav"
    # Another user sees no such job, partial or not.
    assert _code(gateway.client.get("/v1/jobs/val-1/partial",
                                    headers=gateway.key("wes")))[:2] == (404, "job_not_found")
    # The job ends: its partial is gone, /audio is what counts.
    _finish(gateway, "val-1", so_far)
    assert _code(gateway.client.get("/v1/jobs/val-1/partial", headers=key))[1] == "no_partial"
    assert gateway.client.get("/v1/jobs/val-1", headers=key).json()["partial"] is None


def test_every_gateway_process_signs_with_the_key_shared_on_redis(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.delete(URL_TOKEN_KEY)
    try:
        first, second = signing_key(None, client), signing_key(None, client)
        assert first == second and len(first) >= 32
        one, other = UrlSigner(lambda: first, 60), UrlSigner(lambda: second, 60)
        token, _ = one.token("j", "u")
        assert other.user_of(token, "j") == "u"  # made by one replica, good on another
        assert signing_key("configured-" + uuid.uuid4().hex, client) != first
    finally:
        client.delete(URL_TOKEN_KEY)
        client.close()
