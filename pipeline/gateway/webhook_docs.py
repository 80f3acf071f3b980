"""The ``webhooks`` section of the OpenAPI schema: what a receiver of ``webhook_url`` gets.

Documentation only: the POST itself is made by a worker (workers/webhook_task.py) with the body
``pipeline.webhooks.event`` builds, signed in the Standard Webhooks style.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Header
from pydantic import BaseModel, ConfigDict, Field

from pipeline.gateway.models import JobError


class WebhookEventData(BaseModel):
    """The public job view, as ``GET /v1/jobs/{id}`` shows it: never a path on the server."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    status: Literal["succeeded", "failed", "timeout", "cancelled"]
    result: dict[str, Any] | None = Field(description="the job's result (JobResultView's "
                                                      "fields), when it succeeded")
    error: JobError | None = Field(description="the stable error code and its message, when "
                                               "it did not")
    audio_url: str | None = Field(description="its audio, once it has succeeded: absolute "
                                              "under api.public_url when that is set")


class WebhookEvent(BaseModel):
    """One job's end, POSTed once per job to its ``webhook_url`` (retried with the same
    ``webhook-id`` on a 5xx, 408, 429 or a connection error)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "type": "job.succeeded", "timestamp": "2026-12-05T21:14:03.512Z",
        "data": {"job_id": "a1b2c3", "status": "succeeded", "error": None,
                 "result": {"job_id": "a1b2c3", "format": "mp3", "duration": 8.0},
                 "audio_url": "https://music.example.com/v1/jobs/a1b2c3/audio"}}]})

    type: Literal["job.succeeded", "job.failed", "job.timeout", "job.cancelled"]
    timestamp: datetime
    data: WebhookEventData


def document_webhooks(app: FastAPI) -> None:
    """Add the job-end webhook to ``app.webhooks`` (shown under ``webhooks`` in the schema)."""

    @app.webhooks.post("job-ended", summary="A job ended", response_model=None,
                       responses={200: {"description": "any 2xx: delivered"},
                                  500: {"description": "any 5xx, 408 or 429: retried later"}})
    def job_ended(
        body: WebhookEvent,
        webhook_id: Annotated[str, Header(description="the message id, the same on every "
                                                      "attempt: deduplicate on it")],
        webhook_timestamp: Annotated[int, Header(description="Unix seconds of this attempt")],
        webhook_signature: Annotated[str, Header(description="`v1,<base64 HMAC-SHA256 of "
                                                             "'id.timestamp.body'>`; check it "
                                                             "with pipeline.webhooks.verify")],
    ) -> None:
        """The job's end, signed with ``webhooks.secret``. Verify the signature over the raw
        body, refuse timestamps more than five minutes off, and answer 2xx quickly."""
