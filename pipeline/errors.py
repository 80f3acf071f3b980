"""The one exception tree of musicgen-pipeline.

Every error carries a stable machine-readable ``code`` (a calling service branches on it) and a
human message. Errors cross process boundaries (worker -> Redis -> caller), so each class passes
all of its constructor arguments to ``Exception.__init__`` (they pickle intact) and offers
``to_dict`` / ``from_dict`` for the JSON that crosses the broker.

``retryable`` splits the tree: permanent errors (bad input, unsupported option, model not found)
never burn a GPU retry; transient ones (CUDA out of memory, broker hiccup, ffmpeg crash) do.
"""

from __future__ import annotations

from typing import Any


class PipelineError(Exception):
    """Raised when anything in musicgen-pipeline fails; the base of the tree."""

    code = "pipeline_error"
    retryable = False
    # The HTTP status the gateway answers with (pipeline/gateway/errors.py); subclasses inherit
    # their family's: a bad request 422, an outage or a transient failure 503, else 500.
    http_status = 500

    def __init_subclass__(cls, *, code: str | None = None, http_status: int | None = None,
                          retryable: bool | None = None, **kwargs: Any) -> None:
        """Each class states its code (and status, retryability) in its header:
        ``class JobNotFound(PipelineError, code="job_not_found", http_status=404)``."""
        super().__init_subclass__(**kwargs)
        if code is not None:
            cls.code = code
        if http_status is not None:
            cls.http_status = http_status
        if retryable is not None:
            cls.retryable = retryable

    # Positional-or-keyword on purpose: pickle and Celery's JSON exception transport both
    # rebuild an exception as ``cls(*args)``, so every argument must be in ``args``.
    def __init__(self, message: str, field: str | None = None, details: Any = None) -> None:
        super().__init__(message, field, details)
        self.message = message
        self.field = field
        self.details = details

    def __str__(self) -> str:
        where = f" [{self.field}]" if self.field else ""
        return f"{self.code}{where}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form that crosses the broker and the CLI's --json output."""
        return {"code": self.code, "message": self.message, "field": self.field,
                "details": self.details}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineError:
        """Rebuild the most specific known class for ``data['code']``."""
        klass = _BY_CODE.get(str(data.get("code")), PipelineError)
        err = klass(str(data.get("message", "")), data.get("field"), data.get("details"))
        if klass is PipelineError and data.get("code"):
            err.code = str(data["code"])
        return err


# --- settings -------------------------------------------------------------------------------

class SettingsError(PipelineError, code="invalid_settings"):
    """Raised when the layered settings cannot be loaded or do not validate.

    ``details`` holds the full report: a list of ``{path, value, rule, fix}`` dicts.
    """


# --- the job contract: permanent errors -----------------------------------------------------

class InvalidRequest(PipelineError, code="invalid_request", http_status=422):
    """Raised when a generation request fails validation; ``field`` names the offending field.

    ``details`` lists every problem found as ``{field, message, type}`` dicts.
    """


class JobIdConflict(InvalidRequest, code="job_id_conflict", http_status=409):
    """Raised when a client ``job_id`` is already taken by another user's job (``field``:
    ``job_id``); nothing is changed, and the other job is neither returned nor revealed."""


class UnsupportedOption(PipelineError, code="unsupported_option", http_status=422):
    """Raised when a request asks for something this deployment cannot do (format, duration)."""


class ModelNotFound(PipelineError, code="model_not_found", http_status=422):
    """Raised when a model preset, hub id or local checkpoint path does not exist."""


class JobNotFound(PipelineError, code="job_not_found", http_status=404):
    """Raised when a job id is unknown to the result backend."""


class JobFailed(PipelineError, code="job_failed", http_status=409):
    """Raised by ``JobHandle.result()`` when the job failed; carries the worker's error.

    ``details`` is ``{"error_code": ..., "error_message": ...}`` from the worker.
    """

    @property
    def error_code(self) -> str | None:
        return (self.details or {}).get("error_code")


class JobCancelled(PipelineError, code="job_cancelled", http_status=409):
    """Raised by ``JobHandle.result()`` when the job was cancelled."""


