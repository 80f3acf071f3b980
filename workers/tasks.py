"""The Celery task: decode the message, call the job runner, encode the result. Nothing else.

Retries are Celery's own (``autoretry_for`` with exponential backoff and full jitter) and only
for ``TransientError``: a permanent error (bad input, unsupported option, model not found) fails
at once and never burns a GPU retry.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task
from celery.exceptions import Ignore, SoftTimeLimitExceeded

from pipeline.celery_app import TASK_GENERATE, PipelineCelery
from pipeline.errors import JobTimeout, TransientError
from pipeline.jobs import JobSpec, invalid_request_from
from pipeline.registry import JobRegistry, registry_for
from workers.job_runner import JobCancelledByUser, JobRunner

log = logging.getLogger(__name__)

PROGRESS_INTERVAL_S = 0.25  # throttles result-backend writes and cancel-flag reads


class WorkerState:
    """What the task needs from its process: set up once per process by workers.signals."""

    runner: JobRunner | None = None
    registry: JobRegistry | None = None


STATE = WorkerState()


def runner_for(app: PipelineCelery) -> JobRunner:
    if STATE.runner is None:  # a pool without our signals (or a test) starts lazily
        STATE.runner = JobRunner(app.settings)
    return STATE.runner


def registry(app: PipelineCelery) -> JobRegistry:
    if STATE.registry is None:
        STATE.registry = registry_for(app)
    return STATE.registry


def _progress_reporter(task: Task, reg: JobRegistry) -> Any:
    last = [0.0]

    def report(fraction: float, message: str) -> None:
        now = time.monotonic()
        if now - last[0] < PROGRESS_INTERVAL_S and fraction < 1.0:
            return
        last[0] = now
        if reg.is_cancelled(task.request.id):
            raise JobCancelledByUser(task.request.id)
        task.update_state(state="PROGRESS", meta={"progress": round(fraction, 4), "message": message})

    return report


def run_generate(task: Task, payload: dict[str, Any]) -> dict[str, Any]:
    app: PipelineCelery = task.app
    started_at = time.time()
    try:
        spec = JobSpec.model_validate(payload)
    except Exception as exc:  # a message no producer of ours would send
        from pydantic import ValidationError
        if isinstance(exc, ValidationError):
            raise invalid_request_from(exc, "spec.") from exc
        raise
    reg = registry(app)
    runner = runner_for(app)
    if reg.is_cancelled(spec.job_id):
        task.backend.mark_as_revoked(spec.job_id, "cancelled before start", request=task.request)
        raise Ignore()
    try:
        outcome = runner.run(spec, worker=task.request.hostname or "worker",
                             progress=_progress_reporter(task, reg), started_at=started_at)
    except JobCancelledByUser:
        runner.remove_outputs(spec.job_id)
        task.backend.mark_as_revoked(spec.job_id, "cancelled while running", request=task.request)
        raise Ignore() from None
    except SoftTimeLimitExceeded as exc:
        runner.remove_outputs(spec.job_id)
        raise JobTimeout(f"job passed its soft time limit of {app.settings.worker.soft_time_limit} s",
                         "duration") from exc
    return outcome.result.model_dump(mode="json")


def register_tasks(app: PipelineCelery) -> None:
    """Add the generation task to a worker's app, with its policies from settings."""
    w = app.settings.worker

    @app.task(name=TASK_GENERATE, bind=True, acks_late=True, reject_on_worker_lost=True,
              autoretry_for=(TransientError,), max_retries=w.max_retries,
              retry_backoff=w.retry_backoff, retry_backoff_max=int(w.retry_backoff_max),
              retry_jitter=w.retry_jitter)
    def generate(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
        return run_generate(self, payload)
