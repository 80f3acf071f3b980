"""``/v1/jobs``: enqueue, follow, fetch and cancel a job. Each route authenticates the caller,
then asks the producer; every refusal is the producer's typed error (pipeline/gateway/errors.py
maps it). A key only ever reaches its own jobs: lookups pass its user to ``get_job``."""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import RedirectResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable

from pipeline.contract.jobs import JOB_ID_PATTERN
from pipeline.errors import JobNotFinished, JobNotFound, UnsupportedMediaType
from pipeline.gateway.auth import Caller, caller
from pipeline.gateway.errors import ErrorBody, http_error
from pipeline.gateway.models import CancelView, JobView
from pipeline.gateway.sse import EventStream, event_stream
from pipeline.gateway.uploads import discard, read_json, read_multipart
from pipeline.gateway.views import MEDIA_TYPES, job_view

if TYPE_CHECKING:
    from pipeline.gateway.app import Gateway

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="the job's id")]
Who = Annotated[Caller, Depends(caller)]

_REASONS = {401: "no API key, or an unknown or revoked one", 404: "no such job for this key",
            409: "a conflict with the job's state or id", 413: "the body or upload is too large",
            415: "the body is neither JSON nor multipart", 416: "the range is outside the file",
            422: "the request is invalid (`field` names what)",
            429: "over a quota, a rate or the queue's backlog (see Retry-After)",
            503: "the broker, the database or the model is unavailable (see Retry-After)"}


def _errors(*statuses: int, json_only: bool = False) -> dict[int | str, dict[str, Any]]:
    if json_only:  # a route whose own response is not JSON: its errors still are
        return {status: {"description": _REASONS[status], "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/ErrorBody"}}}} for status in statuses}
    return {status: {"model": ErrorBody, "description": _REASONS[status]} for status in statuses}


# The body is read by hand (streamed, within its limits), so its schema is declared here: the
# JSON form is JobRequest; the multipart form carries it as the `request` part beside a file.
_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}},
    "multipart/form-data": {
        "schema": {"type": "object", "required": ["request"], "properties": {
            "request": {"$ref": "#/components/schemas/JobRequest"},
            "melody": {"type": "string", "format": "binary",
                       "description": "an audio file, for melody presets"}}},
        "encoding": {"request": {"contentType": "application/json"}}}}}}


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


_REPLAYED: dict[int | str, dict[str, Any]] = {200: {"model": JobView, "description": "a replay: the same request again with the "
                   "same Idempotency-Key or job_id gives the first job "
                   "(`Idempotent-Replayed: true`)"}}
_IDEMPOTENCY_KEY = {"parameters": [{
    "name": "Idempotency-Key", "in": "header", "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    "description": "makes a retry safe: the same key with the same request gives the first "
                   "job; with another request, 409 job_id_conflict. Scoped to the key's user"}]}


@router.post("", status_code=202, response_model=JobView, summary="Enqueue a job",
             responses={**_REPLAYED, **_errors(401, 409, 413, 415, 422, 429, 503)},
             openapi_extra={**_REQUEST_BODY, **_IDEMPOTENCY_KEY})
async def create_job(request: Request, response: Response, who: Who) -> Any:
    """Validate, admit (quota, rate, breaker, backlog) and queue one job; 202 with the job.

    An ``Idempotency-Key`` header (or a ``job_id`` in the body) makes a retry safe: the same
    key with the same request answers 200 with the first job and ``Idempotent-Replayed:
    true``; with another request, 409 ``job_id_conflict``."""
    gateway = _gateway(request)
    idempotency_key = request.headers.get("idempotency-key")
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind == "application/json":
        body = await read_json(request, gateway.body_limit)
    elif kind == "multipart/form-data":
        body = await read_multipart(request, request_limit=gateway.body_limit,
                                    melody_limit=gateway.upload_limit, folder=gateway.upload_dir)
    else:
        raise UnsupportedMediaType(f"send application/json, or multipart/form-data with a "
                                   f"melody file; not {kind or 'no Content-Type'}", "Content-Type")
    try:
        handle = await run_in_threadpool(gateway.enqueue, body, who.user_id, idempotency_key)
    except BaseException:
        discard(body)
        raise
    response.headers["Location"] = f"/v1/jobs/{handle.id}"
    if handle.replayed:  # the first job, not a new one (Stripe's header name)
        discard(body)
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return await run_in_threadpool(job_view, handle)


