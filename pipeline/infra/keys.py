"""Every Redis key name and prefix musicgen-pipeline uses, in one place (like arq's constants.py).

The broker's Redis is shared with Celery/kombu (and possibly with other services), so every key
this project writes lives under ``ROOT_PREFIX``; ``redis-cli --scan --pattern 'musicgen:*'`` lists
them all. Keys kombu owns are named here too, because the producer reads them (backlog checks).
Functions, not f-strings scattered through the code, build the composite names.
"""

from __future__ import annotations

from collections.abc import Sequence

ROOT_PREFIX = "musicgen:"

# --- circuit breakers (pipeline/policies/breaker.py) ---------------------------------------
#: One HASH per model preset: ``musicgen:breaker:{preset}`` with fields ``failures``,
#: ``opened_at`` and ``probe_until`` (epoch seconds). No key at all means closed, zero failures.
BREAKER_PREFIX = ROOT_PREFIX + "breaker:"

# --- global rate limits (pipeline/policies/rate_limit.py) -----------------------------------
#: Passed to ``limits`` as its storage ``key_prefix``; limits appends ``:`` and its own
#: ``LIMITER/{key}/{amount}/{multiples}/{granularity}`` (a LIST of hit timestamps per key).
RATE_LIMIT_PREFIX = ROOT_PREFIX + "ratelimit"
#: The HTTP gateway's per-API-key request rate (pipeline/gateway/auth.py), the same layout.
API_RATE_PREFIX = ROOT_PREFIX + "apirate"

# --- per-job facts (pipeline/client/registry.py) ---------------------------------------------------
#: ``musicgen:job:{id}``: set NX at enqueue; makes a client job id idempotent.
CLAIM_PREFIX = ROOT_PREFIX + "job:"
#: ``musicgen:cancel:{id}``: a cancelled job; workers check it before and during a job.
CANCEL_PREFIX = ROOT_PREFIX + "cancel:"
#: ``musicgen:deliveries:{id}``: how many times a worker started the job (poison detection).
DELIVERY_PREFIX = ROOT_PREFIX + "deliveries:"
#: ``musicgen:webhook:{id}``: a HASH recording the job-end webhook of a job (pipeline/webhooks.py):
#: ``url``, ``event``, ``message_id``, ``status`` (pending, delivered, failed), ``attempts``,
#: ``last_status`` (the receiver's HTTP status), ``last_error``, ``updated_at``. Created once
#: (HSETNX), so a job that ends twice (a redelivery) notifies once. The job's other events
#: (``webhook_events_filter``: start, progress, partial) each have a HASH of the same fields at
#: ``musicgen:webhook:{id}:event:{message id}`` (also created once), and their message ids, in
#: the order they were queued, a LIST at ``musicgen:webhook:{id}:events``.
WEBHOOK_PREFIX = ROOT_PREFIX + "webhook:"
#: ``musicgen:stream:{id}``: a STREAM of a ``stream=True`` job's audio chunks and the entry that
#: ends its attempt (pipeline/contract/streams.py), written by the worker with ``XADD MAXLEN ~``
#: (``STREAM_MAX_ENTRIES``) and expiring with the job's result; read by ``handle.stream()``.
STREAM_PREFIX = ROOT_PREFIX + "stream:"
#: The cap on a job stream's entries: a reader that never reads costs Redis at most this many
#: chunks (~128 KB per mono second), and the worker never waits for a reader. Far above the
#: chunks of any job (a 300 s job at 1 s chunks has 301 entries).
STREAM_MAX_ENTRIES = 1000

#: A counter every producer increments right after a publish when ``broker.wait_replicas`` is
#: set: a write on its own connection that Redis orders after the publish, for WAIT to wait on.
REPLICATION_FENCE = ROOT_PREFIX + "replication-fence"

#: The key of the gateway's signed URLs when ``api.url_token_secret`` is unset: a random STRING
#: made with SET NX by the first gateway process, read by every other (pipeline/gateway/url_tokens.py).
URL_TOKEN_KEY = ROOT_PREFIX + "gateway:url-token-key"

# --- worker heartbeats and held jobs (workers/heartbeat.py, workers/recovery.py) ------------
#: A ZSET of the live worker processes: member = worker id (``host/pid/random``, one per process
#: start, so a restarted worker never overwrites the record of the one that died), score = the
#: Redis server time of its last beat. A member whose score is old is a dead worker.
WORKERS_KEY = ROOT_PREFIX + "workers"
#: ``musicgen:worker:{worker id}``: a HASH with ``hostname``, ``pid``, ``beat`` (Redis time),
#: ``beat_local`` (the worker's own clock, which kombu stamps its deliveries with), ``held``
#: (JSON: delivery tag -> job id of every message the worker holds) and ``engines`` (JSON: model
#: preset -> ``static`` or ``hf``, the engine serving it in that process once decided). Expires after the
#: visibility timeout, when the broker has given those messages back by itself.
WORKER_PREFIX = ROOT_PREFIX + "worker:"

# --- kombu's Redis transport (read-only for us) ---------------------------------------------
#: kombu.transport.redis.Channel.sep: a queue ``Q`` with priority step ``p > 0`` is the LIST
#: ``Q + sep + str(p)``; step 0 is the LIST ``Q`` itself. kombu does not let this be configured.
KOMBU_PRIORITY_SEP = "\x06\x16"
#: The broker's ``priority_steps`` transport option (pipeline/infra/celery_app.py): one list per
#: priority, so each of the ten request priorities is its own place in the queue. kombu's
#: default, (0, 3, 6, 9), folds 4, 5 and 6 into one list: the default priority and a boosted
#: one would wait side by side.
KOMBU_PRIORITY_STEPS: tuple[int, ...] = tuple(range(10))

# --- RabbitMQ (pipeline/infra/brokers.py) ---------------------------------------------------------
#: ``x-max-priority`` of every queue Celery declares on RabbitMQ: priorities 0-9, one per
#: request priority (RabbitMQ serves the higher number first). Not 10: an eleventh level would
#: never be used, and each level of a classic queue costs the broker memory and CPU.
AMQP_MAX_PRIORITY = 9


def breaker_key(name: str, prefix: str = BREAKER_PREFIX) -> str:
    """The HASH holding the shared state of the circuit breaker for model preset ``name``."""
    return f"{prefix}{name}"


def worker_key(worker_id: str) -> str:
    """The HASH recording worker process ``worker_id``'s last beat and the messages it holds."""
    return f"{WORKER_PREFIX}{worker_id}"


def stream_key(job_id: str) -> str:
    """The STREAM of a streaming job's audio chunks."""
    return f"{STREAM_PREFIX}{job_id}"


def queue_list_keys(queue: str,
                    priority_steps: Sequence[int] = KOMBU_PRIORITY_STEPS) -> list[str]:
    """The LISTs kombu's Redis transport keeps for ``queue``, one per priority step.

    Mirrors ``Channel._q_for_pri``: step 0 is the bare queue name (so a transport configured
    without priorities still has its one list counted).
    """
    return [f"{queue}{KOMBU_PRIORITY_SEP}{step}" if step else queue
            for step in sorted(set(priority_steps))]
