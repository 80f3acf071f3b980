"""``JobHandle``: follow one job from the calling service (status, progress, result, cancel)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, overload

from kombu.exceptions import OperationalError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from pipeline.client.records import JobRecord, job_record
from pipeline.client.streaming import BLOCK_S, READ_COUNT, StreamFollower, entries_of, no_stream
from pipeline.contract.jobs import JobResult, JobStatus
from pipeline.contract.outcome import Outcome
from pipeline.contract.streams import AudioChunk
from pipeline.errors import (
    JobCancelled,
    JobFailed,
    JobNotFinished,
    JobNotFound,
    JobTimeout,
    PipelineError,
    ServiceUnavailable,
    UnsupportedOption,
)
from pipeline.infra.changes import FALLBACK_S, changes_of
from pipeline.infra.keys import stream_key
from pipeline.quota.outcomes import record

if TYPE_CHECKING:
    from pipeline.client.registry import JobRegistry
    from pipeline.infra.celery_app import PipelineCelery
    from pipeline.quota import QuotaStore
    from pipeline.webhooks import WebhookDelivery

# Celery's states (and ours: QUEUED is written at enqueue, PROGRESS by the worker).
_STATUS = {
    "QUEUED": JobStatus.queued, "RECEIVED": JobStatus.queued, "RETRY": JobStatus.queued,
    "STARTED": JobStatus.started, "PROGRESS": JobStatus.progress,
    "SUCCESS": JobStatus.succeeded, "FAILURE": JobStatus.failed, "REVOKED": JobStatus.cancelled,
}
# Exceptions Celery raises itself, outside our task code.
_CELERY_CODES = {"TimeLimitExceeded": "timeout", "SoftTimeLimitExceeded": "timeout",
                 "WorkerLostError": "worker_lost"}


@contextmanager
def _reachable(job_id: str) -> Iterator[None]:
    """A Redis or database outage while following a job is the service's, typed as such: every
    failure of the public API is a ``PipelineError`` (the driver's text is not passed on)."""
    try:
        yield
    except PipelineError:  # already typed (JobTimeout is an OSError too: a TimeoutError)
        raise
    except (OperationalError, RedisError, OSError, SQLAlchemyError) as exc:
        raise ServiceUnavailable(f"cannot reach the result backend for job {job_id} "
                                 f"({type(exc).__name__}); try again", None,
                                 {"retry_after": 5}) from exc


@dataclass(frozen=True)
class Progress:
    fraction: float
    message: str


@dataclass(frozen=True)
class Partial:
    """The audio a long job has generated so far: a complete file a caller can start playing,
    replaced after each window (``uri``; ``path`` too on folder storage), ``seconds`` long,
    after ``window`` of ``windows``. Only the job's result counts once it ends."""

    uri: str
    path: str | None
    seconds: float
    window: int
    windows: int
    format: str


def partial_of(state: str, info: Any) -> Partial | None:
    """The partial result in a state already read (``JobHandle.partial``, the gateway's view)."""
    found = info.get("partial") if state == "PROGRESS" and isinstance(info, dict) else None
    if not isinstance(found, dict):
        return None
    try:
        return Partial(uri=str(found["uri"]), path=found.get("path"),
                       seconds=float(found["seconds"]), window=int(found["window"]),
                       windows=int(found["windows"]), format=str(found.get("format", "")))
    except (KeyError, TypeError, ValueError):  # a state no worker of ours would write
        return None


def error_of(info: Any) -> tuple[str, str]:
    """(code, message) of a failed job's stored exception."""
    if isinstance(info, PipelineError):
        return info.code, info.message
    if isinstance(info, BaseException):
        return _CELERY_CODES.get(type(info).__name__, "internal_error"), str(info) or type(info).__name__
    if isinstance(info, dict) and "code" in info:
        return str(info["code"]), str(info.get("message", ""))
    return "internal_error", str(info)


def _fresh(result: JobResult, settings: Any) -> JobResult:
    """The result with its pre-signed ``download_url`` signed again once it is within a minute
    of expiring (the result outlives it: broker.result_expires), when this process can sign
    (the ``storage`` extra and the same keys); otherwise as stored."""
    if result.download_url is None or (result.download_expires_at or 0) > time.time() + 60:
        return result
    try:
        from pipeline.infra.storage_backends import presign_uri

        url, expires_at = presign_uri(result.uri, settings.storage)
    except Exception:  # no boto3 or no keys here: the caller still gets the stored result
        return result
    return result.model_copy(update={"download_url": url, "download_expires_at": expires_at})


def progress_of(state: str, info: Any) -> Progress:
    """The progress a stored (state, info) shows (the sync and asyncio handles share it)."""
    if state == "SUCCESS":
        return Progress(1.0, "done")
    if isinstance(info, dict) and "progress" in info:
        return Progress(float(info["progress"]), str(info.get("message", "")))
    return Progress(0.0, _STATUS.get(state, JobStatus.queued).value)


def report_change(state: str, info: Any, last: Progress | None,
                  on_progress: Callable[[Progress], Any] | None) -> Progress:
    """The progress (state, info) shows, passed to ``on_progress`` when it differs from
    ``last`` (a waiter calls back on change only); returned as the next ``last``."""
    now = progress_of(state, info)
    if on_progress is not None and now != last:
        on_progress(now)
    return now


def _as_state(record: JobRecord) -> tuple[str, Any]:
    """A ledger record in Celery's (state, info) shape, so every reader treats both alike."""
    if record.status is JobStatus.succeeded:
        if record.result is None:  # a row from before results were recorded
            return "PENDING", None
        return "SUCCESS", record.result.model_dump(mode="json")
    if record.status is JobStatus.failed:
        error = record.error or {"code": "internal_error", "message": ""}
        return "FAILURE", {"code": error["code"], "message": error["message"]}
    if record.status is JobStatus.cancelled:
        return "REVOKED", None
    return ("STARTED" if record.status is JobStatus.started else "QUEUED"), None


class _Now(Enum):
    NOW = "now"


class JobHandle:
    """A job accepted by the queue. Cheap to create; every call reads the result backend, and
    the ledger once the result backend has forgotten the job (``pipeline.client.records``).

    ``replayed`` is True when ``enqueue`` found this job already queued for the same
    ``job_id`` and request (an idempotent retry), instead of queueing it. ``priority_clamped``
    is True when the request asked for a priority above its tier's ``max_priority`` and the
    job was queued at that maximum instead (``quotas.priority_over_max = "clamp"``).
    """

    def __init__(self, job_id: str, app: PipelineCelery, registry: JobRegistry,
                 quota: QuotaStore | None = None, *, replayed: bool = False) -> None:
        self.id = job_id
        self.replayed = replayed
        self.priority_clamped = False
        self._app = app
        self._registry = registry
        self._quota = quota

    def __repr__(self) -> str:
        return f"JobHandle({self.id!r})"

    def _state(self) -> tuple[str, Any]:
        """Celery's state and info; once the result backend has forgotten the job (and its
        claim has expired), the ledger's record in the same shape. PENDING: nobody knows it."""
        with _reachable(self.id):
            result = self._app.AsyncResult(self.id)
            state, info = result.state, result.info
            if state != "PENDING" or self._quota is None or self._registry.exists(self.id):
                return state, info
            record = job_record(self._quota, self.id)
        return ("PENDING", None) if record is None else _as_state(record)

    def _exists(self) -> bool:
        with _reachable(self.id):
            return self._registry.exists(self.id)

    def record(self) -> JobRecord:
        """The ledger's record of the job (request, result or error, created, started and
        finished times); ``JobNotFound`` without a ledger (quotas off on an old row)."""
        record = None
        if self._quota is not None:
            with _reachable(self.id):
                record = job_record(self._quota, self.id)
        if record is None:
            raise JobNotFound(f"no ledger record of job {self.id!r}", "job_id")
        return record

    def status(self) -> JobStatus:
        """Where the job is now; ``JobNotFound`` for an id nobody enqueued (or long expired)."""
        return self._status_of(*self._state())

    def _status_of(self, state: str, info: Any) -> JobStatus:
        if state == "PENDING":
            if self._exists():  # claimed, QUEUED not written yet
                return JobStatus.queued
            raise JobNotFound(f"no job with id {self.id!r}", "job_id")
        return _STATUS.get(state, JobStatus.started)

    def done(self) -> bool:
        """True once the job has ended (succeeded, failed or cancelled), like ``Future.done``."""
        return self.status().finished

    def progress(self) -> Progress:
        """How far generation has got (0..1) and what the worker is doing."""
        return progress_of(*self._state())

    def _ended(self, state: str, info: Any) -> JobResult | None:
        if state == "SUCCESS":
            return _fresh(JobResult.model_validate(info), self._app.settings)
        if state == "FAILURE":
            code, message = error_of(info)
            raise JobFailed(f"job {self.id} failed: {code}: {message}", None,
                            {"error_code": code, "error_message": message})
        if state == "REVOKED":
            raise JobCancelled(f"job {self.id} was cancelled", "job_id")
        if state == "PENDING" and not self._exists():
            raise JobNotFound(f"no job with id {self.id!r}", "job_id")
        return None


    def partial(self) -> Partial | None:
        """The latest partial result of a running long job, or None: before its first window
        ends, for a job within the model's window, and once the job has ended (its partial is
        removed then; ``result()`` is what counts)."""
        return partial_of(*self._state())

    @overload
    def result(self) -> JobResult | None: ...

    @overload
    def result(self, timeout: float | None) -> JobResult: ...

    def result(self, timeout: float | None | _Now = _Now.NOW) -> JobResult | None:
        """The result if the job succeeded; raises ``JobFailed`` or ``JobCancelled`` if it
        did not. Without ``timeout``: None while the job runs. With one, like
        ``Future.result``: blocks until the job ends (``timeout=None``: however long it takes)
        and raises ``JobTimeout``, a ``TimeoutError``, if ``timeout`` seconds pass first."""
        if not isinstance(timeout, _Now):
            return self.wait(timeout)
        return self._ended(*self._state())

    def wait(self, timeout: float | None = None, *, poll: float | None = None,
             on_progress: Callable[[Progress], None] | None = None) -> JobResult:
        """Block until the job ends; ``JobTimeout`` (a ``TimeoutError``) if ``timeout`` seconds
        pass first. Woken by the result backend's messages on each state change, with a read
        every ``poll`` seconds as well (2 s; 0.25 s on the embedded broker, which has none).
        ``on_progress`` is called with the first progress seen and then on each change."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last: Progress | None = None
        with _reachable(self.id), changes_of(self._app, self.id, fallback=poll) as changes:
            while True:
                state, info = self._state()
                done = self._ended(state, info)
                if done is not None:
                    return done
                last = report_change(state, info, last, on_progress)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise JobTimeout(f"job {self.id} did not finish within {timeout:g} s "
                                     "(it is still queued or running)", "timeout")
                changes.wait(FALLBACK_S * 30 if left is None else left)

    def _finished(self) -> JobResult:
        result = self.result()  # raises for a failed, cancelled or unknown job
        if result is None:
            raise JobNotFinished(f"job {self.id} has not finished yet ({self.status().value}); "
                                 "wait() for it first", "job_id")
        return result

    def download(self, dest: str | Path) -> Path:
        """Fetch the finished file to ``dest`` on this machine (a file path, or an existing
        folder: the file keeps its name) and return where it is. Works from any machine with
        the same storage settings (a shared folder, or object storage with the ``storage``
        extra); ``StorageUnavailable`` if the file is gone or the storage is unreachable."""
        from pipeline.infra.storage_backends import download

        return download(self._finished().uri, Path(dest), self._app.settings.storage)

    @contextmanager
    def open(self) -> Iterator[IO[bytes]]:
        """The finished file as a binary stream, wherever it is stored::

            with handle.open() as audio:
                data = audio.read()
        """
        from pipeline.infra.storage_backends import open_uri

        with open_uri(self._finished().uri, self._app.settings.storage) as stream:
            yield stream

    def stream(self, timeout: float | None = None
               ) -> Iterator[AudioChunk | JobResult]:
        """A ``stream=True`` job's audio as it is generated: each ``AudioChunk`` as it arrives
        (from the first, however late this starts, while the job lives), then the job's
        ``JobResult`` once it has finished; the job's error (``JobFailed``, ``JobCancelled``)
        if it fails. ``JobTimeout`` after ``timeout`` seconds; ``InvalidRequest`` (field
        ``stream``) for a job that ended without a stream (not asked for, or expired).

        A worker that dies mid-job leaves its attempt unfinished; the redelivered job streams
        again from chunk 0 under the next ``attempt`` number: a chunk whose attempt is higher
        than the last one's starts the audio over. The chunks are the model's raw audio
        (``sample_rate``, ``channels`` of the model, no loudness normalization: that applies to
        the finished file only)::

            for item in handle.stream():
                if isinstance(item, AudioChunk):
                    play(item.to_numpy(), item.sample_rate)
                else:
                    result = item
        """
        redis = self._app.redis
        if redis is None:
            raise UnsupportedOption("streaming needs Redis; the embedded broker has none",
                                    "stream")
        deadline = None if timeout is None else time.monotonic() + timeout
        follower, key = StreamFollower(), stream_key(self.id)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise JobTimeout(f"job {self.id} did not finish streaming within {timeout:g} s",
                                 "timeout")
            block = BLOCK_S if left is None else max(0.001, min(BLOCK_S, left))
            with _reachable(self.id):
                entries = entries_of(redis.xread({key: follower.last_id}, count=READ_COUNT,
                                                 block=round(block * 1000)))
            chunks, end = follower.take(entries)
            yield from chunks
            if end is not None and end.ok:
                yield self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
                return
            if entries and end is None:
                continue
            # An attempt failed, or nothing came: the job's state says whether it is over.
            done = self._ended(*self._state())  # raises the job's error
            if done is not None:
                with _reachable(self.id):
                    if end is None and not redis.exists(key):
                        raise no_stream(self.id)
                yield done
                return

    def webhook_deliveries(self) -> list[WebhookDelivery]:
        """The job's webhook deliveries (event, status, attempts, last error), in the order
        they were queued: the events its ``webhook_events_filter`` asked for (start, progress,
        partial), then its end. Empty if the request had no ``webhook_url``, nothing was sent
        yet, or the broker is the embedded one."""
        from pipeline.webhooks import DeliveryLog

        with _reachable(self.id):
            log = DeliveryLog(self._app.redis, self._app.settings.broker.result_expires)
            return log.read(self.id)

    def cancel(self) -> bool:
        """Cancel: a queued job never starts; a running one stops at its next progress step
        and its partial files are removed. False if the job had already finished."""
        status = self.status()
        if status.finished:
            return False
        ttl = self._app.settings.broker.result_expires
        with _reachable(self.id):
            self._registry.cancel(self.id, ttl)
            if status is JobStatus.queued:
                self._app.backend.mark_as_revoked(self.id, "cancelled before start")
                if self._quota is not None:  # it will never run: give the slot back now
                    record(self._quota, Outcome.cancelled(self.id))
            if not self._app.embedded:
                # Let workers that hold it in their prefetch drop it too; the flag is the guarantee.
                self._app.control.revoke(self.id)
        return True
