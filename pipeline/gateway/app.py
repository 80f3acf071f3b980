"""``create_app(settings)``: the gateway's FastAPI app, built from one Settings object.

The app holds one ``Producer`` (the same one a Python service would use), the API key store on
the producer's database, the per-key rate limit on the broker's Redis (in memory with the
embedded development broker) and the request limits; routes find them in ``app.state``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.client.producer import Producer
from pipeline.config.schema import Settings
from pipeline.gateway import errors, routes_jobs, routes_meta
from pipeline.gateway.auth import Authenticator, KeyRate, add_rate_headers
from pipeline.gateway.keystore import ApiKeyStore
from pipeline.gateway.metrics import HttpMetrics
from pipeline.gateway.models import JobRequest, JobUploadRequest
from pipeline.gateway.service import Gateway
from pipeline.gateway.uploads import KB, MB
from pipeline.gateway.url_tokens import UrlSigner, signing_key
from pipeline.gateway.views import models_view
from pipeline.gateway.webhook_docs import document_webhooks

VERSION = "1"
access_log = logging.getLogger("pipeline.gateway.access")


class AccessLog:
    """One line per request: method, path (never the query string), status, time, and the
    key's public label. The key itself is never logged (uvicorn's own access log is off:
    ``musicgen-pipeline api`` runs it with ``access_log=False``). The response it sees on its
    way out also gets the key's ``RateLimit-*`` headers (``auth.add_rate_headers``)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = [0]

        async def record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                add_rate_headers(scope, message)
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            state = scope.get("state") or {}
            access_log.info("%s %s %d %.1fms key=%s", scope["method"], scope["path"], status[0],
                            (time.perf_counter() - start) * 1000, state.get("key_label", "-"))


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema plus ``JobRequest`` and ``JobUploadRequest``, which the enqueue route
    reads by hand."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description,
                             routes=app.routes, webhooks=app.webhooks.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for model in (JobRequest, JobUploadRequest):
            request = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(request.pop("$defs", {}))
            components[model.__name__] = request
        app.openapi_schema = schema
    return app.openapi_schema


def _rate_storage(producer: Producer) -> str:
    # The shared Redis (password included, from its secret: the broker's, or the result
    # backend's with RabbitMQ) so that every gateway process counts the same key together; one
    # process's memory with the embedded broker.
    from pipeline.infra.brokers import limits_storage_uri

    url = producer.app.coordination_url
    return "memory://" if url is None else limits_storage_uri(url, producer.settings.broker.master_name)


def _url_signer(settings: Settings, producer: Producer) -> UrlSigner:
    secret = settings.api.url_token_secret
    return UrlSigner(lambda: signing_key(None if secret is None else secret.get_secret_value(),
                                         producer.app.redis), settings.api.url_token_ttl_s)


def create_app(settings: Settings, *, producer: Producer | None = None) -> FastAPI:
    """The gateway for ``settings``; ``producer`` defaults to a new one for them.

    Raises ``ServiceUnavailable`` when the quota database is missing, as a producer does.
    """
    producer = producer if producer is not None else Producer(settings)
    api = settings.api
    upload_dir = Path(settings.storage.temp_dir).expanduser().resolve()
    upload_dir.mkdir(parents=True, exist_ok=True)
    upload_mb = api.max_upload_mb or settings.validation.max_melody_size_mb
    app = FastAPI(title="musicgen-pipeline", version=VERSION,
                  description="Enqueue MusicGen jobs, follow them and fetch their audio. "
                              "Authenticate with `Authorization: Bearer <API key>`.")
    app.state.gateway = Gateway(settings=settings, producer=producer,
                                body_limit=api.max_body_kb * KB, upload_limit=int(upload_mb * MB),
                                upload_dir=upload_dir, models=models_view(settings))
    app.state.authenticator = Authenticator(enabled=api.auth,
                                            keys=ApiKeyStore(producer.quota.engine),
                                            rate=KeyRate(api.rate, _rate_storage(producer)),
                                            signer=_url_signer(settings, producer))
    errors.install(app)
    app.include_router(routes_jobs.router)
    app.include_router(routes_meta.router)
    document_webhooks(app)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    if api.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=api.cors_origins,
                           allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["Authorization", "Content-Type", "Range"],
                           expose_headers=["Location", "Retry-After", "Content-Range",
                                           "Idempotent-Replayed", "Preference-Applied",
                                           "RateLimit-Limit", "RateLimit-Remaining",
                                           "RateLimit-Reset"])
    app.add_middleware(AccessLog)
    # Outermost, so that what it times and counts is what the client saw (CORS and the access
    # log included). ``/metrics`` (routes_meta) reads app.state.metrics.
    app.state.metrics = HttpMetrics()
    app.add_middleware(_Metrics, metrics=app.state.metrics)
    return app


class _Metrics:
    """Starlette's middleware signature (``cls(app, **options)``) over ``HttpMetrics``."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.record = metrics.middleware(app)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.record(scope, receive, send)
