"""What a job's end sets off outside the job: its uploaded melody is deleted and its webhook,
if it has one, is queued for delivery by a task of its own; and the events a running job sends
before it (``JobEvents``: start, progress, partial, as its ``webhook_events_filter`` asks).

Delivery never runs in the generation loop nor in a job's task thread: ``job_ended`` only
records the delivery and sends a message to ``musicgen.webhooks``, a queue every worker also
consumes (added in ``register``, whatever the worker's ``-Q``). The delivery task POSTs once per
attempt and retries with Celery's own retry (exponential backoff, ``webhooks.max_attempts``) on
a 5xx, a 408/429, a connection error or a timeout; each attempt is recorded in Redis
(``musicgen:webhook:{job id}``), where ``handle.webhook_deliveries()`` reads it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from celery import Task
from celery.signals import celeryd_after_setup, task_revoked
from sqlalchemy.exc import SQLAlchemyError

from pipeline import webhooks
from pipeline.client.inputs import INPUT_FIELDS
from pipeline.client.inputs import discard as discard_input
from pipeline.contract.jobs import DEFAULT_WEBHOOK_EVENTS, MelodyInput
from pipeline.contract.outcome import FinalStatus
from pipeline.errors import PipelineError
from pipeline.infra.celery_app import TASK_GENERATE, PipelineCelery
from pipeline.quota.configured import store_for
from pipeline.quota.webhook_secrets import WebhookSecrets
from workers.typed_celery import receiver, task

log = logging.getLogger(__name__)

WEBHOOK_QUEUE = "musicgen.webhooks"
TASK_DELIVER_WEBHOOK = "musicgen.webhooks.deliver"
MAX_BACKOFF_S = 3600.0  # below broker.visibility_timeout: a retry waiting longer could be redelivered


def _log(app: PipelineCelery) -> webhooks.DeliveryLog:
    return webhooks.DeliveryLog(app.redis, app.settings.broker.result_expires)


def job_ended(app: PipelineCelery, payload: Any, status: FinalStatus, *,
              result: Mapping[str, Any] | None = None, error_code: str | None = None,
              error_message: str | None = None) -> None:
    """A job ended for good: delete its uploaded inputs (melody, continuation) and queue its
    webhook (the webhook step of ``workers/outcome.py``). Never raises: the job's own outcome
    stands."""
    if not isinstance(payload, Mapping):
        return
    job_id = str(payload.get("job_id") or "")
    for name in INPUT_FIELDS:
        try:
            raw = payload.get(name)
            uploaded = MelodyInput.model_validate(raw) if isinstance(raw, Mapping) else None
            discard_input(uploaded, app.settings.storage)
        except Exception:
            log.warning("job %s: could not read its %s input to delete it", job_id, name,
                        exc_info=True)
    url = payload.get("webhook_url")
    if not isinstance(url, str) or not url or not job_id or not _asked(payload, "completed"):
        return
    try:
        message_id = webhooks.message_id_for(job_id, status)
        if not _log(app).open(job_id, url, webhooks.EVENT_TYPES[status], message_id):
            return  # this job's end was already announced (a redelivered job ending twice)
        _queue(app, payload, url, message_id, webhooks.event(
            job_id, status, result=result, error_code=error_code, error_message=error_message,
            public_url=app.settings.api.public_url))
    except Exception:
        log.exception("job %s: could not queue its webhook", job_id)


def _asked(payload: Mapping[str, Any], name: str) -> bool:
    """Whether the job's ``webhook_events_filter`` has ``name`` (a message without the filter,
    from an older producer, asked for its end only)."""
    wanted = payload.get("webhook_events_filter")
    return name in (wanted if isinstance(wanted, list) else DEFAULT_WEBHOOK_EVENTS)


def _queue(app: PipelineCelery, payload: Mapping[str, Any], url: str, message_id: str,
           event: dict[str, Any]) -> None:
    """Send one recorded event to the delivery task: a publish, never the POST itself."""
    user_id = payload.get("user_id")
    app.send_task(TASK_DELIVER_WEBHOOK, queue=WEBHOOK_QUEUE, args=[
        str(payload.get("job_id")), url, message_id, event,
        user_id if isinstance(user_id, str) else None])


class JobEvents:
    """The events a running job sends before its end, as its ``webhook_events_filter`` asks:
    ``job.started``, ``job.progress`` (at most one per ``webhooks.progress_interval_s``) and
    ``job.partial``.

    Called from the job's own task thread (``workers/tasks.py``), never from the generation
    loop: each event is a Redis record and a Celery publish to ``musicgen.webhooks``, and the
    POST is the delivery task's. Never raises: an event is a courtesy, the job goes on.
    """

    def __init__(self, app: PipelineCelery, payload: Mapping[str, Any], *, attempt: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app, self.payload, self.attempt, self._clock = app, payload, attempt, clock
        self.job_id = str(payload.get("job_id") or "")
        url = payload.get("webhook_url")
        self.url = url if isinstance(url, str) and url and self.job_id else None
        self._interval = app.settings.webhooks.progress_interval_s
        self._last_at: float | None = None
        self._last: tuple[float, str] | None = None
        self._sent = 0

    def _wants(self, name: str) -> bool:
        return self.url is not None and _asked(self.payload, name)

    def started(self) -> None:
        if self._wants("start"):
            self._send(webhooks.started_id(self.job_id, self.attempt),
                       webhooks.started_event(self.job_id, attempt=self.attempt))

    def progress(self, fraction: float, message: str) -> None:
        if not self._wants("progress") or self._last == (round(fraction, 4), message):
            return  # nothing new to tell
        now = self._clock()
        if self._last_at is not None and now - self._last_at < self._interval:
            return
        self._last_at, self._last = now, (round(fraction, 4), message)
        self._sent += 1
        self._send(webhooks.progress_id(self.job_id, self.attempt, self._sent),
                   webhooks.progress_event(self.job_id, fraction, message))

    def partial(self, info: Mapping[str, Any]) -> None:
        """A newer partial file (``workers.partials``: its window, windows and seconds)."""
        if not self._wants("partial"):
            return
        window = int(info["window"])
        self._send(webhooks.partial_id(self.job_id, window), webhooks.partial_event(
            self.job_id, window=window, windows=int(info["windows"]),
            seconds=float(info["seconds"]), public_url=self.app.settings.api.public_url))

    def _send(self, message_id: str, event: dict[str, Any]) -> None:
        assert self.url is not None
        try:
            if _log(self.app).open_event(self.job_id, self.url, event["type"], message_id):
                _queue(self.app, self.payload, self.url, message_id, event)
        except Exception:  # a Redis blip: this event is lost, the job is not
            log.warning("job %s: could not queue its %s webhook", self.job_id, event["type"],
                        exc_info=True)


_SECRETS: dict[int, WebhookSecrets] = {}  # per app, made in the process that delivers


def _signing(app: PipelineCelery, user_id: str | None) -> list[str]:
    """The secrets this delivery is signed with: the user's own (pipeline/quota/
    webhook_secrets.py), else the deployment's ``webhooks.secret``; empty: none is set."""
    if user_id is not None:
        store = _SECRETS.get(id(app))
        if store is None:  # its own engine per process: connections must not cross a fork
            store = _SECRETS[id(app)] = WebhookSecrets(store_for(app.settings).engine)
        own = store.signing(user_id)
        if own:
            return own
    secret = app.settings.webhooks.secret
    # An empty secret is none (the settings rules require one wherever webhooks are on).
    return [secret.get_secret_value()] if secret is not None and secret.get_secret_value() else []


