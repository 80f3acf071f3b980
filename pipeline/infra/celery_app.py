"""The Celery app factory: one app per process, built from Settings.

The producer and the workers build their app here so both sides agree on serialisation,
routing and the delivery guarantees; the workers add their tasks on top (``workers/app.py``).
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any

from celery import Celery

from pipeline.config.schema import Settings
from pipeline.infra import brokers

TASK_GENERATE = "musicgen.generate"


class PipelineCelery(Celery):  # type: ignore[misc]
    """A Celery app that carries the Settings it was built from (never put in ``conf``:
    Flower and ``inspect conf`` print conf)."""

    settings: Settings

    @property
    def embedded(self) -> bool:
        return self.settings.broker.url is None

    @cached_property
    def Worker(self) -> Any:  # noqa: N802 (Celery's name)
        """The worker class (only a worker process asks for it): see workers/shutdown.py."""
        return self.subclass_with_self("workers.shutdown:Worker")

    @property
    def broker_kind(self) -> brokers.BrokerKind:
        return brokers.kind_of(self.settings.broker.url)

    @cached_property
    def coordination_url(self) -> str | None:
        """The Redis URL (password included) of our own keys: the broker's, or with RabbitMQ
        the result backend's (pipeline/infra/brokers.py). None with the embedded broker."""
        return brokers.coordination_url(self.settings)

    @cached_property
    def redis(self) -> Any:
        """A client on the Redis of our own keys (None with the embedded broker)."""
        url = self.coordination_url
        return None if url is None else brokers.redis_client(url, self.settings)

    def queue_depth(self, queue: str) -> int:
        """Jobs waiting in ``queue`` (not those reserved by a worker), on either broker."""
        if self.broker_kind is brokers.BrokerKind.amqp:
            # A pooled connection: the producer asks before every enqueue (backpressure).
            with self.pool.acquire(block=True, timeout=self.settings.broker.connect_timeout) as conn:
                conn.ensure_connection(max_retries=1)
                return brokers.amqp_queue_depth(conn.connection, queue)
        from pipeline.policies.backpressure import queue_depth

        return queue_depth(self.redis, queue)


def broker_url(settings: Settings) -> str:
    """The broker URL with the password put in from its secret (the setting never holds it)."""
    url = settings.broker.url
    return "filesystem://" if url is None else brokers.url_with_password(url, settings.broker.password)


def embedded_dirs(settings: Settings) -> dict[str, Path]:
    """The file-system broker's folders under ``app.data_dir`` (development without Redis)."""
    root = Path(settings.app.data_dir).expanduser().resolve()
    dirs = {"queue": root / "broker" / "queue", "processed": root / "broker" / "processed",
            "results": root / "results", "control": root / "broker" / "control"}
    for path in dirs.values():
        path.mkdir(parents=True, exist_ok=True)
    return dirs


def make_celery(settings: Settings, *, name: str = "musicgen-pipeline") -> PipelineCelery:
    """A configured Celery app; it imports no task module (the producer sends by name)."""
    if settings.broker.url is None and not (settings.features.embedded_broker
                                            and settings.app.environment.value == "development"):
        raise ValueError("broker.url is unset: the embedded broker runs in development only")
    app = PipelineCelery(name, set_as_current=False)
    app.settings = settings
    w = settings.worker
    conf: dict[str, object] = dict(
        # Only JSON crosses the broker: pickle would let a message run code in a worker.
        task_serializer="json", result_serializer="json", accept_content=["json"],
        result_accept_content=["json"],
        # A job is acknowledged when it ends, not when it starts, and a worker that dies
        # mid-job gives it back: an accepted job is never silently lost.
        task_acks_late=True, task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=w.prefetch_multiplier,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        task_soft_time_limit=w.soft_time_limit, task_time_limit=w.hard_time_limit,
        task_track_started=True, result_extended=True, result_expires=settings.broker.result_expires,
        # Flower and `celery events` see every task.
        worker_send_task_events=True, task_send_sent_event=True,
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.broker.connect_timeout,
        task_default_queue="musicgen.default",
        worker_max_tasks_per_child=w.max_tasks_per_child or None,
        worker_max_memory_per_child=(w.max_memory_per_child_mb * 1024) or None,
        worker_hijack_root_logger=False,
        # On SIGTERM (remapped to a cold shutdown by `musicgen-pipeline worker`) the running job
        # gets shutdown_grace seconds to finish; past that it is cancelled and, being unacked,
        # goes back to the queue. No new job starts meanwhile: Celery waits out the grace inside
        # the signal handler, so the loop that fetches messages is not running, then cancels the
        # task consumer before anything else (tests/integration/test_failures.py holds to this).
        # The wait ends early when the jobs do (workers/shutdown.py); an idle worker stops at once.
        worker_soft_shutdown_timeout=float(w.shutdown_grace),
        enable_utc=True,
    )
    if settings.broker.url is None:
        dirs = embedded_dirs(settings)
        conf.update(
            broker_url="filesystem://",
            broker_transport_options={"data_folder_in": str(dirs["queue"]),
                                      "data_folder_out": str(dirs["queue"]),
                                      "processed_folder": str(dirs["processed"]),
                                      "control_folder": str(dirs["control"]),
                                      "store_processed": False},
            result_backend=f"file://{dirs['results']}",
        )
    else:  # Redis, Sentinel or RabbitMQ: what differs lives in pipeline/infra/brokers.py
        conf.update(brokers.transport_conf(settings))
    app.conf.update(conf)
    return app


def celery_priority(request_priority: int, kind: brokers.BrokerKind = brokers.BrokerKind.redis) -> int:
    """Our 9 is the most urgent; on Redis Celery serves 0 first, on RabbitMQ 9."""
    return brokers.celery_priority(kind, request_priority)
