"""Typed pipeline errors as HTTP responses: each error class's ``http_status``, and the
handlers that make every error body carry that stable ``code``.

The body is ``PipelineError.to_dict()``: ``{code, message, field, details}``. 429 and 503 say
when to come back in ``Retry-After``; 401 names the scheme in ``WWW-Authenticate``. Errors
that are the HTTP layer's own (an unknown route, a method not allowed, a parameter FastAPI
refuses) get the same body shape, with codes of their own.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.errors import InvalidRequest, PipelineError

log = logging.getLogger(__name__)

# When nothing says better: a broken breaker or a full queue is worth a retry this much later.
DEFAULT_RETRY_AFTER_S = 5
_HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed",
               406: "not_acceptable", 416: "range_not_satisfiable"}


class ErrorBody(BaseModel):
    """What every error response carries; ``code`` is stable, branch on it."""

    model_config = ConfigDict(extra="forbid")

    code: str
    message: str
    field: str | None = None
    details: Any = None


# --- the error responses as the OpenAPI schema documents them ----------------------------------

_REASONS = {401: "no API key, or an unknown or revoked one", 404: "no such job for this key",
            409: "a conflict with the job's state or id", 413: "the body or upload is too large",
            415: "the body is neither JSON nor multipart", 416: "the range is outside the file",
            422: "the request is invalid (`field` names what)",
            429: "over a quota, a rate or the queue's backlog (see Retry-After)",
            503: "the broker, the database or the model is unavailable (see Retry-After)"}
# One body a client may see for each status (the codes are the error classes' own).
_EXAMPLES: dict[int, dict[str, Any]] = {
    401: {"code": "unauthorized", "message": "an API key is required: send `Authorization: "
          "Bearer <key>`", "field": "Authorization", "details": None},
    404: {"code": "job_not_found", "message": "no job with id 'a1b2c3'", "field": "job_id",
          "details": None},
    409: {"code": "job_id_conflict", "message": "job id 'order-7' was already used for "
          "another request", "field": "job_id", "details": None},
    413: {"code": "payload_too_large", "message": "the melody is larger than 10 MB",
          "field": "melody", "details": None},
    415: {"code": "unsupported_media_type", "message": "send application/json, or "
          "multipart/form-data with a melody file; not text/plain", "field": "Content-Type",
          "details": None},
    416: {"code": "range_not_satisfiable", "message": "bytes=9999- is outside the file",
          "field": "Range", "details": None},
    422: {"code": "invalid_request", "message": "duration must be at most 30",
          "field": "duration", "details": None},
    429: {"code": "quota_exceeded", "message": "daily quota of 10 jobs used; resets at "
          "2026-12-06T00:00:00Z", "field": None, "details": {"limit": "daily",
                                                              "retry_after": 3600}},
    503: {"code": "service_unavailable", "message": "the broker is unreachable", "field": None,
          "details": {"retry_after": 5}},
}
_RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before trying again",
                                "schema": {"type": "integer", "minimum": 0}}}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: _RETRY_AFTER, 503: _RETRY_AFTER}


def error_responses(*statuses: int, json_only: bool = False) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route's errors: each status's reason, its ``ErrorBody``
    with an example, and its headers (``Retry-After``, ``WWW-Authenticate``). ``json_only``: a
    route whose own response is not JSON (its errors still are)."""
    responses: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        content: dict[str, Any] = {"example": _EXAMPLES[status]}
        response: dict[str, Any] = {"description": _REASONS[status],
                                    "content": {"application/json": content}}
        if json_only:
            content["schema"] = {"$ref": "#/components/schemas/ErrorBody"}
        else:
            response["model"] = ErrorBody
        if status in _HEADERS:
            response["headers"] = _HEADERS[status]
        responses[status] = response
    return responses


def status_of(exc: PipelineError) -> int:
    """The HTTP status for a pipeline error: its class's ``http_status`` (pipeline/errors.py)."""
    return exc.http_status


def retry_after(exc: PipelineError, now: datetime | None = None) -> int:
    """Whole seconds until a retry may succeed: the error's own ``retry_after``, or for a
    quota the time until its window resets, else ``DEFAULT_RETRY_AFTER_S``."""
    details = exc.details if isinstance(exc.details, dict) else {}
    seconds: float | None = None
    if isinstance(details.get("retry_after"), (int, float)):
        seconds = float(details["retry_after"])
    elif isinstance(details.get("resets_at"), str):
        try:
            resets = datetime.fromisoformat(details["resets_at"])
            seconds = (resets - (now or datetime.now(UTC))).total_seconds()
        except ValueError:
            seconds = None
    if seconds is None or not math.isfinite(seconds):
        return DEFAULT_RETRY_AFTER_S
    return max(1, math.ceil(seconds))


def error_response(exc: PipelineError, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON response for ``exc``, with the headers its status calls for."""
    status = status_of(exc)
    out = dict(headers or {})
    if status in (429, 503):
        out["Retry-After"] = str(retry_after(exc))
    if status == 401:
        out["WWW-Authenticate"] = 'Bearer realm="musicgen-pipeline"'
    return JSONResponse(jsonable_encoder(exc.to_dict()), status_code=status, headers=out)


def http_error(status: int, message: str, field: str | None = None,
               headers: dict[str, str] | None = None, code: str | None = None) -> JSONResponse:
    """An error that is the HTTP layer's own (no pipeline error behind it), in the same shape."""
    body = ErrorBody(code=code or _HTTP_CODES.get(status, "http_error"), message=message,
                     field=field)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _field_of(loc: tuple[Any, ...]) -> str:
    # FastAPI's loc starts with where the value was ("path", "query", "header", "body").
    parts = [str(p) for p in loc[1:]] if loc and loc[0] in ("path", "query", "header", "body") \
        else [str(p) for p in loc]
    return ".".join(parts) or "request"


def install(app: FastAPI) -> None:
    """Register the handlers: pipeline errors, FastAPI's validation, HTTP errors, and a last
    resort that turns a bug into a 500 with a code (and the traceback in the log)."""

    async def pipeline_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, PipelineError)
        if status_of(exc) >= 500:
            log.warning("%s", exc)
        return error_response(exc)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [{"field": _field_of(tuple(e.get("loc", ()))), "message": str(e.get("msg")),
                     "type": str(e.get("type"))} for e in exc.errors()]
        first = problems[0] if problems else {"field": "request", "message": "invalid request"}
        return error_response(InvalidRequest(f"{first['field']}: {first['message']}",
                                             first["field"], problems))

    async def http_exception(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return http_error(exc.status_code, str(exc.detail), headers=dict(exc.headers or {}))

    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in the gateway", exc_info=exc)
        return http_error(500, "internal error; the gateway's log has the details",
                          code="internal_error")

    app.add_exception_handler(PipelineError, pipeline_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_exception)
    app.add_exception_handler(Exception, unexpected)
