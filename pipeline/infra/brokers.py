"""What differs per broker: URL schemes, Celery's transport settings, priorities, the Redis that
holds our own keys, queue depths, and the broker's state for ``settings check`` and ``health``.

Three brokers are supported, chosen by the scheme of ``broker.url``:

- ``redis://`` / ``rediss://``: one Redis for the queues, the results and our keys
  (breakers, rate limits, cancels, deliveries). A job held by a dead worker comes back after
  ``broker.visibility_timeout``.
- ``sentinel://h1:26379;sentinel://h2:26379``: the same over a Sentinel-managed Redis
  (``broker.master_name``); kombu and Celery's ``sentinel`` result backend find the master.
- ``amqp://`` / ``amqps://`` / ``pyamqp://``: RabbitMQ for the queues. A consumer that goes away
  has its unacked messages requeued at once, so a killed node's jobs resume in seconds. Results
  and our keys need a Redis: ``broker.result_backend`` (required, checked in config/rules.py).

Unset, the embedded file-system broker (development only) is used. Nothing here imports a
client library at module level: ``import pipeline`` stays light and works without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from pipeline.config.schema import BrokerSettings, Settings
from pipeline.config.urls import with_password
from pipeline.infra import keys


class BrokerKind(str, Enum):
    """Which kind of broker ``broker.url`` names."""

    embedded = "embedded"
    redis = "redis"
    sentinel = "sentinel"
    amqp = "amqp"


SCHEMES: dict[str, BrokerKind] = {
    "redis": BrokerKind.redis, "rediss": BrokerKind.redis, "sentinel": BrokerKind.sentinel,
    "amqp": BrokerKind.amqp, "amqps": BrokerKind.amqp, "pyamqp": BrokerKind.amqp,
}
#: Schemes a Redis for results and our own keys may have (the result backend with RabbitMQ).
REDIS_SCHEMES = ("redis", "rediss", "sentinel")
#: Sentinel URLs list one sentinel per chunk (kombu's and Celery's separator).
SENTINEL_SEPARATOR = ";"
#: What RabbitMQ's ``consumer_timeout`` is when rabbitmq.conf does not set it (3.8.15 and later).
RABBITMQ_DEFAULT_CONSUMER_TIMEOUT_S = 1800


def kind_of(url: str | None) -> BrokerKind:
    """The broker ``url`` names; ``ValueError`` for a scheme we do not support."""
    if url is None:
        return BrokerKind.embedded
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    try:
        return SCHEMES[scheme]
    except KeyError:
        raise ValueError(f"unsupported broker scheme {scheme or url!r}: use one of "
                         f"{', '.join(s + '://' for s in SCHEMES)}") from None


def chunks(url: str) -> list[str]:
    """The URLs of a (possibly multi-host Sentinel) URL string."""
    return [c.strip() for c in url.split(SENTINEL_SEPARATOR) if c.strip()]


def url_with_password(url: str, password: SecretStr | None) -> str:
    """``url`` with its password put in (each sentinel of a Sentinel URL gets it)."""
    return SENTINEL_SEPARATOR.join(with_password(c, password) for c in chunks(url))


def celery_priority(kind: BrokerKind, request_priority: int) -> int:
    """The message priority for a request's 0-9 (9 most urgent).

    Redis (kombu's lists): 0 is served first, so ours is inverted. RabbitMQ: a higher number
    is served first, up to the queue's ``x-max-priority`` (``keys.AMQP_MAX_PRIORITY``).
    """
    if kind is BrokerKind.amqp:
        return min(request_priority, keys.AMQP_MAX_PRIORITY)
    return max(keys.KOMBU_PRIORITY_STEPS) - request_priority


def results_password(broker: BrokerSettings) -> SecretStr | None:
    """The password of the results Redis: its own, else the broker's when that is a Redis too."""
    if broker.result_backend_password is not None:
        return broker.result_backend_password
    return None if kind_of(broker.url) is BrokerKind.amqp else broker.password


def results_url(settings: Settings) -> str:
    """The result backend's URL with its password (the broker's URL when it is a Redis)."""
    b = settings.broker
    if b.result_backend:
        return url_with_password(b.result_backend, results_password(b))
    if kind_of(b.url) is BrokerKind.amqp or b.url is None:
        # The rules refuse this; a clear message here too for a Settings built in code.
        raise ValueError("broker.result_backend is required with a RabbitMQ broker")
    return url_with_password(b.url, b.password)


def coordination_url(settings: Settings) -> str | None:
    """The Redis that holds our own keys (breakers, rate limits, cancels, deliveries, webhooks).

    The broker's Redis; with RabbitMQ the result backend's (a Redis: config/rules.py). ``None``
    with the embedded broker, where those live in memory and files.
    """
    kind = kind_of(settings.broker.url)
    if kind is BrokerKind.embedded:
        return None
    if kind is BrokerKind.amqp:
        return results_url(settings)
    return url_with_password(settings.broker.url or "", settings.broker.password)


def _sentinel_parts(url: str) -> tuple[list[tuple[str, int]], int, str | None]:
    hosts = []
    db, password = 0, None
    for chunk in chunks(url):
        parts = urlsplit(chunk)
        hosts.append((parts.hostname or "localhost", parts.port or 26379))
        if parts.path.strip("/").isdigit():
            db = int(parts.path.strip("/"))
        password = password or parts.password
    return hosts, db, password


def redis_client(url: str, settings: Settings) -> Any:
    """A redis-py client on ``url`` (a Sentinel URL gives a client on its current master)."""
    import redis

    timeout = settings.broker.connect_timeout
    if kind_of(url) is not BrokerKind.sentinel:
        return redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    from redis.sentinel import Sentinel

    hosts, db, password = _sentinel_parts(url)
    sentinel = Sentinel(hosts, socket_timeout=timeout,
                        socket_connect_timeout=timeout,
                        sentinel_kwargs={"socket_timeout": timeout, "password": password})
    return sentinel.master_for(
        settings.broker.master_name, db=db, password=password, socket_timeout=timeout,
        socket_connect_timeout=timeout)


def wait_for_replicas(client: Any, replicas: int, timeout_ms: int) -> int:
    """How many replicas (at most ``replicas``) confirm everything the master did before this
    call, within ``timeout_ms``: Redis's ``WAIT``.

    WAIT waits for the calling connection's own last write, and the publish went out on
    kombu's connection; so this connection writes first (:data:`keys.REPLICATION_FENCE`). The
    master executed the publish before this call began, and its replication stream is one
    ordered log: a replica that has the fence has the job.
    """
    pipe = client.pipeline(transaction=False)  # one connection for both commands
    pipe.incr(keys.REPLICATION_FENCE)
    pipe.execute_command("WAIT", replicas, timeout_ms)
    return int(pipe.execute()[1])


def limits_storage_uri(url: str, master_name: str) -> str:
    """``url`` as the ``limits`` library spells it (its Sentinel scheme lists hosts by comma).

    limits reads no database number from a Sentinel URI: the rate-limit windows then live in
    the master's database 0 (under ``musicgen:``, so they collide with nothing).
    """
    if kind_of(url) is not BrokerKind.sentinel:
        return url
    hosts, _, password = _sentinel_parts(url)
    auth = f":{password}@" if password else ""
    return f"redis+sentinel://{auth}{','.join(f'{h}:{p}' for h, p in hosts)}/{master_name}"


def transport_conf(settings: Settings) -> dict[str, Any]:
    """The Celery settings that differ per broker (the embedded one is celery_app's)."""
    b = settings.broker
    kind = kind_of(b.url)
    url = url_with_password(b.url or "", b.password)
    conf: dict[str, Any] = {
        "broker_url": url,
        "result_backend": results_url(settings),
        # A finished job's result must survive a short Redis outage, not vanish with it.
        "result_backend_always_retry": True, "result_backend_max_retries": 20,
        "redis_socket_connect_timeout": b.connect_timeout,
    }
    results_kind = kind_of(b.result_backend) if b.result_backend else kind
    results_options: dict[str, Any] = {"visibility_timeout": b.visibility_timeout}
    if results_kind is BrokerKind.sentinel:
        results_options["master_name"] = b.master_name
    conf["result_backend_transport_options"] = results_options
    if kind in (BrokerKind.redis, BrokerKind.sentinel):
        options: dict[str, Any] = {
            # Longer than the hard time limit (validated), so a running job is not handed
            # to a second worker while the first still works on it.
            "visibility_timeout": b.visibility_timeout,
            "queue_order_strategy": "priority",
            "priority_steps": list(keys.KOMBU_PRIORITY_STEPS),
        }
        if kind is BrokerKind.sentinel:
            options["master_name"] = b.master_name
        conf["broker_transport_options"] = options
        return conf
    # RabbitMQ. Durable classic queues with priorities: every queue Celery declares (the model
    # queues, webhooks, default) gets x-max-priority, producer and worker alike, so both sides
    # declare the same arguments (RabbitMQ refuses a redeclaration that differs). Quorum queues
    # on 3.x take no priorities, so they are an option only where priorities do not matter.
    if b.queue_type == "quorum":
        # The model queues are named per job, not configured: Celery creates them as "missing"
        # queues, whose type is task_create_missing_queue_type (default classic), not the
        # default queue's (test_quorum_queues.py found them classic with only the latter set).
        conf.update(task_default_queue_type="quorum", task_create_missing_queue_type="quorum",
                    worker_detect_quorum_queues=True)
    else:
        conf["task_queue_max_priority"] = keys.AMQP_MAX_PRIORITY
    conf.update(
        # Seconds between AMQP heartbeats: a node that vanishes without closing its socket
        # (power, network) has its unacked jobs requeued after about two missed beats.
        broker_heartbeat=b.heartbeat,
        broker_transport_options={"confirm_publish": True},  # enqueue returns once RabbitMQ has it
    )
    return conf


def amqp_queue_depth(connection: Any, queue: str) -> int:
    """Ready messages in RabbitMQ queue ``queue`` (0 when it was never declared).

    A passive declare on a channel of its own: a missing queue closes that channel only.
    Unacked (reserved or running) messages are not counted, as on Redis.
    """
    from amqp.exceptions import NotFound  # type: ignore[import-untyped]

    channel = connection.channel()
    try:
        return int(channel.queue_declare(queue=queue, passive=True).message_count)
    except NotFound:
        return 0
    finally:
        try:
            channel.close()
        except Exception:  # already closed by the broker after NotFound
            pass


@dataclass
class BrokerState:
    """What ``settings check`` and ``health`` say about the broker."""

    kind: BrokerKind
    where: str  # the URL without its password
    reachable: bool
    version: str | None = None
    error: str | None = None
    depths: dict[str, int | None] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind.value, "where": self.where, "reachable": self.reachable,
                "version": self.version, "error": self.error, "depths": dict(self.depths)}

    def line(self) -> str:
        if not self.reachable:
            return f"{self.kind.value} at {self.where} unreachable: {self.error}"
        depths = ", ".join(f"{q} {'?' if n is None else n}" for q, n in self.depths.items())
        return (f"{self.kind.value} {self.version or '(version unknown)'} at {self.where}"
                + (f"; waiting: {depths}" if depths else ""))


