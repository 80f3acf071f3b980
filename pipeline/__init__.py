"""musicgen-pipeline: enqueue MusicGen jobs from any Python service.

    import pipeline
    handle = pipeline.enqueue(pipeline.GenerationRequest(prompt="calm lo-fi piano", duration=8))
    result = handle.wait(timeout=300)

The producer side only: importing this package never imports torch, transformers or ffmpeg.
"""

from pipeline.config import Settings, load_settings
from pipeline.errors import (
    Backpressure,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobIdConflict,
    JobNotFound,
    JobTimeout,
    ModelNotFound,
    PipelineError,
    QuotaExceeded,
    ServiceUnavailable,
    SettingsError,
    UnsupportedOption,
)
from pipeline.handle import JobHandle, Progress
from pipeline.jobs import GenerationRequest, JobResult, JobStatus
from pipeline.producer import Producer, enqueue, enqueue_many, get_job, reload_settings

__all__ = [
    # the job contract
    "GenerationRequest", "JobResult", "JobStatus", "JobHandle", "Progress",
    # the producer
    "enqueue", "enqueue_many", "get_job", "Producer",
    # settings
    "Settings", "load_settings", "reload_settings",
    # errors
    "PipelineError", "SettingsError", "InvalidRequest", "JobIdConflict", "UnsupportedOption",
    "ModelNotFound",
    "JobNotFound", "JobFailed", "JobCancelled", "JobTimeout", "QuotaExceeded",
    "ServiceUnavailable", "Backpressure",
]
