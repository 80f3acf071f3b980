"""schemathesis against the gateway's own OpenAPI schema: for every operation, 20 generated
valid requests and 20 invalid ones (no worker: jobs just queue) get no 500, only documented
status codes and content types, and bodies and headers that match the schema."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

if TYPE_CHECKING:
    from .gateway_conftest import Gateway

pytest_plugins = ["tests.pipeline.gateway_conftest"]
pytestmark = pytest.mark.timeout(240)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_headers_conformance, response_schema_conformance]
EXAMPLES = 20
WAIT = re.compile(r"wait=\s*\d+")


def test_every_operation_keeps_to_the_schema(gateway: Gateway) -> None:
    # Loaded from the running app, as a client would (schemathesis' pytest fixture loader does
    # not run under this pytest, so each operation's strategy is driven here).
    schema = schemathesis.openapi.from_asgi("/openapi.json", gateway.app)
    auth = gateway.key("schemathesis")
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()  # the schema itself is valid
        operations.append(result.ok())
    assert {f"{op.method.upper()} {op.path}" for op in operations} == {
        "POST /v1/jobs", "GET /v1/jobs", "GET /v1/jobs/{job_id}", "GET /v1/jobs/{job_id}/events",
        "GET /v1/jobs/{job_id}/audio", "GET /v1/jobs/{job_id}/partial",
        "GET /v1/jobs/{job_id}/stream", "DELETE /v1/jobs/{job_id}",
        "GET /v1/models", "GET /v1/usage", "GET /healthz", "GET /readyz"}
    statuses: set[int] = set()
    for operation in operations:
        # Invalid requests exist only where there is something to get wrong: an id, a body.
        takes_input = "{" in operation.path or operation.method.upper() == "POST"
        modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE) if takes_input else (
            GenerationMode.POSITIVE,)
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case: Any) -> None:
                if case.headers and "Prefer" in case.headers:
                    # No worker here: a generated `Prefer: wait=30` (the header's example)
                    # would hold the request past the client's 10 s read timeout; one second
                    # still takes the wait path.
                    case.headers["Prefer"] = WAIT.sub("wait=1", str(case.headers["Prefer"]))
                response = case.call_and_validate(headers=auth, checks=CHECKS)
                statuses.add(response.status_code)

            run()
    assert 202 in statuses and 422 in statuses and 404 in statuses  # it reached the logic
