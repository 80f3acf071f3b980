"""What the gateway shows of a job and of the deployment, read through the producer's handle
and the settings (no state of its own)."""

from __future__ import annotations

from typing import Any

from pipeline.client.handle import JobHandle, partial_of, progress_of
from pipeline.client.records import JobRecord
from pipeline.config.presets import known_presets, model_settings_for
from pipeline.config.schema import Settings
from pipeline.contract.jobs import JobStatus
from pipeline.contract.output_format import FORMATS
from pipeline.contract.public_result import RESULT_EXCLUDED, job_path
from pipeline.errors import JobCancelled, JobFailed, JobNotFound, SettingsError
from pipeline.quota.store import UsageSummary
from pipeline.quota.windows import UNLIMITED, SecondsUsage, WindowUsage

# The Content-Type of each output format, from the format table (pipeline/contract/output_format.py).
MEDIA_TYPES: dict[str, str] = {name: info.media_type for name, info in FORMATS.items()}


def audio_url(job_id: str) -> str:
    return job_path(job_id, "/audio")


def job_urls(job_id: str, *, succeeded: bool, partial: bool = False) -> dict[str, str | None]:
    own = job_path(job_id)
    return {"get": own, "cancel": own, "events": f"{own}/events",
            "audio": audio_url(job_id) if succeeded else None,
            "partial": f"{own}/partial" if partial else None, "stream": None}


def job_view(handle: JobHandle) -> dict[str, Any]:
    """The job as ``JobView``: status and progress, and the result or the error once final,
    all from one read of its stored state; its times and request from the ledger.

    Raises what the handle raises for the job as a whole (``JobNotFound``,
    ``ServiceUnavailable``); a failed or cancelled job is a view with an error, not an error.
    """
    return with_record(view_of_state(handle, *handle._state()), handle)


def with_record(view: dict[str, Any], handle: JobHandle) -> dict[str, Any]:
    """``view`` with the ledger's times and request echo (left null without a ledger row:
    quotas off, or a row from before requests were recorded)."""
    try:
        record = handle.record()
    except JobNotFound:
        return view
    return _with_stream_url({**view, **_times(record)}, record)


def _times(record: JobRecord) -> dict[str, Any]:
    return {"created_at": record.created_at, "started_at": record.started_at,
            "completed_at": record.finished_at, "request": record.request}


def streams(record: JobRecord | None) -> bool:
    """Whether the job was enqueued with ``stream=True`` (its request, from the ledger)."""
    return bool(record is not None and record.request and record.request.get("stream"))


def _with_stream_url(view: dict[str, Any], record: JobRecord) -> dict[str, Any]:
    """``urls.stream`` for a job that streams: its audio as it is generated (audio_stream.py)."""
    if not streams(record):
        return view
    return {**view, "urls": {**view["urls"], "stream": job_path(view["id"], "/stream")}}


def record_view(record: JobRecord) -> dict[str, Any]:
    """A listed job, as ``JobView``, from its ledger row alone (a page reads no Redis): the
    ledger knows queued, started and the end, not a running job's fraction; ``GET
    /v1/jobs/{id}`` has the live progress."""
    succeeded = record.status is JobStatus.succeeded
    view: dict[str, Any] = {
        "id": record.job_id, "status": record.status,
        "progress": {"fraction": 1.0 if succeeded else 0.0, "message": record.status.value},
        "result": None, "error": record.error, "audio_url": None,
        "urls": job_urls(record.job_id, succeeded=succeeded), **_times(record)}
    if succeeded and record.result is not None:
        view["result"] = record.result.model_dump(mode="json", exclude=set(RESULT_EXCLUDED))
        view["audio_url"] = audio_url(record.job_id)
    return _with_stream_url(view, record)


def view_of_state(handle: JobHandle, state: str, info: Any) -> dict[str, Any]:
    """``job_view`` of a state already read (Celery's state and info: what the event stream
    is told by ``AsyncJobHandle.changes``). Blocking only for a job with no stored state (it
    asks the claim registry whether the job exists)."""
    status = handle._status_of(state, info)
    progress = progress_of(state, info)
    view: dict[str, Any] = {"id": handle.id, "status": status,
                            "progress": {"fraction": progress.fraction,
                                         "message": progress.message},
                            "result": None, "error": None, "audio_url": None,
                            "urls": job_urls(handle.id, succeeded=False)}
    if not status.finished:
        partial = partial_of(state, info)
        if partial is not None:  # a long job's audio so far (workers/partials.py)
            view["partial"] = {"window": partial.window, "windows": partial.windows,
                               "seconds": partial.seconds}
            view["urls"] = job_urls(handle.id, succeeded=False, partial=True)
        return view
    try:
        result = handle._ended(state, info)
    except JobFailed as failed:
        details = failed.details if isinstance(failed.details, dict) else {}
        view["error"] = {"code": str(details.get("error_code") or failed.code),
                         "message": str(details.get("error_message") or failed.message)}
        view["status"] = JobStatus.failed
        return view
    except JobCancelled as cancelled:
        view["error"] = {"code": cancelled.code, "message": cancelled.message}
        view["status"] = JobStatus.cancelled
        return view
    if result is not None:
        view["result"] = result.model_dump(mode="json", exclude=set(RESULT_EXCLUDED))
        view["audio_url"] = audio_url(handle.id)
        view["urls"] = job_urls(handle.id, succeeded=True)
    return view


def models_view(settings: Settings) -> dict[str, Any]:
    """The presets a request may name, each with its window, and the request limits."""
    gen, validation = settings.generation, settings.validation
    models = []
    for name in known_presets():
        try:
            model = model_settings_for(settings, name)
        except SettingsError:  # a preset these settings cannot run is not offered
            continue
        models.append({"name": name, "description": model.description,
                       "max_duration": min(model.max_duration, gen.max_duration),
                       "melody": model.melody})
    upload_mb = settings.api.max_upload_mb or validation.max_melody_size_mb
    return {
        "default_model": settings.model.preset,
        "default_format": settings.audio.format,
        "models": models,
        "limits": {
            "min_duration": gen.min_duration, "max_duration": gen.max_duration,
            "default_duration": gen.default_duration,
            "max_prompt_length": validation.max_prompt_length,
            "max_body_kb": settings.api.max_body_kb, "max_upload_mb": upload_mb,
            "melody_formats": list(validation.melody_formats),
            "formats": {name: {"sample_rates": list(info.sample_rates),
                               "bit_depths": list(info.bit_depths),
                               "media_type": MEDIA_TYPES[name]}
                        for name, info in FORMATS.items()},
        },
    }


def _window(usage: WindowUsage | SecondsUsage | None) -> dict[str, Any] | None:
    if usage is None:
        return None
    unlimited = usage.limit == UNLIMITED
    return {"used": usage.used, "limit": None if unlimited else usage.limit,
            "remaining": usage.remaining, "resets_at": usage.resets_at}


def usage_view(usage: UsageSummary, rate: str | None) -> dict[str, Any]:
    """``UsageView`` of the quota store's summary."""
    return {"user_id": usage.user_id, "tier": usage.tier,
            "jobs": {"day": _window(usage.daily), "month": _window(usage.monthly)},
            "audio_seconds": {name: window for name, window in (
                ("day", _window(usage.daily_seconds)),
                ("month", _window(usage.monthly_seconds))) if window is not None},
            "gpu_seconds_this_month": usage.monthly_gpu_seconds, "rate": rate}
