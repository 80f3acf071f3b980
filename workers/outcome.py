"""The worker's outcome settler: every final end of a job runs the same steps, in one order.

``workers/tasks.py`` decides *that* a job ended and how (``GenerationTask.on_success`` and
``on_failure``, and the two cancels in the task body); :class:`Settler` does the rest, once per
job. For each :class:`~pipeline.contract.outcome.Outcome` the steps are, in this order:

1. **files**: a job that ran and ended without a result loses every file it made (temp folder,
   output, sidecar, partials), first, so that no later step announces an end while a
   half-written file of the job still lies in the storage.
2. **state**: a cancel writes REVOKED to the result backend (Celery itself writes SUCCESS and
   FAILURE, before it calls the task's hooks), after the files are gone: a caller that sees the
   job cancelled never finds its files.
3. **ledger**: the row gets its final status (failed, timeout and cancelled refund the quota
   slot), before the webhook, so that a receiver that reads the job's usage or record when it
   is told sees the end there; a database hiccup is logged, never raised, since the job has
   its outcome already (``record`` of ``pipeline.quota.outcomes``: the typed call).
4. **metrics**: ``musicgen_jobs`` by final status (a cancel is counted nowhere: it says nothing
   of the service), and a success's timings.
5. **webhook**: the uploaded melody is deleted and the job-end webhook queued
   (``workers/webhook_task.py``), last of what the caller can see, since it announces all of it.
6. **breaker**: a job killed by its hard time limit is a verdict on its model. Every other
   exit of a job that ran has settled its breaker pass already, in ``run_generate``'s
   ``finally`` (:func:`settle_breaker`): only that frame holds the admission, and it also
   settles the exits that are no outcome (a deferral, a dropped duplicate). A hard kill skips
   that ``finally``, so its verdict comes here, after the records (a Redis blip must not keep
   them from being written).

Only the state write may raise, as Celery's own state writes do; every other step logs what
it meets and goes on, since the job's own outcome stands whatever its bookkeeping meets.
A job revoked while still queued never reaches a task: its ledger row is settled by the
cancelling ``JobHandle`` (producer side), its webhook by ``workers/webhook_task.py``'s revoke
hook.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

from pipeline.client.handle import error_of
from pipeline.contract.outcome import FinalStatus, Outcome
from pipeline.contract.streams import StreamEnd
from pipeline.errors import GpuOutOfMemory, JobNotFound, JobTimeout, ModelRuntimeError, PoisonJob
from pipeline.infra.celery_app import PipelineCelery
from pipeline.policies.breaker import Admission, CircuitBreaker
from pipeline.policies.configured import Policies
from pipeline.quota import QuotaStore
from pipeline.quota.outcomes import record
from workers.generation.streaming import end_unfinished_stream
from workers.job_runner import discard_job_files
from workers.metrics import model_of, observe_failure, observe_success
from workers.webhook_task import job_ended

log = logging.getLogger(__name__)

__all__ = ["BREAKER_FAILURES", "Settler", "Verdict", "ledger_call", "settle_breaker",
           "verdict_of"]

# Failures that say the model or the GPU is unwell: they count towards opening the breaker.
# Bad input, unsupported options and cancellations say nothing about the model.
BREAKER_FAILURES = (GpuOutOfMemory, ModelRuntimeError, JobTimeout)
# Also a verdict on the model: a job that kills its worker, and a soft limit caught anywhere.
_FAILURE_VERDICTS = (*BREAKER_FAILURES, PoisonJob, SoftTimeLimitExceeded)
Verdict = Literal["success", "failure", "release"]


def verdict_of(exc: BaseException | None) -> Verdict:
    """What a job's end says about its model: nothing (release) unless the model or GPU failed."""
    if exc is None:
        return "success"
    return "failure" if isinstance(exc, _FAILURE_VERDICTS) else "release"


