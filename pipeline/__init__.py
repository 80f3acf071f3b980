"""musicgen-pipeline: enqueue MusicGen jobs from any Python service.

The producer side only: importing this package never imports torch, transformers or ffmpeg.
"""

from pipeline.config import Settings, load_settings
from pipeline.errors import (
    Backpressure,
    InvalidRequest,
    JobCancelled,
    JobFailed,
    JobNotFound,
    JobTimeout,
    ModelNotFound,
    PipelineError,
    QuotaExceeded,
    ServiceUnavailable,
    SettingsError,
    UnsupportedOption,
)

__all__ = [
    # settings
    "Settings", "load_settings",
    # errors
    "PipelineError", "SettingsError", "InvalidRequest", "UnsupportedOption", "ModelNotFound",
    "JobNotFound", "JobFailed", "JobCancelled", "JobTimeout", "QuotaExceeded",
    "ServiceUnavailable", "Backpressure",
]
