"""What the gateway's routes share (``app.state.gateway``): the settings, the producer and the
request limits, and how a request body becomes an enqueued job.

``create_app`` (app.py) builds it; the routes (routes_jobs.py) read it from the request.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.client.handle import JobHandle
from pipeline.client.producer import Producer
from pipeline.config.schema import Settings
from pipeline.contract.jobs import GenerationRequest, invalid_request_from
from pipeline.errors import InvalidRequest
from pipeline.gateway.models import JobRequest, JobUploadRequest
from pipeline.gateway.uploads import Body


@dataclass
class Gateway:
    """What the routes share: the settings, the producer and the request limits."""

    settings: Settings
    producer: Producer
    body_limit: int
    upload_limit: int
    upload_dir: Path
    models: dict[str, Any]

    def enqueue(self, body: Body, user_id: str, idempotency_key: str | None = None) -> JobHandle:
        """The body as a ``GenerationRequest`` for ``user_id``, enqueued by the producer; an
        ``Idempotency-Key`` becomes the job's id (``idempotent_job_id``)."""
        try:
            model = JobUploadRequest if body.multipart else JobRequest
            payload = model.model_validate_json(body.request_json)
        except ValidationError as exc:
            raise invalid_request_from(exc) from exc
        fields = payload.model_dump(exclude_unset=True)
        if idempotency_key is not None:
            if "job_id" in fields:
                raise InvalidRequest("send an Idempotency-Key header or a job_id, not both",
                                     "Idempotency-Key")
            fields["job_id"] = idempotent_job_id(user_id, idempotency_key)
        if body.melody is not None:
            fields["melody"] = body.melody
        if body.continuation is not None:
            fields["continuation"] = body.continuation
        return self.producer.enqueue(GenerationRequest(**fields, user_id=user_id))


def idempotent_job_id(user_id: str, key: str) -> str:
    """The job id an ``Idempotency-Key`` stands for: the key scoped to its user (two clients
    that both pick "1" never collide), as a job id of the usual shape. 1 to 255 printable
    ASCII characters, as the IETF draft on the header and Stripe allow."""
    if not 1 <= len(key) <= 255 or not all(" " < ch <= "~" for ch in key):
        raise InvalidRequest("Idempotency-Key must be 1 to 255 printable ASCII characters "
                             "without spaces", "Idempotency-Key")
    return "idem-" + hashlib.sha256(f"{user_id}\n{key}".encode()).hexdigest()[:40]
