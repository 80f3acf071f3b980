"""musicgen-pipeline: enqueue MusicGen jobs from any Python service.

    import pipeline
    handle = pipeline.enqueue(pipeline.GenerationRequest(prompt="calm lo-fi piano", duration=8))
    result = handle.wait(timeout=300)

The producer side only: importing this package never imports torch, transformers or ffmpeg.
"""

from pipeline.client.handle import JobHandle, Partial, Progress
from pipeline.client.producer import (
    Producer,
    enqueue,
    enqueue_many,
    get_job,
    list_jobs,
    reload_settings,
)
from pipeline.client.records import JobPage, JobRecord
from pipeline.config import Settings, load_settings
from pipeline.contract.jobs import GenerationRequest, JobResult, JobStatus
from pipeline.contract.streams import AudioChunk
from pipeline.errors import (
    Backpressure,
    CoordinationUnavailable,
    GpuOutOfMemory,
    InputUnavailable,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobIdConflict,
    JobNotFinished,
    JobNotFound,
    JobTimeout,
    ModelNotFound,
    ModelRuntimeError,
    NoPartial,
    PayloadTooLarge,
    PipelineError,
    PoisonJob,
    PostProcessFailed,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
    SettingsError,
    StorageUnavailable,
    TransientError,
    Unauthorized,
    UnsupportedMediaType,
    UnsupportedOption,
    WebhookSignatureInvalid,
)

__all__ = [
    # the job contract
    "GenerationRequest", "JobResult", "JobStatus", "JobHandle", "Progress", "Partial",
    "AudioChunk",
    "JobRecord", "JobPage",
    # the producer
    "enqueue", "enqueue_many", "get_job", "list_jobs", "Producer",
    # settings
    "Settings", "load_settings", "reload_settings",
    # errors: the request
    "PipelineError", "SettingsError", "InvalidRequest", "JobIdConflict", "UnsupportedOption",
    "ModelNotFound", "QuotaExceeded", "InputUnavailable",
    # errors: the job
    "JobNotFound", "JobNotFinished", "NoPartial", "JobFailed", "JobCancelled", "JobTimeout", "PoisonJob",
    # errors: the service (TransientError and its subclasses are retried by the worker)
    "ServiceUnavailable", "Backpressure", "StorageUnavailable", "TransientError",
    "CoordinationUnavailable", "GpuOutOfMemory", "PostProcessFailed", "ModelRuntimeError",
    # errors: the HTTP gateway and webhooks
    "Unauthorized", "RateLimited", "PayloadTooLarge", "UnsupportedMediaType",
    "WebhookSignatureInvalid",
]
