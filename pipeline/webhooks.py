"""Job webhooks in the Standard Webhooks style: the events, their signature, one delivery
attempt, the delivery record, and ``verify`` for receivers.

A worker never POSTs from a job: it queues a delivery task (``workers/webhook_task.py``, queue
``musicgen.webhooks``) that calls :func:`post` and retries with Celery's own retry on a 5xx, a
connection error or a timeout. Each attempt is signed afresh::

    webhook-id: <message id, the same on every attempt: receivers dedupe on it>
    webhook-timestamp: <epoch seconds of this attempt>
    webhook-signature: v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">

The key is ``webhooks.secret`` (or the user's own, pipeline/quota/webhook_secrets.py):
``whsec_<base64>`` is decoded (the Standard Webhooks form), any other text is used as its UTF-8
bytes. Signatures are made by the ``standardwebhooks`` package (the specification's reference
implementation), so a receiver may check a delivery with its ``Webhook(key).verify`` as well as
with :func:`verify` here, which names the bad header in a typed error and takes a tolerance and
a clock (the package's is a fixed five minutes from the wall clock).
"""

from __future__ import annotations

import base64
import hmac
import json
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from standardwebhooks.webhooks import Webhook

from pipeline.contract.outcome import FinalStatus
from pipeline.contract.public_addresses import HostNotPublic, public_opener
from pipeline.contract.public_result import job_path, public_link, public_result
from pipeline.contract.remote_urls import WEBHOOK_SCHEMES, check_url, host_allowed, opener
from pipeline.errors import WebhookSignatureInvalid
from pipeline.infra.keys import WEBHOOK_PREFIX

TOLERANCE_S = 300  # a signature older (or newer) than this is a replay, not a delivery
USER_AGENT = "musicgen-pipeline-webhooks/1"
# One event type per final status: job.succeeded, job.failed, job.timeout, job.cancelled.
EVENT_TYPES = {final: f"job.{final.value}" for final in FinalStatus}
# The events before the end, each asked for by its name in webhook_events_filter.
STARTED, PROGRESS, PARTIAL = "job.started", "job.progress", "job.partial"


def _key(secret: str | bytes) -> bytes:
    if isinstance(secret, bytes):
        return secret
    if secret.startswith("whsec_"):
        return base64.b64decode(secret.removeprefix("whsec_"))
    return secret.encode("utf-8")


