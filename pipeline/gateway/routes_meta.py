"""The routes around the jobs: the presets and limits (``/v1/models``), liveness
(``/healthz``), readiness (``/readyz``: the broker and the database answer) and the web page."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from pipeline.config.checks import Status, check_broker, check_database
from pipeline.errors import ServiceUnavailable
from pipeline.gateway.auth import Caller, caller
from pipeline.gateway.errors import error_responses
from pipeline.gateway.models import Health, ModelsView, Readiness, UsageView
from pipeline.gateway.views import usage_view

log = logging.getLogger(__name__)
router = APIRouter()
STATIC = Path(__file__).parent / "static"
# How long /readyz waits for the database: a probe must answer before its own timeout.
READY_TIMEOUT_S = 2.0
# The page runs only its own script; audio may come from a blob (fetched with the key) or a
# pre-signed https URL (object storage).
PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; media-src 'self' blob: https:; "
                                           "style-src 'self' 'unsafe-inline'; "
                                           "frame-ancestors 'none'",
                "Cache-Control": "no-cache"}


@router.get("/v1/models", response_model=ModelsView, tags=["service"],
            summary="The model presets a request may name, and the request limits")
def models(request: Request) -> Any:
    return request.app.state.gateway.models


@router.get("/v1/usage", response_model=UsageView, tags=["service"],
            summary="The key's quota: used and left per window, and its request rate",
            responses=error_responses(401, 429, 503))
def usage(request: Request, who: Annotated[Caller, Depends(caller)]) -> Any:
    gateway = request.app.state.gateway
    return usage_view(gateway.producer.usage(who.user_id), gateway.settings.api.rate)


@router.get("/healthz", response_model=Health, tags=["service"], summary="The process is up")
def healthz() -> Any:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, tags=["service"],
            summary="The broker and the database answer",
            responses=error_responses(503))
def readyz(request: Request) -> Any:
    settings = request.app.state.gateway.settings
    results = [*check_broker(settings), *check_database(settings, timeout=READY_TIMEOUT_S)]
    # Only names and outcomes: the details name hosts, which this unauthenticated route keeps
    # to the log.
    checks = [{"name": r.name, "status": r.status.value} for r in results]
    failed = [r for r in results if r.status is Status.fail]
    if failed:
        for result in failed:
            log.warning("not ready: %s: %s", result.name, result.detail)
        raise ServiceUnavailable(f"not ready: {', '.join(r.name for r in failed)} unreachable",
                                 None, {"retry_after": 5, "checks": checks})
    return {"status": "ready", "checks": checks}


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus' scrape: the gateway's HTTP requests, statuses and latency (``metrics``)."""
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)


@router.get("/app.js", include_in_schema=False)
def page_script() -> FileResponse:
    return FileResponse(STATIC / "app.js", media_type="text/javascript", headers=PAGE_HEADERS)
