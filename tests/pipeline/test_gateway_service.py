"""The gateway around the jobs: /v1/models, /healthz, /readyz, the page, the OpenAPI schema,
the access log (a key's public prefix only), and that FastAPI stays out of ``import pipeline``."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pipeline import webhooks
from pipeline.client.producer import Producer
from pipeline.config.presets import known_presets
from pipeline.contract.jobs import GenerationRequest
from pipeline.contract.output_format import FORMATS
from pipeline.gateway.app import create_app

if TYPE_CHECKING:
    from pipeline.config.schema import Settings

    from .gateway_conftest import Gateway

pytest_plugins = ["tests.pipeline.gateway_conftest"]
pytestmark = pytest.mark.timeout(60)


def test_models_lists_every_preset_with_its_window_and_the_limits(gateway: Gateway) -> None:
    body = gateway.client.get("/v1/models").json()  # no key needed: nothing private here
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == set(known_presets())
    assert by_name["tiny-melody"]["melody"] is True and by_name["tiny"]["melody"] is False
    assert all(0 < m["max_duration"] <= body["limits"]["max_duration"] for m in by_name.values())
    assert body["default_model"] == gateway.settings.model.preset
    limits = body["limits"]
    assert set(limits["formats"]) == set(FORMATS)
    assert limits["formats"]["mp3"]["media_type"] == "audio/mpeg"
    assert limits["formats"]["mp3"]["bit_depths"] == []
    assert limits["max_upload_mb"] == gateway.settings.validation.max_melody_size_mb
    assert limits["max_prompt_length"] == gateway.settings.validation.max_prompt_length


def test_health_and_readiness(gateway: Gateway, tmp_path: Path) -> None:
    assert gateway.client.get("/healthz").json() == {"status": "ok"}
    ready = gateway.client.get("/readyz")
    assert ready.status_code == 200
    assert {c["name"]: c["status"] for c in ready.json()["checks"]} == {"broker": "ok",
                                                                       "database": "ok"}
    # A broker nobody answers on: not ready, with when to ask again.
    settings = gateway.settings.model_copy(update={"broker": gateway.settings.broker.model_copy(
        update={"url": "redis://127.0.0.1:9/0", "connect_timeout": 0.5})})
    producer = Producer(settings)
    try:
        from fastapi.testclient import TestClient

        with TestClient(create_app(settings, producer=producer)) as client:
            down = client.get("/readyz")
    finally:
        producer.quota.close()
    assert down.status_code == 503 and down.json()["code"] == "service_unavailable"
    assert int(down.headers["Retry-After"]) > 0
    assert {"name": "broker", "status": "fail"} in down.json()["details"]["checks"]
    assert "127.0.0.1:9" not in down.text  # hosts stay in the log


def test_the_page_and_its_script_are_served(gateway: Gateway) -> None:
    page = gateway.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src" not in page.headers["content-security-policy"]  # default-src 'self'
    for element in ('id="api-key"', 'id="prompt"', 'id="duration"', 'id="model"', 'id="format"',
                    'id="melody"', 'id="history"', 'id="variations"', "<progress", "<audio",
                    'class="download"', 'class="cancel"', 'class="more"', 'src="/app.js"'):
        assert element in page.text, element
    script = gateway.client.get("/app.js")
    assert script.status_code == 200 and "/v1/jobs" in script.text
    # The events come from each view's urls (or its signed_urls), resumed with Last-Event-ID.
    assert "urls.events" in script.text and "Last-Event-ID" in script.text


def test_openapi_comes_from_the_job_contract(gateway: Gateway) -> None:
    schema = gateway.client.get("/openapi.json").json()
    request = schema["components"]["schemas"]["JobRequest"]
    # The files (melody, continuation) come as multipart parts; a continuation's span fields
    # only in the multipart request part, beside its file, where the prompt becomes optional.
    expected = set(GenerationRequest.model_fields) - {"user_id", "melody", "continuation"}
    span = {"continuation_start", "continuation_end", "continuation_included"}
    assert set(request["properties"]) == expected - span  # a contract field is never left out
    assert request["additionalProperties"] is False and request["required"] == ["prompt"]
    upload = schema["components"]["schemas"]["JobUploadRequest"]
    assert set(upload["properties"]) == expected and "required" not in upload
    assert upload["additionalProperties"] is False
    post = schema["paths"]["/v1/jobs"]["post"]
    assert set(post["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    parts = post["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert set(parts) == {"request", "melody", "continuation"}
    assert {"401", "413", "415", "422", "429", "503"} <= set(post["responses"])
    assert schema["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
    events = schema["paths"]["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"]["content"]
    assert list(events) == ["text/event-stream"]
    result = schema["components"]["schemas"]["JobResultView"]["properties"]
    assert "output_path" not in result and "seed" in result


def test_openapi_documents_examples_errors_headers_and_webhooks(gateway: Gateway) -> None:
    schema = gateway.client.get("/openapi.json").json()
    post = schema["paths"]["/v1/jobs"]["post"]
    examples = post["requestBody"]["content"]["application/json"]["examples"]
    for example in examples.values():  # each example is a request the gateway accepts
        made = gateway.client.post("/v1/jobs", json=example["value"], headers=gateway.key("ex"))
        assert made.status_code == 202, made.text
    for status in ("200", "201", "202"):
        assert "Location" in post["responses"][status]["headers"]
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if not status.startswith(("4", "5")) or status == "500":
                    continue
                body = response["content"]["application/json"]
                assert body["example"]["code"], (method, path, status)
                if status in ("429", "503"):
                    assert "Retry-After" in response["headers"], (method, path, status)
    assert "event: progress" in schema["paths"]["/v1/jobs/{job_id}/events"]["get"][
        "responses"]["200"]["content"]["text/event-stream"]["example"]
    hook = schema["webhooks"]["job-ended"]["post"]
    assert {p["name"] for p in hook["parameters"]} == {"webhook-id", "webhook-timestamp",
                                                       "webhook-signature"}
    event = schema["components"]["schemas"]["WebhookEvent"]
    assert set(event["properties"]) == set(webhooks.event("j", "failed"))
    assert set(schema["webhooks"]) == {"job-started", "job-progress", "job-partial", "job-ended"}
    documented = set(event["properties"]["type"]["enum"])
    sent = {webhooks.started_event("j", attempt=1)["type"],
            webhooks.progress_event("j", 0.5, "x")["type"],
            webhooks.partial_event("j", window=1, windows=2, seconds=1.0)["type"],
            *webhooks.EVENT_TYPES.values()}
    assert documented == sent
    data = schema["components"]["schemas"]["WebhookEventData"]["properties"]
    assert set(webhooks.partial_event("j", window=1, windows=2, seconds=1.0)["data"]) <= set(data)


def test_the_access_log_names_a_key_by_its_prefix_only(gateway: Gateway,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    new = gateway.keys.create("lena")
    caplog.set_level(logging.INFO, logger="pipeline.gateway.access")
    gateway.client.get("/v1/jobs/nothing?key=x", headers={"Authorization": f"Bearer {new.key}"})
    [line] = [r.getMessage() for r in caplog.records if r.name == "pipeline.gateway.access"]
    assert line.startswith("GET /v1/jobs/nothing 404 ") and line.endswith(f"key={new.info.label}")
    secret = new.key.split("_", 2)[2]  # the secret itself may hold "_"
    assert secret not in caplog.text and "key=x" not in caplog.text


def test_import_pipeline_and_the_key_store_import_no_web_framework() -> None:
    code = ("import sys, json, pipeline, pipeline.cli, pipeline.gateway.keystore\n"
            "print(json.dumps([m for m in ('fastapi', 'starlette', 'uvicorn') "
            "if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert json.loads(out.stdout) == []


def test_an_app_without_a_quota_database_is_refused(
        tmp_path: Path, settings_for: Callable[..., Settings]) -> None:
    from pipeline.errors import ServiceUnavailable

    with pytest.raises(ServiceUnavailable, match="db upgrade"):
        create_app(settings_for(tmp_path))




def test_every_error_a_request_can_meet_has_its_status_and_retry_after() -> None:
    from datetime import UTC, datetime, timedelta

    from pipeline import errors
    from pipeline.gateway.errors import retry_after, status_of

    def family(cls: type[errors.PipelineError]) -> list[type[errors.PipelineError]]:
        return [cls, *(sub for child in cls.__subclasses__() for sub in family(child))]

    server_side = {"pipeline_error", "invalid_settings", "timeout", "poison_job",
                   "invalid_webhook_signature"}  # never raised by a request's own path
    for cls in family(errors.PipelineError):
        status = status_of(cls("m"))
        assert (status == 500) == (cls.code in server_side), (cls.code, status)
    assert status_of(errors.GpuOutOfMemory("m")) == 503  # transient: worth a retry
    assert status_of(errors.Backpressure("m")) == 429
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    quota = errors.QuotaExceeded("m", None, {"resets_at": (now + timedelta(hours=2)).isoformat()})
    assert retry_after(quota, now) == 7200
    assert retry_after(errors.ServiceUnavailable("m", None, {"retry_after": 0.2})) == 1
    assert retry_after(errors.Backpressure("m", None, {"queue": "q"})) == 5



def test_the_response_status_is_the_error_class_s_own_after_the_broker() -> None:
    """A job's error reaches the gateway rebuilt from its dict (``PipelineError.from_dict``):
    the response still has the status its class declares, and a request's own mistake is a
    4xx while a failure that may pass is a 429 or a 5xx."""
    from pipeline.errors import InvalidRequest, PipelineError, _all_subclasses
    from pipeline.gateway.errors import error_response

    for cls in _all_subclasses(PipelineError):
        if not cls.__module__.startswith("pipeline"):
            continue
        rebuilt = PipelineError.from_dict(cls("m", "field", {"queue": "q"}).to_dict())
        assert type(rebuilt) is cls, cls.code  # one class per code
        assert error_response(rebuilt).status_code == cls.http_status, cls.code
        if issubclass(cls, InvalidRequest):
            assert 400 <= cls.http_status < 500, cls.code
        if cls.retryable:
            assert cls.http_status == 429 or cls.http_status >= 500, cls.code

def test_metrics_count_each_request_by_route_template_and_status(gateway: Gateway) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    key = gateway.key("metrics-user")
    assert gateway.client.get("/v1/models").status_code == 200
    assert gateway.client.get("/v1/models").status_code == 200
    assert gateway.client.get("/v1/jobs/no-such-job", headers=key).status_code == 404
    assert gateway.client.get("/v1/jobs/no-such-job").status_code == 401  # no key
    assert gateway.client.get("/no/such/route").status_code == 404
    scrape = gateway.client.get("/metrics")
    assert scrape.status_code == 200 and scrape.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(scrape.text)}
    counts = {(s.labels["method"], s.labels["route"], s.labels["status"]): s.value
              for s in families["musicgen_http_requests"].samples if s.name.endswith("_total")}
    assert counts[("GET", "/v1/models", "200")] == 2
    # The route's template, never the id: a label per job would grow without bound.
    assert counts[("GET", "/v1/jobs/{job_id}", "404")] == 1
    assert counts[("GET", "/v1/jobs/{job_id}", "401")] == 1
    assert counts[("GET", "unmatched", "404")] == 1
    assert not any("no-such-job" in route for _, route, _ in counts)
    latency = {(s.labels["method"], s.labels["route"]): s.value
               for s in families["musicgen_http_request_duration_seconds"].samples
               if s.name.endswith("_count")}
    assert latency[("GET", "/v1/models")] == 2 and latency[("GET", "/v1/jobs/{job_id}")] == 2
    # The scrape itself is counted once it has answered: the next one shows it.
    again = gateway.client.get("/metrics").text
    assert 'musicgen_http_requests_total{method="GET",route="/metrics",status="200"} 1.0' in again
