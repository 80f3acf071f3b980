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
