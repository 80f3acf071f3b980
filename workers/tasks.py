"""The Celery task: decode the message, apply the worker policies, run the job, encode.

Retries are Celery's own (``autoretry_for`` with exponential backoff and full jitter) and only
for ``TransientError``: a permanent error (bad input, unsupported option, model not found) fails
at once and never burns a GPU retry. Policies come from ``pipeline.policies``; this module only
decides when each applies.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Task, states
from celery.exceptions import Ignore, SoftTimeLimitExceeded
from pydantic import ValidationError

from pipeline.client.registry import JobRegistry, registry_for
from pipeline.config.presets import model_settings_for
from pipeline.contract.continuation import generated_s
from pipeline.contract.jobs import JobSpec, invalid_request_from, queue_for
from pipeline.contract.time_limits import job_time_limits
from pipeline.errors import (
    JobTimeout,
    PoisonJob,
    TransientError,
)
from pipeline.infra.celery_app import TASK_GENERATE, PipelineCelery
from pipeline.policies.breaker import Admission, CircuitBreaker
from pipeline.policies.configured import Policies
from pipeline.quota import QuotaStore
from pipeline.quota.configured import store_for
from workers import typed_celery
from workers.job_runner import JobCancelledByUser, JobRunner, job_outputs
from workers.metrics import observe_batch, observe_engine
from workers.outage import PUBLISH_THROUGH_FAILOVER, restore_lost_result, through_outage
from workers.outcome import Settler, ledger_call, settle_breaker, verdict_of
from workers.webhook_task import JobEvents

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25  # throttles result-backend writes and cancel-flag reads


class WorkerState:
    """What the task needs from its process, built once per process (after the fork)."""

    runner: JobRunner | None = None
    registry: JobRegistry | None = None
    policies: Policies | None = None
    quota: QuotaStore | None = None


STATE = WorkerState()
# The threads pool's task threads may all ask for the runner at once on a fresh process: two
# runners would be two generation loops, each making smaller batches.
_STATE_LOCK = threading.Lock()


def runner_for(app: PipelineCelery) -> JobRunner:
    with _STATE_LOCK:
        if STATE.runner is None:
            STATE.runner = JobRunner(app.settings, on_batch=observe_batch,
                                     on_engine=observe_engine)
        return STATE.runner


def _registry(app: PipelineCelery) -> JobRegistry:
    with _STATE_LOCK:
        if STATE.registry is None:
            STATE.registry = registry_for(app)
        return STATE.registry


def _policies(app: PipelineCelery) -> Policies:
    with _STATE_LOCK:
        if STATE.policies is None:
            STATE.policies = Policies.for_app(app)
        return STATE.policies


def _quota(app: PipelineCelery) -> QuotaStore:
    with _STATE_LOCK:
        if STATE.quota is None:  # its own engine per process: connections must not cross a fork
            STATE.quota = store_for(app.settings)
        return STATE.quota


def _settler(app: PipelineCelery) -> Settler:
    """The settler of this process's job outcomes (``workers/outcome.py``)."""
    return Settler(app, lambda: _quota(app), lambda: _policies(app))


