"""The gateway's request and response bodies, derived from the job contract's own models so
the OpenAPI schema and ``pipeline.contract.jobs`` cannot drift apart.

``JobRequest`` is ``GenerationRequest`` without ``user_id`` (the API key names the user) and
without ``melody`` and ``continuation`` (over HTTP each is an uploaded file, never a path on the
gateway's disk).
``JobResultView`` is ``JobResult`` without where the server keeps the file (the audio has its
own URL).
Both are built from the source model's fields, so a field added there appears here too.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from pipeline.contract.jobs import MAX_PROMPT_CHARS, GenerationRequest, JobResult, JobStatus
from pipeline.contract.public_result import RESULT_EXCLUDED

REQUEST_EXCLUDED = frozenset({"user_id", "melody", "continuation"})
# A clip to continue only comes as a multipart file part: over JSON its span fields would name
# nothing, and the prompt is required (GenerationRequest makes it optional with a continuation).
CONTINUATION_FIELDS = frozenset({"continuation_start", "continuation_end",
                                 "continuation_included"})


def _without(model: type[BaseModel], name: str, drop: frozenset[str], doc: str,
             **replaced: tuple[Any, Any]) -> type[BaseModel]:
    fields: dict[str, Any] = {key: replaced.get(key, (info.annotation, info)) for key, info in
                              model.model_fields.items() if key not in drop}
    return create_model(name, __config__=ConfigDict(extra="forbid"), __doc__=doc, **fields)


JobRequest = _without(GenerationRequest, "JobRequest", REQUEST_EXCLUDED | CONTINUATION_FIELDS,
                      "A generation request; unset fields take the deployment's defaults. The "
                      "user is the API key's; a melody or a clip to continue comes as a "
                      "multipart file part (see JobUploadRequest).",
                      prompt=(str, Field(min_length=1, max_length=MAX_PROMPT_CHARS,
                                         description="what to generate; control characters "
                                                     "are stripped")))
JobUploadRequest = _without(GenerationRequest, "JobUploadRequest", REQUEST_EXCLUDED,
                            "The `request` part of a multipart request: a JobRequest that may "
                            "also say which part of a `continuation` file part to continue, "
                            "and without a prompt when one is sent.")
JobResultView = _without(JobResult, "JobResultView", RESULT_EXCLUDED,
                         "A finished job: what its file is (fetch it from audio_url).")


class ProgressView(BaseModel):
    fraction: float = Field(ge=0.0, le=1.0)
    message: str


class JobError(BaseModel):
    """Why a job failed or was cancelled: the worker's stable code and its message."""

    code: str
    message: str


class JobUrls(BaseModel):
    """Where to follow the job (Replicate's ``urls``)."""

    model_config = ConfigDict(extra="forbid")

    get: str = Field(description="this job")
    cancel: str = Field(description="DELETE it to cancel the job")
    events: str = Field(description="its Server-Sent Events")
    audio: str | None = Field(None, description="its audio, once it has succeeded")
    partial: str | None = Field(None, description="the audio so far of a running long job "
                                                   "(replaced after each window)")
    stream: str | None = Field(None, description="a stream=True job's audio as it is "
                                                 "generated (MP3 over chunked transfer)")


class SignedUrls(BaseModel):
    """``urls`` that work without the Authorization header until ``expires_at`` (a ``?token=``
    for this job only): for a browser's ``EventSource`` and ``<audio src>``."""

    model_config = ConfigDict(extra="forbid")

    events: str
    audio: str | None = None
    partial: str | None = None
    stream: str | None = None
    expires_at: datetime


class PartialView(BaseModel):
    """The audio a running long job has so far: ``seconds`` of it, after ``window`` of
    ``windows``; fetch it from ``urls.partial``."""

    window: int
    windows: int
    seconds: float


# Built like the two above: its `result` field's type is one of them, known only at run time.
_JOB_VIEW_FIELDS: dict[str, Any] = {
    "id": (str, ...),
    "status": (JobStatus, ...),
    "progress": (ProgressView, ...),
    "result": (JobResultView | None, None),
    "error": (JobError | None, None),
    "audio_url": (str | None, Field(None, description="set once the job has succeeded")),
    "urls": (JobUrls, ...),
    "signed_urls": (SignedUrls | None, Field(None, description="the events, audio and partial "
                                                              "URLs with a short-lived token")),
    "partial": (PartialView | None, Field(None, description="a running long job's audio so far")),
    "created_at": (datetime | None, Field(None, description="when it was enqueued (from the "
                                                            "ledger; null with quotas off)")),
    "started_at": (datetime | None, Field(None, description="when a worker first took it")),
    "completed_at": (datetime | None, Field(None, description="when it ended")),
    "request": (dict[str, Any] | None, Field(None, description="the request as resolved: "
                                                               "defaults filled in")),
}
JobView = create_model("JobView", __config__=ConfigDict(extra="forbid"),
                       __doc__="One job as its owner sees it.", **_JOB_VIEW_FIELDS)


class JobPageView(BaseModel):
    """One page of the key's jobs, newest first."""

    jobs: list[JobView]
    next_cursor: str | None = Field(description="pass as `cursor` for the next page; null on "
                                                "the last")


class CancelView(BaseModel):
    id: str
    cancelled: bool = Field(description="false when the job had already finished")
    status: JobStatus


class ModelInfo(BaseModel):
    name: str
    description: str
    max_duration: float = Field(description="seconds: the model's window, within the "
                                            "deployment's limit")
    melody: bool = Field(description="takes a melody upload")


class FormatInfo(BaseModel):
    sample_rates: list[int]
    bit_depths: list[int] = Field(description="empty for lossy formats")
    media_type: str


class Limits(BaseModel):
    min_duration: float
    max_duration: float
    default_duration: float
    max_prompt_length: int
    max_body_kb: int
    max_upload_mb: float
    melody_formats: list[str]
    formats: dict[str, FormatInfo]


class ModelsView(BaseModel):
    default_model: str
    default_format: str
    models: list[ModelInfo]
    limits: Limits


class Health(BaseModel):
    status: str


class CheckView(BaseModel):
    name: str
    status: str


class Readiness(BaseModel):
    status: str
    checks: list[CheckView]


class QuotaWindow(BaseModel):
    """One quota window: what was used of the limit (null: unlimited) and when it resets."""

    used: float
    limit: float | None
    remaining: float | None
    resets_at: datetime


class UsageView(BaseModel):
    """The key's user: its tier, jobs and seconds of audio used per window, the GPU seconds
    its jobs took this month (reported, not limited) and the key's request rate."""

    user_id: str
    tier: str
    jobs: dict[str, QuotaWindow] = Field(description="`day` and `month`")
    audio_seconds: dict[str, QuotaWindow] = Field(description="`day` and `month`")
    gpu_seconds_this_month: float
    rate: str | None = Field(description="`api.rate` per key (null: none)")
