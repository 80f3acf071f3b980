"""Enqueue generation jobs: validate, check the service can take them, queue, hand back a handle.

Order matters: everything that can refuse a job (validation, breaker, backlog, quota) runs
before the job is sent, and a failure after the id is claimed gives the claim back, so a
refused job leaves nothing behind.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from pipeline.celery_app import TASK_GENERATE, PipelineCelery, celery_priority, make_celery
from pipeline.config.schema import Settings
from pipeline.errors import InvalidRequest, ServiceUnavailable
from pipeline.handle import JobHandle
from pipeline.jobs import GenerationRequest, JobSpec, check_job_id, new_job_id, queue_for
from pipeline.policies.configured import Policies
from pipeline.quota.configured import store_for
from pipeline.registry import JobRegistry, registry_for
from pipeline.resolve import resolve

log = logging.getLogger(__name__)

# Bounded retries: a caller learns the broker is down in about a second, not a minute.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}


class Producer:
    """The calling service's side of the queue; one per process is enough."""

    def __init__(self, settings: Settings, app: PipelineCelery | None = None) -> None:
        self.settings = settings
        self.app = app if app is not None else make_celery(settings)
        self.registry: JobRegistry = registry_for(self.app)
        self.policies = Policies.for_app(self.app)
        self.quota = store_for(settings)

    def enqueue(self, request: GenerationRequest) -> JobHandle:
        """Queue one job; the same ``job_id`` twice returns the first job, never a second."""
        job_id = check_job_id(request.job_id) if request.job_id else new_job_id()
        spec = resolve(request, self.settings, job_id=job_id)
        return self._send(spec)

    def enqueue_many(self, requests: Sequence[GenerationRequest]) -> list[JobHandle]:
        """Validate every request first (none is queued if one is bad), then queue them all."""
        specs = []
        for i, request in enumerate(requests):
            job_id = check_job_id(request.job_id) if request.job_id else new_job_id()
            try:
                specs.append(resolve(request, self.settings, job_id=job_id))
            except InvalidRequest as exc:
                raise InvalidRequest(f"requests[{i}]: {exc.message}", f"requests[{i}].{exc.field}",
                                     exc.details) from exc
        return [self._send(spec) for spec in specs]

    def get_job(self, job_id: str) -> JobHandle:
        """A handle for a job enqueued earlier, by this process or another."""
        handle = JobHandle(check_job_id(job_id), self.app, self.registry, self.quota)
        handle.status()  # JobNotFound for an unknown id
        return handle

    def _send(self, spec: JobSpec) -> JobHandle:
        handle = JobHandle(spec.job_id, self.app, self.registry, self.quota)
        ttl = self.settings.broker.result_expires
        try:
            if not self.registry.claim(spec.job_id, ttl):
                log.info("job %s already enqueued; returning the existing job", spec.job_id)
                return handle
        except Exception as exc:  # redis.ConnectionError and friends
            raise ServiceUnavailable(f"the broker is unreachable: {type(exc).__name__}", None,
                                     {"retry_after": 5}) from exc
        reserved = False
        try:
            # Fail fast, before anything is queued: a broken model or a full queue.
            breaker = self.policies.breaker(spec.model)
            if breaker is not None:
                breaker.check()
            self.policies.check_backlog(queue_for(spec.model))
            # Atomic in SQL; a retried or redelivered job is charged once (one ledger row per id).
            self.quota.reserve(job_id=spec.job_id, user_id=spec.user_id, model=spec.model,
                               requested_seconds=spec.duration)
            reserved = True
            self.app.backend.store_result(spec.job_id, {"model": spec.model, "user_id": spec.user_id,
                                                        "enqueued_at": spec.enqueued_at}, "QUEUED")
            self.app.send_task(TASK_GENERATE, args=[spec.model_dump(mode="json")], task_id=spec.job_id,
                               queue=queue_for(spec.model), priority=celery_priority(spec.priority),
                               retry=True, retry_policy=_PUBLISH_RETRY)
        except (OperationalError, RedisError, OSError) as exc:
            self._give_back(spec, reserved)
            raise ServiceUnavailable(f"the broker is unreachable: {exc}", None, {"retry_after": 5}) from exc
        except Exception:
            self._give_back(spec, reserved)
            raise
        return handle

    def _give_back(self, spec: JobSpec, reserved: bool) -> None:
        """Undo a refused enqueue: the quota slot and the id claim."""
        if reserved:
            self.quota.mark_finished(spec.job_id, status="cancelled", error_code="not_queued")
        try:
            self.registry.release(spec.job_id)
        except Exception:  # the broker is likely down too; the claim expires with its TTL
            log.warning("could not release the claim of job %s", spec.job_id)


_lock = threading.Lock()
_producers: dict[int, tuple[Settings, Producer]] = {}


def producer_for(settings: Settings | None) -> Producer:
    """The process's producer for these settings (loaded from the environment if None)."""
    with _lock:
        if settings is None:
            from pipeline.config import load_settings
            key = 0
            if key not in _producers:
                loaded = load_settings()
                _producers[key] = (loaded, Producer(loaded))
            return _producers[key][1]
        key = id(settings)
        if key not in _producers:
            _producers[key] = (settings, Producer(settings))  # keeps settings alive: id stays unique
        return _producers[key][1]


def enqueue(request: GenerationRequest, settings: Settings | None = None) -> JobHandle:
    """Queue one generation job and return its handle."""
    return producer_for(settings).enqueue(request)


def enqueue_many(requests: Sequence[GenerationRequest], settings: Settings | None = None) -> list[JobHandle]:
    """Queue several jobs (all validated before any is queued)."""
    return producer_for(settings).enqueue_many(requests)


def get_job(job_id: str, settings: Settings | None = None) -> JobHandle:
    """The handle of an existing job; ``JobNotFound`` if there is none."""
    return producer_for(settings).get_job(job_id)

