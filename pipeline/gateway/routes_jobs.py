"""``/v1/jobs``: enqueue, follow, fetch and cancel a job. Each route authenticates the caller,
then asks the producer; every refusal is the producer's typed error (pipeline/gateway/errors.py
maps it). A key only ever reaches its own jobs: lookups pass its user to ``get_job``."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from fastapi.responses import RedirectResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, MalformedRangeHeader, RangeNotSatisfiable

from pipeline.aio import AsyncProducer
from pipeline.client.handle import JobHandle
from pipeline.client.records import MAX_PAGE
from pipeline.client.streaming import no_stream
from pipeline.contract.jobs import JOB_ID_PATTERN, JobStatus
from pipeline.errors import (
    JobCancelled,
    JobFailed,
    JobNotFinished,
    JobNotFound,
    JobTimeout,
    NoPartial,
    UnsupportedMediaType,
)
from pipeline.gateway.audio_stream import MEDIA_TYPE, open_stream
from pipeline.gateway.auth import Caller, caller, caller_or_token
from pipeline.gateway.errors import error_responses, http_error
from pipeline.gateway.models import CancelView, JobPageView, JobView
from pipeline.gateway.service import Gateway
from pipeline.gateway.sse import EventStream, event_stream
from pipeline.gateway.uploads import discard, read_json, read_multipart
from pipeline.gateway.views import MEDIA_TYPES, job_view, record_view, streams
from pipeline.infra.storage_backends import presign_uri

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

# The longest synchronous wait a request may ask for: a connection held longer than this is
# better served by the event stream (proxies commonly cut idle requests at 60 s).
MAX_WAIT_S = 60

JobId = Annotated[str, Path(pattern=JOB_ID_PATTERN, description="the job's id")]
Who = Annotated[Caller, Depends(caller)]
# One job's read-only routes (events, audio, partial) also take a signed URL's ?token=.
TokenWho = Annotated[Caller, Depends(caller_or_token)]

_errors = error_responses


# The body is read by hand (streamed, within its limits), so its schema is declared here: the
# JSON form is JobRequest; the multipart form carries JobUploadRequest (JobRequest with a
# continuation's span fields) as the `request` part beside a file.
_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/JobRequest"}, "examples": {
        "text": {"summary": "a text prompt", "value": {
            "prompt": "warm lo-fi piano with vinyl crackle", "duration": 8, "format": "mp3"}},
        "seeded": {"summary": "the same clip again: a fixed seed and model", "value": {
            "prompt": "80s synthwave, driving bass", "duration": 12, "seed": 42,
            "model": "musicgen-small", "format": "wav", "sample_rate": 44100}}}},
    "multipart/form-data": {
        "schema": {"type": "object", "required": ["request"], "properties": {
            "request": {"$ref": "#/components/schemas/JobUploadRequest"},
            "melody": {"type": "string", "format": "binary",
                       "description": "an audio file, for melody presets"},
            "continuation": {"type": "string", "format": "binary",
                             "description": "an audio clip the model continues (see the "
                                          "request's continuation_start, continuation_end "
                                          "and continuation_included); not with a melody"}}},
        "encoding": {"request": {"contentType": "application/json"}}}}}}


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _signed(request: Request, who: Caller, view: dict[str, Any]) -> dict[str, Any]:
    """``view`` with its ``signed_urls`` for ``who`` (pipeline/gateway/url_tokens.py)."""
    signer = request.app.state.authenticator.signer
    return {**view, "signed_urls": signer.signed_urls(view["id"], who.user_id, view["urls"])}


_LOCATION = {"Location": {"description": "the job's URL", "schema": {"type": "string"}}}
_ACCEPTED: dict[int | str, dict[str, Any]] = {
    200: {"model": JobView, "headers": {**_LOCATION, "Idempotent-Replayed": {
              "description": "`true`", "schema": {"type": "string"}}},
          "description": "a replay: the same request again with the same Idempotency-Key or "
                         "job_id gives the first job (`Idempotent-Replayed: true`)"},
    201: {"model": JobView, "headers": {**_LOCATION, "Preference-Applied": {
              "description": "`wait=N`", "schema": {"type": "string"}}},
          "description": "with `Prefer: wait=N`: the job, finished within N seconds"},
    202: {"headers": _LOCATION, "description": "queued: follow `urls.events` or poll "
                                               "`urls.get`"},
}
_HEADERS = {"parameters": [{
    "name": "Idempotency-Key", "in": "header", "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    "description": "makes a retry safe: the same key with the same request gives the first "
                   "job; with another request, 409 job_id_conflict. Scoped to the key's user"}, {
    "name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"},
    "example": "wait=30",
    "description": f"`wait=N` (1 to {MAX_WAIT_S} seconds): answer when the job ends if it "
                   "ends within N seconds (201 with the finished job), else 202 as without "
                   "it. Other preferences are ignored (RFC 7240)"}]}


@router.post("", status_code=202, response_model=JobView, summary="Enqueue a job",
             responses={**_ACCEPTED, **_errors(401, 409, 413, 415, 422, 429, 503)},
             openapi_extra={**_REQUEST_BODY, **_HEADERS})
async def create_job(request: Request, response: Response, who: Who) -> Any:
    """Validate, admit (quota, rate, breaker, backlog) and queue one job; 202 with the job.

    An ``Idempotency-Key`` header (or a ``job_id`` in the body) makes a retry safe: the same
    key with the same request answers 200 with the first job and ``Idempotent-Replayed:
    true``; with another request, 409 ``job_id_conflict``. ``Prefer: wait=N`` holds the
    answer until the job ends, for at most N seconds (Replicate's synchronous mode)."""
    gateway = _gateway(request)
    wait_s = preferred_wait(request.headers.get("prefer"))
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
    if wait_s is not None:
        response.headers["Preference-Applied"] = f"wait={wait_s}"
        if await _finished_within(gateway, handle, wait_s) and not handle.replayed:
            response.status_code = 201
    return _signed(request, who, await run_in_threadpool(job_view, handle))


def preferred_wait(prefer: str | None) -> int | None:
    """The ``wait`` of a ``Prefer`` header (RFC 7240: ``wait=30``, among other preferences),
    capped at ``MAX_WAIT_S``; None when it asks for none. A preference the server cannot
    read is ignored, as the RFC says, not refused."""
    for preference in (prefer or "").split(","):
        name, _, value = preference.partition("=")
        if name.strip().lower() == "wait" and value.strip().isdigit():
            seconds = int(value.strip())
            return min(seconds, MAX_WAIT_S) if seconds > 0 else None
    return None


async def _finished_within(gateway: Gateway, handle: JobHandle, seconds: float) -> bool:
    """Wait (woken by the result backend, ``pipeline.aio``) until the job ends or ``seconds``
    pass; whether it ended. How it ended is the view's to say."""
    client = AsyncProducer(gateway.producer)
    try:
        await client.wrap(handle).wait(timeout=seconds)
    except JobTimeout:
        return False
    except (JobFailed, JobCancelled):
        pass
    finally:
        await client.close()
    return True


@router.get("", response_model=JobPageView, summary="The key's jobs, newest first",
            responses=_errors(401, 422, 429, 503))
def list_jobs(request: Request, who: Who,
              status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
              since: Annotated[datetime | None, Query(description="only jobs enqueued at or "
                                                                  "after this time")] = None,
              limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 20,
              cursor: Annotated[str | None, Query(max_length=512, description="a page's "
                                                  "next_cursor")] = None) -> Any:
    """The key's jobs from the ledger, as long as their files are kept; one page of ``limit``
    at a time (pass ``next_cursor`` as ``cursor``). A running job shows as started: its live
    progress is at ``GET /v1/jobs/{id}``."""
    page = _gateway(request).producer.list_jobs(who.user_id, status=status, since=since,
                                                limit=limit, cursor=cursor)
    return {"jobs": [_signed(request, who, record_view(record)) for record in page.jobs],
            "next_cursor": page.next_cursor}


@router.get("/{job_id}", response_model=JobView, summary="A job's status, progress and result",
            responses=_errors(401, 404, 422, 429, 503))
def get_job(job_id: JobId, request: Request, who: Who) -> Any:
    return _signed(request, who,
                   job_view(_gateway(request).producer.get_job(job_id, user_id=who.user_id)))


@router.get("/{job_id}/events", response_class=EventStream, summary="Server-Sent Events",
            responses={200: {"content": {"text/event-stream": {
                "schema": {"type": "string"},
                "example": 'retry: 2000\n\nid: 5c1f0e2a9b7d4e13\nevent: progress\ndata: '
                           '{"id": "a1b2c3", "status": "progress", "progress": {"fraction": '
                           '0.4, "message": "generating"}}\n\nid: final\nevent: state\n'
                           'data: {"id": "a1b2c3", "status": "succeeded", ...}\n\n'}},
                "description": "The event types: `progress` (data: `{id, status, progress: "
                               "{fraction, message}, partial}`, on each change, with an `id:`); "
                               "`chunk` (a stream=True job: data `{attempt, index, start_s, "
                               "seconds, sample_rate, channels}` per chunk of its audio, "
                               "`id: chunk-<attempt>-<index>`; the audio is at `urls.stream`); "
                               "`state` "
                               "(data: the final `JobView`, `id: final`), after which the "
                               "stream ends; `error` (data: an `ErrorBody`: the result backend "
                               "could not be read; reconnect). The stream starts with "
                               "`retry:` and sends a `: keepalive` comment every 15 s"},
                       **_errors(401, 404, 422, 429, 503, json_only=True)})
async def job_events(job_id: JobId, request: Request, who: TokenWho,
                     last_event_id: Annotated[str | None, Header(
                         alias="Last-Event-ID", max_length=64,
                         description="sent by a reconnecting EventSource: progress the "
                                     "client already has is not repeated")] = None,
                     ) -> EventStream:
    producer = _gateway(request).producer
    handle = await run_in_threadpool(producer.get_job, job_id, who.user_id)
    return event_stream(producer, handle, last_event_id,
                        finish=lambda view: _signed(request, who, view),
                        chunks=await run_in_threadpool(_streams, handle))


def _streams(handle: JobHandle) -> bool:
    """Whether the job was enqueued with ``stream=True`` (its ledger row's request)."""
    try:
        return streams(handle.record())
    except JobNotFound:  # no ledger row (quotas off): no chunk events
        return False


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
def job_audio(job_id: JobId, request: Request, who: TokenWho) -> Response:
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
    return _file(request, path, result.format, f"{job_id}{path.suffix}")


def _file(request: Request, path: FilePath, audio_format: str, filename: str) -> Response:
    """``path`` streamed inline with Range support; 416 for a range outside it."""
    size = path.stat().st_size
    ranges = request.headers.get("range")
    if ranges is not None:
        try:
            _AudioFile._parse_range_header(ranges, size)
        except RangeNotSatisfiable:
            return http_error(416, f"the range {ranges[:64]!r} is outside the file's {size} bytes",
                              "Range", {"Content-Range": f"bytes */{size}"})
    return _AudioFile(path, media_type=MEDIA_TYPES.get(audio_format, "application/octet-stream"),
                      filename=filename, content_disposition_type="inline")


@router.get("/{job_id}/partial", summary="A running long job's audio so far",
            response_class=FileResponse,
            responses={200: {"content": {t: {"schema": {"type": "string", "format": "binary"}}
                                         for t in sorted(_AUDIO_TYPES)},
                             "description": "a complete file of the windows generated so far "
                                            "(replaced after each window)"},
                       206: {"description": "the requested byte range"},
                       307: {"description": "the file in object storage (a pre-signed URL)"},
                       **_errors(401, 404, 416, 422, 429, 503, json_only=True)})
def job_partial(job_id: JobId, request: Request, who: TokenWho) -> Response:
    """A long job publishes the audio it has after each window (``partial`` in its view); once
    the job ends the partial is gone and ``/audio`` is what counts (404 ``no_partial``)."""
    gateway = _gateway(request)
    partial = gateway.producer.get_job(job_id, user_id=who.user_id).partial()
    if partial is None:
        raise NoPartial(f"job {job_id} has no partial audio now: only a running job longer "
                        "than the model's window has one, after its first window", "job_id")
    if partial.path is None:  # object storage: served from there, as the final file is
        url, _ = presign_uri(partial.uri, gateway.settings.storage)
        if url is None:
            raise NoPartial(f"the partial audio of job {job_id} cannot be served", "job_id")
        return RedirectResponse(url, status_code=307)
    path = FilePath(partial.path)
    if not path.is_file():  # replaced or removed between the state read and now
        raise NoPartial(f"job {job_id}'s partial audio was just replaced or removed; ask "
                        "again", "job_id")
    return _file(request, path, partial.format, f"{job_id}.partial{path.suffix}")


@router.get("/{job_id}/stream", summary="A stream=True job's audio as it is generated",
            response_class=StreamingResponse,
            responses={200: {"content": {MEDIA_TYPE: {"schema": {"type": "string",
                                                                "format": "binary"}}},
                             "description": "MP3 over chunked transfer, from the clip's start "
                                            "(however late the request), ending with the job; "
                                            "the model's raw level (loudness normalization "
                                            "applies to the finished file)"},
                       **_errors(401, 404, 409, 422, 429, 503, json_only=True)})
async def job_stream(job_id: JobId, request: Request, who: TokenWho) -> StreamingResponse:
    """Answers once the job's first chunk is here (a queued job: when it starts); a job not
    enqueued with ``stream=True`` is 422 ``invalid_request`` (field ``stream``), a failed or
    cancelled one before its first chunk 409 with its own code."""
    gateway = _gateway(request)
    handle = await run_in_threadpool(gateway.producer.get_job, job_id, who.user_id)
    try:
        record = await run_in_threadpool(handle.record)
    except JobNotFound:  # no ledger row (quotas off): the stream itself says whether it exists
        record = None
    if record is not None and not streams(record):
        raise no_stream(job_id)
    client = AsyncProducer(gateway.producer)
    frames = await open_stream(client.wrap(handle), client)
    # no-cache and no proxy buffering: each frame must reach the player when it is made.
    return StreamingResponse(frames, media_type=MEDIA_TYPE,
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.delete("/{job_id}", response_model=CancelView, summary="Cancel a job",
               responses=_errors(401, 404, 422, 429, 503))
def cancel_job(job_id: JobId, request: Request, who: Who) -> Any:
    """A queued job never starts; a running one stops at its next progress step."""
    handle = _gateway(request).producer.get_job(job_id, user_id=who.user_id)
    cancelled = handle.cancel()
    return {"id": job_id, "cancelled": cancelled, "status": handle.status()}

