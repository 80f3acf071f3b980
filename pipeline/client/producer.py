"""Enqueue generation jobs: validate, check the service can take them, queue, hand back a handle.

Order matters: the id claim comes first and records the job's user, so a client ``job_id``
never hands one user's job to another (``JobIdConflict``); everything that can refuse a job
(breaker, backlog, quota) runs before the job is sent; and a failure after the claim gives
everything back (quota slot, stored QUEUED state, claim), so a refused job leaves nothing that
reads as a job. Every failure reaches the caller as a ``PipelineError``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from kombu.exceptions import OperationalError
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError

from pipeline.client.handle import JobHandle
from pipeline.client.inputs import by_reference, inputs_of
from pipeline.client.inputs import discard as discard_input
from pipeline.client.records import JobPage, job_record, request_echo
from pipeline.client.records import list_jobs as _list_jobs
from pipeline.client.registry import JobRegistry, registry_for
from pipeline.client.resolve import resolve
from pipeline.config.live import FileWatcher, LiveSettings, ReloadResult
from pipeline.config.presets import model_settings_for
from pipeline.config.schema import Settings
from pipeline.contract.continuation import generated_s, wire_form
from pipeline.contract.jobs import (
    GenerationRequest,
    JobSpec,
    JobStatus,
    check_job_id,
    new_job_id,
    queue_for,
    request_fingerprint,
)
from pipeline.contract.time_limits import job_time_limits
from pipeline.contract.user_context import UserContext
from pipeline.errors import (
    InvalidRequest,
    JobIdConflict,
    JobNotFound,
    PipelineError,
    ServiceUnavailable,
    UnsupportedOption,
)
from pipeline.infra.brokers import BrokerKind, wait_for_replicas
from pipeline.infra.celery_app import TASK_GENERATE, PipelineCelery, celery_priority, make_celery
from pipeline.ops.experiments import control_fallback
from pipeline.policies.configured import Policies
from pipeline.quota import Charge, QuotaStore, UsageSummary
from pipeline.quota.configured import database_failure, store_for

log = logging.getLogger(__name__)

# Bounded retries: a caller learns the broker is down in about a second, not a minute.
_PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0.1, "interval_step": 0.2, "interval_max": 0.5}


def _unavailable(what: str, exc: BaseException) -> ServiceUnavailable:
    return ServiceUnavailable(f"{what}: {type(exc).__name__}", None, {"retry_after": 5})


def _as_request(value: Any, field: str) -> GenerationRequest:
    if not isinstance(value, GenerationRequest):
        raise InvalidRequest(f"{field} must be a pipeline.GenerationRequest, not "
                             f"{type(value).__name__}", field)
    return value


class Producer:
    """The calling service's side of the queue; one per process is enough.

    Construction has no side effect on the quota database: it must exist already
    (``musicgen-pipeline db upgrade``), or this raises ``ServiceUnavailable`` saying so.
    """

    def __init__(self, settings: Settings, app: PipelineCelery | None = None) -> None:
        self.settings = settings
        self.app = app if app is not None else make_celery(settings)
        self.registry: JobRegistry = registry_for(self.app)
        self.policies = Policies.for_app(self.app)
        self.quota = store_for(settings)

    def enqueue(self, request: GenerationRequest) -> JobHandle:
        """Queue one job. The same ``job_id`` again from the same user with the same request
        returns the first job (``handle.replayed`` is True), never a second; with another
        request, or from another user, it raises ``JobIdConflict`` and changes nothing."""
        request = _as_request(request, "request")
        spec, fingerprint, clamped = self._resolve(request)
        return self._send_all([(spec, fingerprint)], {spec.job_id} if clamped else set())[0]

    def enqueue_many(self, requests: Sequence[GenerationRequest]) -> list[JobHandle]:
        """Queue several jobs, all or nothing: every request is validated, admitted and
        charged before any is sent, so a refusal (quota, backlog, breaker, a bad request, an
        id conflict) leaves none of them queued or charged."""
        if isinstance(requests, (str, bytes, GenerationRequest)) or not isinstance(requests,
                                                                                     Sequence):
            raise InvalidRequest("requests must be a list of pipeline.GenerationRequest, not "
                                 f"{type(requests).__name__}", "requests")
        items, clamped = [], set()
        for i, item in enumerate(requests):
            request = _as_request(item, f"requests[{i}]")
            try:
                spec, fingerprint, lowered = self._resolve(request)
            except (InvalidRequest, UnsupportedOption) as exc:
                raise type(exc)(f"requests[{i}]: {exc.message}", f"requests[{i}].{exc.field}",
                                exc.details) from exc
            items.append((spec, fingerprint))
            if lowered:
                clamped.add(spec.job_id)
        return self._send_all(items, clamped)

    def apply_settings(self, settings: Settings) -> None:
        """A live settings change (``LiveSettings`` listener): requests from now on are checked
        and admitted under ``settings``. The broker connection is not live (a restart key)."""
        policies = Policies.for_app(self.app, settings)
        quota = store_for(settings) if settings.quotas != self.settings.quotas else self.quota
        self.app.settings = settings
        self.settings, self.policies, self.quota = settings, policies, quota

    def user_context(self, request: GenerationRequest) -> UserContext:
        """The request's user and tier, read once: flags and experiments decide on it."""
        try:
            tier = self.quota.tier_of(request.user_id)
        except SQLAlchemyError as exc:
            raise database_failure(exc, self.quota) from exc
        return UserContext(request.user_id, tier)

    def get_job(self, job_id: str, user_id: str | None = None) -> JobHandle:
        """A handle for a job enqueued earlier, by this process or another; found from the
        ledger once the result backend has forgotten it (``broker.result_expires``).

        A calling service acting for a user passes ``user_id``: another user's job is then
        ``JobNotFound``, exactly like an unknown id, so an id reveals nothing. Without it any
        job is found: that is the operator's view (CLI, admin tools), not a user's.
        """
        if not isinstance(job_id, str):
            raise InvalidRequest(f"job_id must be a string, not {type(job_id).__name__}",
                                 "job_id")
        check_job_id(job_id)
        if user_id is not None:
            try:
                owner = self.registry.owner(job_id)
            except Exception as exc:  # redis.ConnectionError and friends
                raise _unavailable("the broker is unreachable", exc) from exc
            if owner is None:  # the claim expired: the ledger still knows whose job it is
                with _typed_failures(self.quota, "get_job"):
                    record = job_record(self.quota, job_id)
                owner = None if record is None else record.user_id
            if owner != user_id:
                raise JobNotFound(f"no job with id {job_id!r}", "job_id")
        handle = JobHandle(job_id, self.app, self.registry, self.quota)
        handle.status()  # JobNotFound for an unknown id
        return handle

    def list_jobs(self, user_id: str, *, status: JobStatus | str | None = None,
                  since: datetime | None = None, limit: int = 20,
                  cursor: str | None = None) -> JobPage:
        """A user's jobs, newest first, from the ledger (see ``pipeline.list_jobs``)."""
        with _typed_failures(self.quota, "list_jobs"):
            return _list_jobs(self.quota, user_id, status=status, since=since, limit=limit,
                             cursor=cursor)

    def usage(self, user_id: str) -> UsageSummary:
        """``user_id``'s tier and what it used of each quota window (jobs, audio seconds) and
        when each resets, and the month's GPU seconds."""
        with _typed_failures(self.quota, "usage"):
            return self.quota.usage(user_id)

    # --- sending ----------------------------------------------------------------------------

    def _resolve(self, request: GenerationRequest) -> tuple[JobSpec, str, bool]:
        """The spec to send, the request's fingerprint, and whether its priority was lowered
        to its tier's ``max_priority``."""
        job_id = check_job_id(request.job_id) if request.job_id else new_job_id()
        user = self.user_context(request)
        spec = resolve(request, self.settings, job_id=job_id, user=user)
        quotas = self.settings.quotas
        tier = quotas.tiers.get(user.tier)
        cap = tier.priority_cap(user.tier) if quotas.enabled and tier is not None else 9
        if request.priority <= cap:
            return spec, request_fingerprint(request), False
        if quotas.priority_over_max == "refuse":
            raise UnsupportedOption(f"priority {request.priority} is above the {user.tier!r} "
                                    f"tier's maximum of {cap}", "priority",
                                    {"max_priority": cap, "tier": user.tier})
        # model_copy skips validation: a lower priority is within the same bounds.
        spec = spec.model_copy(update={"priority": min(spec.priority, cap)})
        return spec, request_fingerprint(request), True

    def _send_all(self, items: list[tuple[JobSpec, str]],
                  clamped: set[str] | frozenset[str] = frozenset()) -> list[JobHandle]:
        """Claim every id, admit and charge every new job, then send them: a refusal before
        the sends gives everything back; a broker failure during them cancels what was sent."""
        handles: dict[str, JobHandle] = {}
        claimed: list[tuple[JobSpec, str]] = []
        try:
            for spec, fingerprint in items:
                if self._claim(spec, fingerprint):
                    claimed.append((spec, fingerprint))
                else:
                    handles[spec.job_id] = self._handle(spec.job_id, replayed=True)
        except BaseException:
            self._give_back_all([spec for spec, _ in claimed], reserved=False)
            raise
        with self._giving_back(claimed, reserved=False):
            admitted = [(self._admit(spec, claimed[:i]), fp) for i, (spec, fp) in enumerate(claimed)]
        with self._giving_back(admitted, reserved=False):  # all or nothing: nothing charged
            reservations = self.quota.reserve_many([
                Charge(spec.job_id, spec.user_id, spec.model, spec.duration, spec.experiment,
                       spec.variant, fp, request_echo(spec)) for spec, fp in admitted])
        fresh = [spec for (spec, _), r in zip(admitted, reservations, strict=True) if r.new]
        # A claim that had expired while the ledger kept the job: the same job, or a conflict.
        known = [(spec, fp, r.request_hash) for (spec, fp), r in zip(admitted, reservations,
                                                                     strict=True) if not r.new]
        conflict = next((spec for spec, fp, stored in known if stored not in (None, fp)), None)
        if conflict is not None:
            self._give_back_all(fresh, reserved=True)
            self._give_back_all([spec for spec, _, _ in known], reserved=False)
            raise _different_request(conflict.job_id)
        for spec, _, _ in known:
            self._forget_claim(spec.job_id)  # the ledger answers for this job now
            handles[spec.job_id] = self._handle(spec.job_id, replayed=True)
        sent: list[JobSpec] = []
        for i, spec in enumerate(fresh):
            try:
                with self._giving_back([(s, "") for s in fresh[i:]], reserved=True):
                    self._publish(spec)
            except BaseException:
                self._cancel_sent(sent)
                raise
            sent.append(spec)
            handles[spec.job_id] = self._handle(spec.job_id, replayed=False)
        for spec, _ in items:
            handles[spec.job_id].priority_clamped = spec.job_id in clamped
        # One WAIT covers every publish above, and the replays' too (a caller retrying a refusal).
        self._confirm_replicated([spec.job_id for spec, _ in items])
        return [handles[spec.job_id] for spec, _ in items]

    def _confirm_replicated(self, job_ids: list[str]) -> None:
        """With ``broker.wait_replicas``: refuse (retryable) unless that many replicas have the
        jobs, so "accepted" means on more than one node. The jobs stay queued either way (a
        publish cannot be taken back): the refusal names them, and enqueueing the same requests
        with those ids again returns the same jobs once a replica confirms."""
        b = self.settings.broker
        if not b.wait_replicas or self.app.broker_kind not in (BrokerKind.redis,
                                                               BrokerKind.sentinel):
            return
        try:
            acked = wait_for_replicas(self.app.redis, b.wait_replicas, b.wait_timeout_ms)
        except (RedisError, OSError) as exc:
            log.warning("jobs %s: could not ask Redis for its replicas: %s", job_ids, exc)
            acked = 0
        if acked < b.wait_replicas:
            raise ServiceUnavailable(
                f"job(s) {', '.join(job_ids)} queued on the Redis master, but {acked} of "
                f"{b.wait_replicas} replica(s) confirmed them within {b.wait_timeout_ms} ms, so "
                "a failover now could lose them; enqueue again with the same job_id (never a "
                "second job)", None, {"retry_after": 1, "job_ids": job_ids, "replicas": acked})

    def _handle(self, job_id: str, *, replayed: bool) -> JobHandle:
        return JobHandle(job_id, self.app, self.registry, self.quota, replayed=replayed)

    def _claim(self, spec: JobSpec, fingerprint: str) -> bool:
        """Claim the id; False for a replay of the same request by the same user."""
        ttl = self.settings.broker.result_expires
        try:
            claim = self.registry.claim(spec.job_id, ttl, spec.user_id, fingerprint)
        except Exception as exc:  # redis.ConnectionError and friends
            raise _unavailable("the broker is unreachable", exc) from exc
        if claim.new:
            return True
        if claim.owner != spec.user_id:
            # Checked before anything else: the other user's job, quota and state stay as
            # they are, and the message does not say whose the id is.
            raise JobIdConflict(f"job_id {spec.job_id!r} is already taken by another user; "
                                "choose another id", "job_id")
        if claim.fingerprint and claim.fingerprint != fingerprint:
            raise _different_request(spec.job_id)
        log.info("job %s already enqueued; returning the existing job", spec.job_id)
        return False

    def _admit(self, spec: JobSpec, ahead: Sequence[tuple[JobSpec, str]]) -> JobSpec:
        """Fail fast, before anything is queued: a broken model or a full queue (counting the
        jobs of the same list ``ahead`` of this one). Returns the spec to send: an experiment
        variant whose breaker is open falls back to its control."""
        breaker = self.policies.breaker(spec.model)
        try:
            if breaker is not None:
                breaker.check()
        except ServiceUnavailable as refused:
            # An experiment's failing variant is no reason to fail a request its control
            # can serve; a breaker that cannot be read (no "state") is an outage, not this.
            details = refused.details if isinstance(refused.details, dict) else {}
            fallback = (control_fallback(spec, self.settings)
                        if details.get("state") == "open" else None)
            if fallback is None:
                raise
            log.warning("job %s: experiment %s variant %s has its circuit breaker open; "
                        "falling back to the control %s", spec.job_id, spec.experiment,
                        spec.variant, fallback.variant)
            spec = fallback
            control = self.policies.breaker(spec.model)
            if control is not None:
                control.check()
        queue = queue_for(spec.model)
        self.policies.check_backlog(queue, adding=sum(queue_for(s.model) == queue for s, _ in ahead))
        return spec

    def _publish(self, spec: JobSpec) -> None:
        # Last before the send, once nothing else can refuse the job: only the melody's
        # URI crosses the broker (a failure below removes the upload again).
        spec = by_reference(spec, self.settings.storage)
        self.app.backend.store_result(spec.job_id, {"model": spec.model, "user_id": spec.user_id,
                                                    "enqueued_at": spec.enqueued_at}, "QUEUED")
        # Limits scaled with the job's duration: a prefork child enforces them per message.
        limits = job_time_limits(self.settings.worker, generated_s(
            spec, model_settings_for(self.settings, spec.model).max_duration))
        self.app.send_task(TASK_GENERATE, args=[wire_form(spec)], task_id=spec.job_id,
                           queue=queue_for(spec.model),
                           priority=celery_priority(spec.priority, self.app.broker_kind),
                           soft_time_limit=limits.soft, time_limit=limits.hard,
                           retry=True, retry_policy=_PUBLISH_RETRY)

    @contextmanager
    def _giving_back(self, items: Sequence[tuple[JobSpec, str]], *,
                     reserved: bool) -> Iterator[None]:
        """Every failure typed as a ``PipelineError``, after giving back ``items``."""
        try:
            with _typed_failures(self.quota):
                yield
        except BaseException:
            self._give_back_all([spec for spec, _ in items], reserved=reserved)
            raise

    def _give_back_all(self, specs: Sequence[JobSpec], *, reserved: bool) -> None:
        """Undo refused enqueues: the quota slot, the QUEUED state and the id claim, so that
        nothing reads as a job that never was (the broker or database may be down too: each
        step is best effort, and the claim's TTL is the last resort)."""
        for spec in specs:
            for uploaded in inputs_of(spec):  # uploaded for this job only
                discard_input(uploaded, self.settings.storage)
            if reserved:
                try:
                    self.quota.release(spec.job_id)
                except Exception:
                    log.warning("could not give back the quota slot of job %s", spec.job_id)
                try:
                    self.app.backend.forget(spec.job_id)  # a QUEUED written before the send
                except Exception:
                    log.warning("could not remove the stored state of job %s", spec.job_id)
            self._forget_claim(spec.job_id)

    def _forget_claim(self, job_id: str) -> None:
        try:
            self.registry.release(job_id)
        except Exception:  # the broker is likely down too; the claim expires with its TTL
            log.warning("could not release the claim of job %s", job_id)

    def _cancel_sent(self, sent: Sequence[JobSpec]) -> None:
        """The broker failed part-way through a list: the jobs already sent are cancelled
        (a worker drops a cancelled job unstarted, and its quota slot comes back)."""
        for spec in sent:
            try:
                self._handle(spec.job_id, replayed=False).cancel()
            except Exception:
                log.warning("could not cancel job %s of a list that failed part-way", spec.job_id)