def shown_url(url: str) -> str:
    """``url`` without any password, for logs and reports."""
    from kombu.utils.url import maybe_sanitize_url

    return SENTINEL_SEPARATOR.join(str(maybe_sanitize_url(c)) for c in chunks(url))


def broker_state(settings: Settings, queues: Sequence[str]) -> BrokerState:
    """Connect to the broker, learn its server version and the depth of each of ``queues``."""
    kind = kind_of(settings.broker.url)
    if kind is BrokerKind.embedded:
        return BrokerState(kind, "file system (development)", True, None)
    where = shown_url(settings.broker.url or "")
    if kind is BrokerKind.amqp:
        return _amqp_state(settings, queues, where)
    import redis

    from pipeline.policies.backpressure import queue_depth

    client = redis_client(url_with_password(settings.broker.url or "", settings.broker.password),
                          settings)
    try:
        version = str(client.info("server").get("redis_version"))
        depths: dict[str, int | None] = {q: queue_depth(client, q) for q in queues}
    except (redis.RedisError, OSError) as exc:
        return BrokerState(kind, where, False, error=f"{type(exc).__name__}: {exc}",
                           depths=dict.fromkeys(queues))
    finally:
        client.close()
    return BrokerState(kind, where, True, f"Redis {version}", depths=depths)


def _amqp_state(settings: Settings, queues: Sequence[str], where: str) -> BrokerState:
    from kombu.connection import Connection

    url = url_with_password(settings.broker.url or "", settings.broker.password)
    conn = Connection(url, connect_timeout=settings.broker.connect_timeout)  # type: ignore[no-untyped-call]
    try:
        conn.ensure_connection(max_retries=1)  # type: ignore[no-untyped-call]
        client = conn.connection  # amqp.Connection
        props = getattr(client, "server_properties", {}) or {}
        version = f"{props.get('product', 'RabbitMQ')} {props.get('version', '?')}"
        depths: dict[str, int | None] = {q: amqp_queue_depth(client, q) for q in queues}
    except Exception as exc:  # kombu wraps socket, auth and vhost errors in several types
        return BrokerState(BrokerKind.amqp, where, False, error=f"{type(exc).__name__}: {exc}",
                           depths=dict.fromkeys(queues))
    finally:
        conn.release()  # type: ignore[no-untyped-call]
    return BrokerState(BrokerKind.amqp, where, True, version, depths=depths)