def settle_breaker(breaker: CircuitBreaker | None, admission: Admission | None,
                   verdict: Verdict) -> None:
    """Settle a job's breaker pass exactly once: record the verdict, or give the probe back.

    Called from ``finally``, so it never raises: a Redis blip here must not replace the job's
    own outcome (a claim that cannot be released still expires after ``probe_timeout``).
    """
    if breaker is None or admission is None:
        return
    try:
        if verdict == "success":
            breaker.record_success()
        elif verdict == "failure":
            breaker.record_failure()
        else:
            breaker.release_probe(admission)
    except Exception:
        log.exception("could not settle the circuit breaker of %s (%s)", breaker.name, verdict)


def ledger_call(quota: Callable[[], QuotaStore], job_id: str, what: str,
                call: Callable[[QuotaStore], bool]) -> bool | None:
    """``call`` on the process's quota store; None, logged, when it fails: a database hiccup
    must not fail a job that has produced its file. ``what`` names the write in the log."""
    try:
        return call(quota())
    except JobNotFound:
        log.warning("job %s has no ledger row (enqueued with quotas off?)", job_id)
    except Exception:
        log.exception("could not record %s for job %s in the ledger", what, job_id)
    return None


class Settler:
    """Settles the final outcomes of one worker process's jobs (the steps: module docstring).

    ``quota`` and ``policies`` give the process's store and policies, built after the fork.
    """

    def __init__(self, app: PipelineCelery, quota: Callable[[], QuotaStore],
                 policies: Callable[[], Policies]) -> None:
        self.app, self._quota, self._policies = app, quota, policies

    def succeeded(self, payload: Any, job_id: str, result: Mapping[str, Any]) -> None:
        """The job made its file; ``result`` is its ``JobResult`` as JSON."""
        self._settle(payload, Outcome.succeeded(job_id, result), ran=True)

    def failed(self, payload: Any, job_id: str, exc: BaseException) -> None:
        """The job's final failure (its last retry, poison, a hard time limit: then in the
        pool's parent, the child being dead)."""
        code, message = error_of(exc)
        self._settle(payload, Outcome.failed(job_id, code, message), ran=True,
                     hard_killed=isinstance(exc, TimeLimitExceeded))
        if isinstance(payload, Mapping) and payload.get("stream") and self.app.redis is not None:
            try:  # a reader of a stream whose worker died must see it end
                end_unfinished_stream(self.app.redis, job_id, StreamEnd(1, False, code, message),
                                      self.app.settings.broker.result_expires)
            except Exception:  # best effort, as every stream write
                log.warning("could not end the stream of job %s", job_id, exc_info=True)

    def cancelled(self, task: Task, payload: Any, job_id: str, *, ran: bool) -> None:
        """The caller cancelled the job: before it started (``ran`` False), or while running."""
        reason = "cancelled while running" if ran else "cancelled before start"

        def revoke() -> None:
            task.backend.mark_as_revoked(job_id, reason, request=task.request)

        self._settle(payload, Outcome.cancelled(job_id), ran=ran, revoke=revoke)

    def _settle(self, payload: Any, outcome: Outcome, *, ran: bool,
                revoke: Callable[[], None] | None = None, hard_killed: bool = False) -> None:
        status, job_id = outcome.status, outcome.job_id
        if ran and status is not FinalStatus.SUCCEEDED:
            discard_job_files(self.app.settings, job_id)
        if revoke is not None:
            revoke()
        ledger_call(self._quota, job_id, f"the end ({status.value})",
                    lambda quota: record(quota, outcome))
        model = model_of([payload])
        if status is FinalStatus.SUCCEEDED and outcome.result is not None:
            observe_success(str(outcome.result.get("model")), outcome.result)
        elif status is not FinalStatus.CANCELLED:
            observe_failure(model, outcome.error_code or "internal_error")
        job_ended(self.app, payload, status, result=outcome.result,
                  error_code=outcome.error_code, error_message=outcome.error_message)
        if hard_killed and isinstance(payload, Mapping):
            breaker = self._policies().breaker(model)
            settle_breaker(breaker, Admission(), "failure")  # never raises: Redis may be away