def deliver(app: PipelineCelery, request_retries: int, job_id: str, url: str, message_id: str,
            payload: Mapping[str, Any],
            user_id: str | None = None) -> tuple[webhooks.Attempt, float | None]:
    """One attempt; returns its outcome and the countdown to the next (None: no more)."""
    hooks = app.settings.webhooks
    attempt_no = request_retries + 1
    target = webhooks.check_target(url, hooks.allowed_hosts, public_hosts=hooks.public_hosts)
    if isinstance(target, str):
        outcome = webhooks.Attempt(False, False, None, target)
    else:
        try:
            secrets = _signing(app, user_id)
        except (PipelineError, SQLAlchemyError) as exc:  # the database is away: try again
            outcome = webhooks.Attempt(False, True, None, "cannot read the user's webhook "
                                                          f"secret ({type(exc).__name__})")
        else:
            outcome = (webhooks.post(target.url, message_id, payload, secrets,
                                     timeout_s=hooks.timeout_s, public=target.public) if secrets
                       else webhooks.Attempt(False, False, None, "webhooks.secret is unset"))
    again = outcome.retryable and attempt_no < hooks.max_attempts
    _log(app).attempt(job_id, outcome, final=not again, message_id=message_id)
    if outcome.ok:
        log.info("webhook of job %s delivered to %s (attempt %d)", job_id, url, attempt_no)
    elif not again:
        log.warning("webhook of job %s to %s failed after %d attempt(s): %s", job_id, url,
                    attempt_no, outcome.error)
    countdown = min(hooks.backoff * 2 ** request_retries, MAX_BACKOFF_S) if again else None
    return outcome, countdown


def register(app: PipelineCelery) -> None:
    """Add the delivery task to a worker app, the webhook queue to every worker of it, and the
    hook that sees a job revoked before it ever ran."""

    # shared=False: a closure over this app must not be added to apps built later.
    @task(app, name=TASK_DELIVER_WEBHOOK, queue=WEBHOOK_QUEUE, bind=True, shared=False,
          ignore_result=True, max_retries=None, acks_late=True)
    def deliver_task(self: Task, job_id: str, url: str, message_id: str,
                     payload: dict[str, Any], user_id: str | None = None) -> dict[str, Any]:
        # user_id: absent from deliveries queued before per-user secrets (the default signs).
        outcome, countdown = deliver(app, self.request.retries, job_id, url, message_id, payload,
                                     user_id)
        if countdown is not None:
            raise self.retry(countdown=countdown)
        return {"delivered": outcome.ok, "status": outcome.status, "error": outcome.error}

    @receiver(celeryd_after_setup)
    def _consume_webhooks(sender: str, instance: Any, **_: Any) -> None:
        if instance.app is app:  # as workers/maintenance.py adds its queue
            queues = instance.app.amqp.queues
            queues.select_add(queues[WEBHOOK_QUEUE])

    @receiver(task_revoked)
    def _revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
        # Celery drops a job revoked while queued without running it (no on_failure): its end
        # is announced here (its ledger row was settled by the cancelling handle). A job cancelled
        # by our own flag is settled in workers/outcome.py instead.
        if getattr(sender, "name", None) != TASK_GENERATE or getattr(sender, "app", None) is not app:
            return
        args = getattr(request, "args", None) or ()
        if args:
            job_ended(app, args[0], FinalStatus.CANCELLED, error_code="cancelled",
                      error_message="the job was cancelled before it started")