def _different_request(job_id: str) -> JobIdConflict:
    return JobIdConflict(f"job_id {job_id!r} was used for a different request; send the same "
                         "request to get that job again, or choose another id", "job_id",
                         {"reason": "different_request"})


@contextmanager
def _typed_failures(quota: QuotaStore, what: str = "enqueue") -> Iterator[None]:
    """Every failure of the public API is typed; the chained cause keeps a bug visible."""
    try:
        yield
    except PipelineError:
        raise
    except (OperationalError, RedisError, OSError) as exc:
        raise ServiceUnavailable(f"the broker is unreachable: {exc}", None,
                                 {"retry_after": 5}) from exc
    except SQLAlchemyError as exc:
        raise database_failure(exc, quota) from exc
    except Exception as exc:
        raise PipelineError(f"{what} failed unexpectedly: {type(exc).__name__}: {exc}",
                            None) from exc


_lock = threading.Lock()
_producers: dict[int, tuple[Settings, Producer]] = {}


_live: LiveSettings | None = None


def producer_for(settings: Settings | None) -> Producer:
    """The process's producer for these settings (loaded from the environment if None).

    Settings loaded here are live: their files are watched (``app.settings_poll_interval``) and
    ``reload_settings()`` reloads them at once. Settings passed in belong to the caller.
    """
    global _live
    with _lock:
        if settings is None:
            from pipeline.config import load_settings
            key = 0
            if key not in _producers:
                loaded = load_settings()
                producer = Producer(loaded)
                _producers[key] = (loaded, producer)
                _live = LiveSettings(current=loaded)
                _live.subscribe(lambda _old, new: producer.apply_settings(new))
                FileWatcher(_live, interval=lambda: _live.current.app.settings_poll_interval
                            if _live is not None else 0).start()
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