def signature(secret: str | bytes, message_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``, made by the Standard Webhooks
    reference package. The key goes in as bytes: given text, the package would base64-decode
    it, while ours is used as its UTF-8 bytes unless it is ``whsec_<base64>`` (``_key``)."""
    return Webhook(_key(secret)).sign(message_id, datetime.fromtimestamp(timestamp, UTC), body)


def _envelope(event_type: str, at: float | None, data: dict[str, Any]) -> dict[str, Any]:
    when = datetime.fromtimestamp(time.time() if at is None else at, UTC)
    return {"type": event_type, "timestamp": when.isoformat().replace("+00:00", "Z"),
            "data": data}


def event(job_id: str, status: FinalStatus | str, *, result: Mapping[str, Any] | None = None,
          error_code: str | None = None, error_message: str | None = None,
          public_url: str | None = None, at: float | None = None) -> dict[str, Any]:
    """The JSON event of a job's end (``status``: succeeded, failed, timeout or cancelled).

    ``data`` is the public job view, what ``GET /v1/jobs/{id}`` shows: the result without
    where the server keeps the file (``pipeline.contract.public_result``), the error's code and
    message, and ``audio_url`` (absolute under ``public_url``, ``api.public_url``) once it
    succeeded. A receiver run by a deployment's customer must learn nothing of its disks.
    """
    final = FinalStatus(status)
    succeeded = final is FinalStatus.SUCCEEDED and result is not None
    error = None if error_code is None else {
        "code": error_code,
        "message": error_message or ("the job was cancelled" if final is FinalStatus.CANCELLED
                                     else error_code)}
    return _envelope(EVENT_TYPES[final], at, {
        "job_id": job_id, "status": final.value,
        "result": public_result(result) if result is not None else None, "error": error,
        "audio_url": public_link(public_url, job_path(job_id, "/audio")) if succeeded else None})


def _running(job_id: str, status: str, **more: Any) -> dict[str, Any]:
    """``data`` of an event before the job's end: the same keys as the end's, nothing final."""
    return {"job_id": job_id, "status": status, "result": None, "error": None,
            "audio_url": None, **more}


def started_event(job_id: str, *, attempt: int, at: float | None = None) -> dict[str, Any]:
    """``job.started``: a worker began running the job (its ``attempt``-th try: a retried
    job starts again, and says so once per attempt)."""
    return _envelope(STARTED, at, _running(job_id, "started", attempt=attempt))


def progress_event(job_id: str, fraction: float, message: str, *,
                   at: float | None = None) -> dict[str, Any]:
    """``job.progress``: how far the job is, as ``GET /v1/jobs/{id}`` shows it."""
    return _envelope(PROGRESS, at, _running(job_id, "progress", progress={
        "fraction": round(min(max(fraction, 0.0), 1.0), 4), "message": message}))


def partial_event(job_id: str, *, window: int, windows: int, seconds: float,
                  public_url: str | None = None, at: float | None = None) -> dict[str, Any]:
    """``job.partial``: the audio of a long job's first ``window`` windows of ``windows`` is
    ready (``seconds`` long) at ``partial_url`` (absolute under ``public_url``)."""
    return _envelope(PARTIAL, at, _running(
        job_id, "progress",
        partial={"window": window, "windows": windows, "seconds": seconds},
        partial_url=public_link(public_url, job_path(job_id, "/partial"))))


def body_of(payload: Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed and sent."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


def headers(secret: str | bytes | Sequence[str], message_id: str, body: bytes,
            now: float | None = None) -> dict[str, str]:
    """The headers of one delivery, signed with ``secret``, or with each of several secrets
    (space-separated signatures: a secret being rotated and its successor)."""
    stamp = int(time.time() if now is None else now)
    keys = [secret] if isinstance(secret, str | bytes) else list(secret)
    return {"Content-Type": "application/json", "User-Agent": USER_AGENT,
            "webhook-id": message_id, "webhook-timestamp": str(stamp),
            "webhook-signature": " ".join(signature(k, message_id, stamp, body) for k in keys)}


def verify(body: bytes, headers: Mapping[str, str], secret: str | bytes, *,
           tolerance_s: float = TOLERANCE_S, now: float | None = None) -> dict[str, Any]:
    """Check a received webhook and return its event; ``WebhookSignatureInvalid`` otherwise.

    ``body`` is the raw request body (before any JSON parsing), ``headers`` the request's
    headers (any case), ``secret`` the same ``webhooks.secret`` the workers sign with.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    message_id, stamp, signed = (lower.get(h) for h in
                                 ("webhook-id", "webhook-timestamp", "webhook-signature"))
    if not message_id:
        raise WebhookSignatureInvalid("no webhook-id header", "webhook-id")
    if not signed:
        raise WebhookSignatureInvalid("no webhook-signature header", "webhook-signature")
    try:
        sent_at = int(stamp or "")
    except ValueError as exc:
        raise WebhookSignatureInvalid("webhook-timestamp is not epoch seconds",
                                      "webhook-timestamp") from exc
    if abs((time.time() if now is None else now) - sent_at) > tolerance_s:
        raise WebhookSignatureInvalid(f"webhook-timestamp is more than {tolerance_s:g} s away "
                                      "from now (a replay, or a clock off)", "webhook-timestamp")
    expected = signature(secret, message_id, sent_at, body)
    # Several space-separated signatures may be sent (a secret being rotated): one must match.
    if not any(hmac.compare_digest(expected, s) for s in signed.split()):
        raise WebhookSignatureInvalid("no webhook-signature matches the body and the secret",
                                      "webhook-signature")
    try:
        parsed: dict[str, Any] = json.loads(body)
    except ValueError as exc:
        raise WebhookSignatureInvalid("the signed body is not JSON", "body") from exc
    return parsed


# --- one delivery attempt ------------------------------------------------------------------

@dataclass(frozen=True)
class Attempt:
    """How one POST went: ``ok`` (2xx), or whether trying again may help (``retryable``)."""

    ok: bool
    retryable: bool
    status: int | None
    error: str | None


@dataclass(frozen=True)
class Target:
    """Where a worker may POST now: ``public`` when only the SSRF guard admits the host (it is
    not listed), so the POST must go through the guarded opener."""

    url: str
    public: bool


def check_target(url: str, allowed_hosts: list[str], *,
                 public_hosts: bool = False) -> Target | str:
    """Whether a worker may POST to ``url`` now (the settings may have changed since the job
    was enqueued): the target, or why not."""
    try:
        parts = check_url(url, WEBHOOK_SCHEMES)
    except ValueError as exc:
        return str(exc)
    if host_allowed(parts.hostname or "", allowed_hosts):
        return Target(url, public=False)
    if public_hosts:  # the address is checked as the connection is made (post)
        return Target(url, public=True)
    return f"host {parts.hostname!r} is not in webhooks.allowed_hosts"


def post(url: str, message_id: str, payload: Mapping[str, Any],
         secret: str | bytes | Sequence[str], *,
         timeout_s: float, public: bool = False) -> Attempt:
    """POST the signed event once. 2xx is delivered; a 5xx, 408, 429, a connection error or a
    timeout may pass (retryable); any other answer (4xx, a redirect) will not. ``public``: the
    host was admitted by the SSRF guard alone (``Target.public``), so the connection goes only
    to public addresses, and a host that resolves to another is refused for good."""
    body = body_of(payload)
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers=headers(secret, message_id, body))
    try:
        with (public_opener() if public else opener()).open(
                request, timeout=timeout_s) as response:
            return Attempt(True, False, response.status, None)
    except HostNotPublic as exc:  # raised as the connection is made: nothing was sent
        return Attempt(False, False, None, str(exc))
    except urllib.error.HTTPError as exc:
        retry = exc.code >= 500 or exc.code in (408, 429)
        return Attempt(False, retry, exc.code, f"HTTP {exc.code} {exc.reason}")
    except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Attempt(False, True, None, f"{type(reason).__name__}: {reason}")


