"""What the gateway shows of a job and of the deployment, read through the producer's handle
and the settings (no state of its own)."""

from __future__ import annotations

from typing import Any

from pipeline.client.handle import JobHandle
from pipeline.config.presets import known_presets, model_settings_for
from pipeline.config.schema import Settings
from pipeline.contract.jobs import JobStatus
from pipeline.contract.output_format import FORMATS
from pipeline.errors import JobCancelled, JobFailed, SettingsError
from pipeline.gateway.models import RESULT_EXCLUDED

# The Content-Type of each output format, from the format table (pipeline/contract/output_format.py).
MEDIA_TYPES: dict[str, str] = {name: info.media_type for name, info in FORMATS.items()}


def audio_url(job_id: str) -> str:
    return f"/v1/jobs/{job_id}/audio"


def job_view(handle: JobHandle) -> dict[str, Any]:
    """The job as ``JobView``: status and progress, and the result or the error once final.

    Raises what the handle raises for the job as a whole (``JobNotFound``,
    ``ServiceUnavailable``); a failed or cancelled job is a view with an error, not an error.
    """
    status = handle.status()
    progress = handle.progress()
    view: dict[str, Any] = {"id": handle.id, "status": status,
                            "progress": {"fraction": progress.fraction,
                                         "message": progress.message},
                            "result": None, "error": None, "audio_url": None}
    if not status.finished:
        return view
    try:
        result = handle.result()
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