def get_job(job_id: str, settings: Settings | None = None, *,
            user_id: str | None = None) -> JobHandle:
    """The handle of an existing job; ``JobNotFound`` if there is none, or if ``user_id`` is
    given and the job is another user's (without ``user_id``: the operator's view)."""
    return producer_for(settings).get_job(job_id, user_id)


def list_jobs(user_id: str, settings: Settings | None = None, *,
              status: JobStatus | str | None = None, since: datetime | None = None,
              limit: int = 20, cursor: str | None = None) -> JobPage:
    """``user_id``'s jobs, newest first, one page of ``limit`` (1..100) at a time: pass the
    page's ``next_cursor`` as ``cursor`` for the next. ``status`` filters, ``since`` keeps
    jobs created at or after it. Read from the ledger, so a job is listed for as long as its
    row is kept, long after the result backend has forgotten it."""
    return producer_for(settings).list_jobs(user_id, status=status, since=since, limit=limit,
                                            cursor=cursor)


def reload_settings() -> ReloadResult:
    """Reload the settings of this process's default producer (the one ``enqueue`` uses without
    ``settings``) now: for a host service's own SIGHUP handler or admin endpoint. The library
    never installs a signal handler of its own: the signals belong to the host program."""
    producer_for(None)
    assert _live is not None
    return _live.reload("reload_settings()")