# --- the delivery record ---------------------------------------------------------------------

@dataclass(frozen=True)
class WebhookDelivery:
    """A job's webhook as recorded in Redis (``musicgen:webhook:{job id}``)."""

    job_id: str
    url: str
    event: str
    message_id: str
    status: str  # pending, delivered, failed
    attempts: int
    last_status: int | None
    last_error: str | None
    updated_at: float


class DeliveryLog:
    """The records on the broker's Redis (None with the embedded broker: nothing recorded).

    A job's end has its record at ``musicgen:webhook:{job}`` (as before the other events); every
    other event has its own, named by its message id, listed in the order it was queued
    (``pipeline/infra/keys.py``). Each is created once: an event queued twice (a redelivered
    job) is delivered once.
    """

    def __init__(self, client: Any, ttl_s: int) -> None:
        self.client, self.ttl_s = client, ttl_s

    def open(self, job_id: str, url: str, event_type: str, message_id: str) -> bool:
        """Record a new delivery of the job's end; False if this job already has one (it
        ended twice)."""
        return self._open(WEBHOOK_PREFIX + job_id, url, event_type, message_id)

    def open_event(self, job_id: str, url: str, event_type: str, message_id: str) -> bool:
        """Record a new delivery of an event before the job's end (start, progress, partial);
        False if this message was already queued."""
        if not self._open(_event_key(job_id, message_id), url, event_type, message_id):
            return False
        if self.client is not None:
            order = _order_key(job_id)
            pipe = self.client.pipeline()
            pipe.rpush(order, message_id)
            pipe.expire(order, self.ttl_s)
            pipe.execute()
        return True

    def _open(self, key: str, url: str, event_type: str, message_id: str) -> bool:
        if self.client is None:
            return True
        if not self.client.hsetnx(key, "message_id", message_id):
            return False
        self.client.hset(key, mapping={"url": url, "event": event_type, "status": "pending",
                                       "attempts": 0, "updated_at": time.time()})
        self.client.expire(key, self.ttl_s)
        return True

    def attempt(self, job_id: str, outcome: Attempt, *, final: bool,
                message_id: str | None = None) -> None:
        """Record one attempt of the delivery of ``message_id`` (None: the job's end)."""
        if self.client is None:
            return
        key = WEBHOOK_PREFIX + job_id
        if message_id is not None and _text(self.client.hget(key, "message_id")) != message_id:
            key = _event_key(job_id, message_id)
        status = "delivered" if outcome.ok else "failed" if final else "pending"
        pipe = self.client.pipeline()
        pipe.hincrby(key, "attempts", 1)
        pipe.hset(key, mapping={"status": status, "last_status": outcome.status or "",
                                "last_error": outcome.error or "", "updated_at": time.time()})
        pipe.expire(key, self.ttl_s)
        pipe.execute()

    def read(self, job_id: str) -> list[WebhookDelivery]:
        """Every delivery of the job: its events in the order they were queued, its end last."""
        if self.client is None:
            return []
        keys = [_event_key(job_id, _text(message_id))
                for message_id in self.client.lrange(_order_key(job_id), 0, -1)]
        rows = [self._row(job_id, self.client.hgetall(key)) for key in
                [*keys, WEBHOOK_PREFIX + job_id]]
        return [row for row in rows if row is not None]

    @staticmethod
    def _row(job_id: str, raw: Mapping[Any, Any]) -> WebhookDelivery | None:
        if not raw:
            return None
        row = {_text(k): _text(v) for k, v in raw.items()}
        return WebhookDelivery(
            job_id=job_id, url=row.get("url", ""), event=row.get("event", ""),
            message_id=row.get("message_id", ""), status=row.get("status", "pending"),
            attempts=int(row.get("attempts") or 0),
            last_status=int(row["last_status"]) if row.get("last_status") else None,
            last_error=row.get("last_error") or None,
            updated_at=float(row.get("updated_at") or 0))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _event_key(job_id: str, message_id: str) -> str:
    return f"{WEBHOOK_PREFIX}{job_id}:event:{message_id}"


def _order_key(job_id: str) -> str:
    return f"{WEBHOOK_PREFIX}{job_id}:events"


def message_id_for(job_id: str, status: FinalStatus | str) -> str:
    """One id per job end, the same on every attempt (receivers dedupe on it)."""
    return f"msg_{job_id}_{FinalStatus(status).value}"


def started_id(job_id: str, attempt: int) -> str:
    """The ``job.started`` of one attempt: a redelivery of the same attempt sends it once."""
    return f"msg_{job_id}_started_{attempt}"


def progress_id(job_id: str, attempt: int, n: int) -> str:
    """The ``n``-th ``job.progress`` of an attempt."""
    return f"msg_{job_id}_progress_{attempt}_{n}"


def partial_id(job_id: str, window: int) -> str:
    """The ``job.partial`` of a window: announced once per job, even if a retry renders the
    window again (the file at partial_url is then the retry's)."""
    return f"msg_{job_id}_partial_{window}"
