"""The ``webhooks`` section of the OpenAPI schema: what a receiver of ``webhook_url`` gets.

Documentation only: the POST itself is made by a worker (workers/webhook_task.py) with the body
``pipeline.webhooks`` builds (``event`` for the end, ``started_event``, ``progress_event`` and
``partial_event`` before it), signed in the Standard Webhooks style.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header
from pydantic import BaseModel, ConfigDict, Field

from pipeline.gateway.models import JobError, ProgressView


class PartialView(BaseModel):
    """How much of a long job's audio is ready: its first ``window`` windows of ``windows``."""

    window: int
    windows: int
    seconds: float


class WebhookEventData(BaseModel):
    """The public job view, as ``GET /v1/jobs/{id}`` shows it: never a path on the server."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    status: Literal["started", "progress", "succeeded", "failed", "timeout", "cancelled"]
    result: dict[str, Any] | None = Field(description="the job's result (JobResultView's "
                                                      "fields), when it succeeded")
    error: JobError | None = Field(description="the stable error code and its message, when "
                                               "it did not")
    audio_url: str | None = Field(description="its audio, once it has succeeded: absolute "
                                              "under api.public_url when that is set")
    attempt: int | None = Field(None, description="job.started only: the worker's try (a "
                                                  "retried job starts again)")
    progress: ProgressView | None = Field(None, description="job.progress only")
    partial: PartialView | None = Field(None, description="job.partial only")
    partial_url: str | None = Field(None, description="job.partial only: the audio so far, "
                                                      "absolute under api.public_url when set")


EVENT_TYPES = Literal["job.started", "job.progress", "job.partial", "job.succeeded",
                      "job.failed", "job.timeout", "job.cancelled"]


class WebhookEvent(BaseModel):
    """One event of a job, POSTed to its ``webhook_url`` when its ``webhook_events_filter``
    asks for it (retried with the same ``webhook-id`` on a 5xx, 408, 429 or a connection
    error)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "type": "job.succeeded", "timestamp": "2026-12-05T21:14:03.512Z",
        "data": {"job_id": "a1b2c3", "status": "succeeded", "error": None,
                 "result": {"job_id": "a1b2c3", "format": "mp3", "duration": 8.0},
                 "audio_url": "https://music.example.com/v1/jobs/a1b2c3/audio"}}, {
        "type": "job.partial", "timestamp": "2026-12-05T21:13:41.007Z",
        "data": {"job_id": "a1b2c3", "status": "progress", "result": None, "error": None,
                 "audio_url": None, "partial": {"window": 1, "windows": 3, "seconds": 30.0},
                 "partial_url": "https://music.example.com/v1/jobs/a1b2c3/partial"}}]})

    type: EVENT_TYPES
    timestamp: datetime
    data: WebhookEventData


# name in the schema, summary, what sends it, the filter's name for it.
_HOOKS: tuple[tuple[str, str, str], ...] = (
    ("job-started", "A job began running",
     "job.started, once per attempt (`start` in webhook_events_filter; message id "
     "msg_{job}_started_{attempt})."),
    ("job-progress", "A job's progress",
     "job.progress with data.progress, at most one per webhooks.progress_interval_s (`progress`;"
     " msg_{job}_progress_{attempt}_{n})."),
    ("job-partial", "A long job's audio so far",
     "job.partial with data.partial and data.partial_url, once per long-form window (`partial`;"
     " msg_{job}_partial_{window})."),
    ("job-ended", "A job ended",
     "job.succeeded, job.failed, job.timeout or job.cancelled, once per job (`completed`, the "
     "default; msg_{job}_{status})."),
)


def _hook(app: FastAPI, name: str, summary: str, sends: str) -> Callable[..., None]:
    description = (f"{sends} Signed with the key's webhook secret or webhooks.secret: verify "
                   "the signature over the raw body, refuse timestamps more than five minutes "
                   "off, and answer 2xx quickly.")

    @app.webhooks.post(name, summary=summary, description=description,
                       operation_id=name.replace("-", "_"), response_model=None,
                       responses={200: {"description": "any 2xx: delivered"},
                                  500: {"description": "any 5xx, 408 or 429: retried later"}})
    def receive(
        body: WebhookEvent,
        webhook_id: Annotated[str, Header(description="the message id, the same on every "
                                                      "attempt: deduplicate on it")],
        webhook_timestamp: Annotated[int, Header(description="Unix seconds of this attempt")],
        webhook_signature: Annotated[str, Header(description="`v1,<base64 HMAC-SHA256 of "
                                                             "'id.timestamp.body'>`; check it "
                                                             "with pipeline.webhooks.verify")],
    ) -> None:
        """Documentation only: a worker POSTs it (workers/webhook_task.py)."""

    return receive


def document_webhooks(app: FastAPI) -> None:
    """Add each webhook event to ``app.webhooks`` (shown under ``webhooks`` in the schema)."""
    for name, summary, sends in _HOOKS:
        _hook(app, name, summary, sends)