@router.get("/{job_id}", response_model=JobView, summary="A job's status, progress and result",
            responses=_errors(401, 404, 422, 429, 503))
def get_job(job_id: JobId, request: Request, who: Who) -> Any:
    return job_view(_gateway(request).producer.get_job(job_id, user_id=who.user_id))


@router.get("/{job_id}/events", response_class=EventStream, summary="Server-Sent Events",
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": "`progress` events, then one `state` event with "
                                            "the final job; the stream then ends"},
                       **_errors(401, 404, 422, 429, 503, json_only=True)})
async def job_events(job_id: JobId, request: Request, who: Who) -> EventStream:
    producer = _gateway(request).producer
    handle = await run_in_threadpool(producer.get_job, job_id, who.user_id)
    return event_stream(handle, job_view)


class _AudioFile(FileResponse):
    """Starlette's file response (streamed, with Range) that ignores a malformed Range header
    and sends the whole file, as RFC 9110 allows, instead of a plain-text 400."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except MalformedRangeHeader:
            return []


_AUDIO_TYPES = {media.split(";")[0] for media in MEDIA_TYPES.values()}


@router.get("/{job_id}/audio", summary="The finished file (Range supported)",
            response_class=FileResponse,
            responses={200: {"content": {t: {"schema": {"type": "string", "format": "binary"}}
                                         for t in sorted(_AUDIO_TYPES)},
                             "description": "the whole file"},
                       206: {"description": "the requested byte range"},
                       307: {"description": "the file in object storage (a pre-signed URL)"},
                       **_errors(401, 404, 409, 416, 422, 429, 503, json_only=True)})
def job_audio(job_id: JobId, request: Request, who: Who) -> Response:
    handle = _gateway(request).producer.get_job(job_id, user_id=who.user_id)
    result = handle.result()  # JobFailed / JobCancelled: 409 with the job's own code
    if result is None:
        raise JobNotFinished(f"job {job_id} has not finished yet; follow "
                             f"/v1/jobs/{job_id}/events", "job_id")
    # Object storage (issue 13) gives results a pre-signed URL: the file is served from there.
    download_url = getattr(result, "download_url", None)
    if download_url:
        return RedirectResponse(str(download_url), status_code=307)
    path = FilePath(result.output_path or "")
    if not result.output_path or not path.is_file():
        raise JobNotFound(f"the audio of job {job_id} is no longer stored "
                          "(storage.retention_days)", "job_id")
    size = path.stat().st_size
    ranges = request.headers.get("range")
    if ranges is not None:
        try:
            _AudioFile._parse_range_header(ranges, size)
        except RangeNotSatisfiable:
            return http_error(416, f"the range {ranges[:64]!r} is outside the file's {size} bytes",
                              "Range", {"Content-Range": f"bytes */{size}"})
    return _AudioFile(path, media_type=MEDIA_TYPES.get(result.format, "application/octet-stream"),
                      filename=f"{job_id}{path.suffix}", content_disposition_type="inline")


@router.delete("/{job_id}", response_model=CancelView, summary="Cancel a job",
               responses=_errors(401, 404, 422, 429, 503))
def cancel_job(job_id: JobId, request: Request, who: Who) -> Any:
    """A queued job never starts; a running one stops at its next progress step."""
    handle = _gateway(request).producer.get_job(job_id, user_id=who.user_id)
    cancelled = handle.cancel()
    return {"id": job_id, "cancelled": cancelled, "status": handle.status()}