class _JobProgress:
    """Writes a job's PROGRESS state: fraction, message and its latest partial result (each
    write replaces the whole state, so the partial rides along with every later one)."""

    def __init__(self, task: Task, reg: JobRegistry, events: JobEvents | None = None) -> None:
        self._task, self._reg, self._events = task, reg, events
        self._last = 0.0
        self._partial: dict[str, Any] | None = None

    def partial(self, info: dict[str, Any]) -> None:
        """A newer partial file (``workers.partials``): written with the next report, at once,
        and announced to the job's webhook if it asked for partials."""
        self._partial = info
        self._last = 0.0
        if self._events is not None:
            self._events.partial(info)

    def __call__(self, fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_INTERVAL_S and fraction < 1.0:
            return
        self._last = now
        meta: dict[str, Any] = {"progress": round(fraction, 4), "message": message}
        if self._partial is not None:
            meta["partial"] = self._partial
        try:
            cancelled = self._reg.is_cancelled(self._task.request.id)
            self._task.update_state(state="PROGRESS", meta=meta)
        except Exception:  # progress is best-effort: a Redis blip must not fail the job
            log.warning("could not report progress of %s", self._task.request.id, exc_info=True)
            return
        if cancelled:
            raise JobCancelledByUser(self._task.request.id)
        if self._events is not None:  # throttled on its own (webhooks.progress_interval_s)
            self._events.progress(fraction, message)


def _progress_reporter(task: Task, reg: JobRegistry,
                       events: JobEvents | None = None) -> _JobProgress:
    return _JobProgress(task, reg, events)


def _decode(payload: dict[str, Any]) -> JobSpec:
    try:
        return JobSpec.model_validate(payload)
    except ValidationError as exc:  # a message no producer of ours would send
        raise invalid_request_from(exc, "spec.") from exc


def _defer(task: Task, wait: float, reason: str) -> None:
    """Put the job back with a delay, as the same job: not a retry (it did not fail) and not a
    delivery (it did not start), so neither the retry budget nor the poison count moves."""
    log.info("job %s waits %.1f s: %s", task.request.id, wait, reason)
    task.backend.store_result(task.request.id, {"reason": reason}, "QUEUED")
    task.signature_from_request(task.request, countdown=wait, retries=task.request.retries,
                                retry=True, retry_policy=PUBLISH_THROUGH_FAILOVER).apply_async()
    raise Ignore()


def _already_ended(task: Task, job_id: str) -> bool:
    """Whether the job's state in the result backend is final (success, failure, revoked)."""
    try:
        return task.backend.get_state(job_id) in states.READY_STATES
    except Exception:  # the backend is down: let the ledger decide, as before this check
        log.warning("could not read the state of job %s", job_id, exc_info=True)
        return False


def _admit(task: Task, spec: JobSpec,
           policies: Policies) -> tuple[CircuitBreaker | None, Admission | None]:
    """Rate limit, then the breaker; defers the job (raises ``Ignore``) when either says wait.

    The rate limit comes first so that no exit after a won probe claim is a deferral: the
    caller settles whatever breaker pass it gets back (see :func:`settle_breaker`).
    """
    app: PipelineCelery = task.app
    if policies.rate_limit is not None:
        limit, queue = policies.rate_limit, queue_for(spec.model)
        wait = through_outage("the rate limit", lambda: limit.try_acquire(queue))
        if wait > 0:  # over the global limit: the job waits, it is not failed
            _defer(task, wait, f"global rate limit {policies.rate_limit.rate}")
    breaker = policies.breaker(spec.model)
    if breaker is None:
        return None, None
    admission = through_outage(f"the circuit breaker of {spec.model}", breaker.admit)
    if admission is None:
        # Open, or another worker runs the half-open probe: this model takes no job for now.
        status = through_outage(f"the circuit breaker of {spec.model}", breaker.status)
        wait = (float(status.get("retry_after") or 0)
                or app.settings.circuit_breaker.reset_timeout / 4)
        _defer(task, max(1.0, wait), f"circuit breaker of {spec.model} is not closed")
    return breaker, admission


def _check_poison(task: Task, spec: JobSpec, reg: JobRegistry) -> int:
    # Every start counts; retries are starts we asked for. What is left are redeliveries:
    # a worker died (or was killed) holding this job. Its files go in on_failure.
    app: PipelineCelery = task.app
    cap = app.settings.worker.redelivery_cap
    starts = through_outage("the delivery count", lambda: reg.count_delivery(
        spec.job_id, app.settings.broker.result_expires))
    redeliveries = starts - 1 - task.request.retries
    if redeliveries >= cap:
        raise PoisonJob(f"job was delivered {starts} times without finishing (it kills its "
                        f"worker); giving up after worker.redelivery_cap={cap}", None,
                        {"deliveries": starts})
    return starts


def run_generate(task: Task, payload: dict[str, Any]) -> dict[str, Any]:
    app: PipelineCelery = task.app
    started_at = time.time()
    spec = _decode(payload)
    reg, policies = _registry(app), _policies(app)
    # Every Redis touch before the job runs rides out a failover, then is a transient error
    # (workers/outage.py); the ones after it are best effort.
    if through_outage("the cancel flag", lambda: reg.is_cancelled(spec.job_id)):
        _settler(app).cancelled(task, payload, spec.job_id, ran=False)
        raise Ignore()
    if _already_ended(task, spec.job_id):
        # A late redelivery of a job that has its final state (a worker thought dead finished it,
        # or fast recovery re-published it): drop it before it takes a rate-limit slot or a
        # breaker probe that a waiting job needs. The ledger check in _run stays as the guard
        # for a result backend that has expired the state.
        log.warning("job %s already ended; dropping this delivery", spec.job_id)
        raise Ignore()
    breaker, admission = _admit(task, spec, policies)
    # From here every exit (result, model failure, bad input, cancel, soft limit, poison,
    # Ignore, a bug) passes the one finally below; only a hard kill skips it (on_failure then).
    error: BaseException | None = None
    try:
        starts = _check_poison(task, spec, reg)
        return _run(task, spec, reg, started_at, attempt=starts)
    except BaseException as exc:
        error = exc
        raise
    finally:
        settle_breaker(breaker, admission, verdict_of(error))


def _run(task: Task, spec: JobSpec, reg: JobRegistry, started_at: float, *,
         attempt: int = 1) -> dict[str, Any]:
    app: PipelineCelery = task.app
    runner = runner_for(app)
    if ledger_call(lambda: _quota(app), spec.job_id, "the start", lambda quota: quota.mark_started(
            spec.job_id, worker=task.request.hostname or "worker",
            queue_wait_seconds=max(0.0, started_at - spec.enqueued_at))) is False:
        # The job already ended (a late redelivery of a finished job): do not make it twice.
        log.warning("job %s already finished; dropping this delivery", spec.job_id)
        restore_lost_result(task.backend, job_outputs(app.settings, spec.job_id), spec.job_id)
        raise Ignore()
    # The job's webhook events before its end (webhook_events_filter), sent from this thread.
    events = JobEvents(app, spec.model_dump(mode="json"), attempt=task.request.retries + 1)
    events.started()
    try:
        progress = _progress_reporter(task, reg, events)
        outcome = runner.run(spec, worker=task.request.hostname or "worker",
                             progress=progress, started_at=started_at, on_partial=progress.partial,
                             # A stream goes to the registry's Redis (none on the embedded
                             # broker's file registry); each start is a new attempt.
                             stream_client=getattr(reg, "client", None), attempt=attempt)
    except JobCancelledByUser:
        _settler(app).cancelled(task, spec.model_dump(mode="json"), spec.job_id, ran=True)
        raise Ignore() from None
    except SoftTimeLimitExceeded as exc:
        runner.remove_outputs(spec.job_id)
        limit = job_time_limits(app.settings.worker, generated_s(
            spec, model_settings_for(app.settings, spec.model).max_duration)).soft
        raise JobTimeout(f"job passed its soft time limit of {limit:g} s", "duration") from exc
    return outcome.result.model_dump(mode="json")


class GenerationTask(Task):  # type: ignore[misc]
    """Hands every final outcome to the settler (``workers/outcome.py``). Celery calls these
    hooks once per job, after the last retry, and calls on_failure even for a hard time-limit
    kill (from the parent)."""

    def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
        _settler(self.app).succeeded(args[0] if args else None, task_id, retval)

    def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                   einfo: Any) -> None:
        # Any final failure (poison, a hard time limit that killed the child, a last retry)
        # leaves none of the job's files; this runs in the parent after a hard kill.
        _settler(self.app).failed(args[0] if args else None, task_id, exc)


def register_tasks(app: PipelineCelery) -> None:
    """Add the generation task to a worker's app, with its retry policy from settings."""
    w = app.settings.worker

    @typed_celery.task(app, name=TASK_GENERATE, bind=True, base=GenerationTask, acks_late=True,
                       reject_on_worker_lost=True, autoretry_for=(TransientError,),
                       max_retries=w.max_retries, retry_backoff=w.retry_backoff,
                       # The retry is a publish, to a broker that may be failing over.
                       retry_kwargs={"retry": True, "retry_policy": PUBLISH_THROUGH_FAILOVER},
                       retry_backoff_max=int(w.retry_backoff_max), retry_jitter=w.retry_jitter)
    def generate(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        return run_generate(self, payload)
