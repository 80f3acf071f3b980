"""How a running task treats a Redis it cannot reach: a failover or a restart is an outage of
seconds, and no accepted job may end FAILED for it.

Each Redis touch of a job is one of two kinds:

* **before the job runs** (its cancel flag, the rate limit, the breaker's admission, the poison
  count): the job cannot start without the answer, so :func:`through_outage` waits out the
  outage (a Sentinel failover with the default ``down-after-milliseconds`` of 30 s takes about
  35 s) and past that raises :class:`~pipeline.errors.CoordinationUnavailable`, a transient
  error: Celery retries the job with its backoff.
* **after the file is made or best effort** (a breaker success or failure, progress, the
  webhook): logged and skipped at their call sites; the job's own outcome stands.

Handing a job back (a deferral, Celery's retry) publishes to the broker, which may be the Redis
that is down: :data:`PUBLISH_THROUGH_FAILOVER` makes that publish wait for it just as long.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import redis
from celery import states

from pipeline.errors import Backpressure, CoordinationUnavailable, ServiceUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Longer than a Sentinel failover with default timings (30 s to call the master down, then
#: the election and promotion); an outage past this is a retry with Celery's backoff instead.
OUTAGE_WAIT_S = 45.0
_FIRST_PAUSE_S, _MAX_PAUSE_S = 0.1, 2.0
#: kombu's publish retry policy for a job handed back to the queue: about 50 s of tries, so a
#: publish that starts as the master dies lands on the promoted replica. Past it Celery gives up
#: the publish and the message stays unacknowledged: the broker redelivers it (visibility timeout).
PUBLISH_THROUGH_FAILOVER: dict[str, Any] = {
    "max_retries": 20, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 3.0}


def through_outage(what: str, call: Callable[[], T], *, wait_s: float = OUTAGE_WAIT_S,
                   sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> T:
    """``call()``; while Redis is unreachable, try again with growing pauses for ``wait_s`` s,
    then raise :class:`CoordinationUnavailable` (retryable) chained to the last error.

    Unreachable is a ``redis.RedisError`` or the policies' own typed ``ServiceUnavailable``
    (which they raise for exactly that); backpressure is a producer's refusal, not an outage.
    """
    deadline = clock() + wait_s
    pause = _FIRST_PAUSE_S
    while True:
        try:
            return call()
        except (redis.RedisError, ServiceUnavailable) as exc:
            if isinstance(exc, Backpressure):
                raise
            if clock() + pause > deadline:
                raise CoordinationUnavailable(
                    f"cannot reach Redis for {what} for {wait_s:g} s: {exc}",
                    None, {"what": what}) from exc
            log.warning("cannot reach Redis for %s (%s); trying again in %.1f s", what, exc, pause)
            sleep(pause)
            pause = min(pause * 2, _MAX_PAUSE_S)


def restore_lost_result(backend: Any, outputs: Sequence[Path], job_id: str) -> bool:
    """Put back the ``SUCCESS`` state of a finished job that a failover lost; True if it did.

    An uncoordinated Sentinel failover lets the old master take a finishing job's result and
    ack, then resync them away: the message comes back, the ledger says the job finished, and
    without this a caller waits for a state that never comes. The job's sidecar (one of
    ``outputs`` + ``.json``, on local storage) holds its result, written before the state.
    """
    try:
        if backend.get_state(job_id) in states.READY_STATES:
            return False
    except Exception:  # the backend is away again: the next redelivery tries again
        return False
    for output in outputs:
        sidecar = output.with_name(output.name + ".json")
        if not sidecar.is_file():
            continue
        try:
            result = json.loads(sidecar.read_text(encoding="utf-8"))["result"]
            backend.store_result(job_id, result, states.SUCCESS)
        except Exception:
            log.exception("job %s: could not restore its lost result from %s", job_id, sidecar)
            return False
        log.warning("job %s: its result state was lost (a failover); restored from %s",
                    job_id, sidecar)
        return True
    return False