class JobTimeout(PipelineError, TimeoutError, code="timeout"):
    """Raised when a job passes its time limit, or a caller's wait runs out; a ``TimeoutError``
    too, so code written for ``concurrent.futures`` (``except TimeoutError``) catches it."""

    def __init__(self, message: str, field: str | None = None, details: Any = None) -> None:
        super().__init__(message, field, details)
        # OSError's __init__ reads the arguments as (errno, strerror, filename) and keeps only
        # two in ``args``: put all three back, so the error pickles and crosses Celery intact.
        self.args = (message, field, details)
        self.errno = self.strerror = self.filename = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args, self.__dict__)


class PoisonJob(PipelineError, code="poison_job"):
    """Raised when a job was delivered more than ``worker.redelivery_cap`` times without
    finishing (it keeps killing its worker); it is failed instead of looping."""


class QuotaExceeded(PipelineError, code="quota_exceeded", http_status=429):
    """Raised when a user's daily or monthly quota would be exceeded.

    ``details`` says which limit, what was used, the limit, and when it resets (ISO 8601).
    """


# --- the service: fail fast ---------------------------------------------------------------

class ServiceUnavailable(PipelineError, code="service_unavailable", http_status=503):
    """Raised when the service cannot take jobs: circuit open, broker down, ffmpeg missing.

    ``details`` may hold ``retry_after`` in seconds.
    """


class Backpressure(ServiceUnavailable, code="backpressure", http_status=429):
    """Raised when a queue's backlog is past its threshold; enqueue later."""


# --- transient errors: retried with backoff -----------------------------------------------

class TransientError(PipelineError, code="transient", http_status=503, retryable=True):
    """Raised when a job failed for a reason that may pass (the worker retries it)."""


class CoordinationUnavailable(TransientError, code="coordination_unavailable"):
    """Raised in a worker when the Redis of the shared policies (breaker, rate limit, cancel
    flags, delivery counts) stays unreachable past a failover's length; the job is retried."""


class GpuOutOfMemory(TransientError, code="gpu_oom"):
    """Raised when CUDA runs out of memory; the worker frees its cache and retries."""


class PostProcessFailed(TransientError, code="postprocess_failed"):
    """Raised when ffmpeg crashes or returns non-zero on input it should accept."""


class ModelRuntimeError(TransientError, code="model_runtime_error"):
    """Raised when the model fails during generation for a reason other than bad input."""


# --- the HTTP gateway (pipeline/gateway): refused before the producer is asked ---------------

class Unauthorized(PipelineError, code="unauthorized", http_status=401):
    """Raised when an HTTP request carries no API key, or one that is unknown or revoked."""


class RateLimited(PipelineError, code="rate_limited", http_status=429):
    """Raised when an API key sends requests faster than ``api.rate``;
    ``details["retry_after"]`` is when the next one is admitted (seconds)."""


class PayloadTooLarge(PipelineError, code="payload_too_large", http_status=413):
    """Raised when a request body or a melody upload passes ``api.max_body_kb`` or
    ``api.max_upload_mb``; ``field`` names the part (``request`` or ``melody``)."""


class UnsupportedMediaType(PipelineError, code="unsupported_media_type", http_status=415):
    """Raised when a request body is neither JSON nor multipart/form-data."""


class JobNotFinished(PipelineError, code="job_not_finished", http_status=409):
    """Raised when a job's audio is asked for before the job has succeeded."""


class NoPartial(PipelineError, code="no_partial", http_status=404):
    """Raised when a job's partial audio is asked for and it has none now: a job within the
    model's window, before a long job's first window ends, or after the job ended."""


# --- storage, inputs by reference, webhooks (issue 13) -------------------------------------

class InputUnavailable(PipelineError, code="input_unavailable", http_status=422):
    """Raised when a melody given by reference cannot be fetched (unreachable, missing,
    refused) or is larger than ``validation.max_melody_size_mb``; permanent, never retried.

    ``details["rule"]`` says which: ``unreachable``, ``missing`` or ``max_size_mb``.
    """


class StorageUnavailable(TransientError, code="storage_unavailable"):
    """Raised when the output storage cannot store or return a file: unreachable, refused,
    or the file is gone (past ``storage.retention_days``); ``details["rule"]`` says which."""


class WebhookSignatureInvalid(PipelineError, code="invalid_webhook_signature"):
    """Raised by ``pipeline.webhooks.verify`` when a webhook's signature, id or timestamp does
    not check out (``field`` names the header)."""


def _all_subclasses(cls: type[PipelineError]) -> list[type[PipelineError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[str, type[PipelineError]] = {c.code: c for c in _all_subclasses(PipelineError)}
