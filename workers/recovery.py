"""Give a dead worker's jobs back to the queue within seconds, not after the visibility timeout.

Every live worker looks every ``recovery.scan_interval`` seconds for workers whose beats
(workers/heartbeat.py) stopped ``heartbeat_interval x missed_beats`` seconds ago. One of them
claims the silent worker's record (atomically, so exactly one acts on it) and, for each delivery
tag in it that is still in kombu's ``unacked`` hash, moves the message back onto its queue and
out of ``unacked``/``unacked_index`` in one WATCH/MULTI transaction, as kombu's own
``QoS.restore_by_tag`` does: two restorers of one tag restore it once, and the broker's
visibility restore later finds nothing left to redeliver.

A tag whose delivery is newer than the dead worker's last beat was redelivered since (the broker
gave it back after the visibility timeout and another worker holds it now: kombu keeps a
message's tag across redeliveries), so it is left alone. If the "dead" worker was only cut off
and later finishes its copy, the job's own once-only guards settle it: the ledger keeps the
first final outcome and charges once, a worker drops a delivery of a finished job, and outputs
are replaced atomically (workers/tasks.py).

Only for Redis brokers: RabbitMQ requeues a lost consumer's messages itself.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.config.schema import Settings
from pipeline.infra.brokers import BrokerKind, kind_of
from workers.heartbeat import Heartbeat, HeartbeatStore, WorkerRecord, new_worker_id
from workers.metrics import observe_recovered

log = logging.getLogger(__name__)

__all__ = ["Recovered", "Recovery", "dead_after", "enabled_for", "recover_dead_workers",
           "recover_worker", "restore_tag", "store_for"]

# Clocks of two worker nodes (the dead one stamped its beat, another stamps a redelivery) may
# disagree by this much without a redelivered tag being taken for the dead worker's own.
CLOCK_SLACK_S = 1.0


def enabled_for(settings: Settings) -> bool:
    """Recovery runs on Redis brokers (plain or Sentinel) when ``recovery.enabled``."""
    if not settings.recovery.enabled:
        return False
    return kind_of(settings.broker.url) in (BrokerKind.redis, BrokerKind.sentinel)


def dead_after(settings: Settings) -> float:
    """Seconds without a beat after which a worker counts as dead."""
    r = settings.recovery
    return r.heartbeat_interval * r.missed_beats


def store_for(app: Any) -> HeartbeatStore:
    """The heartbeat store on the broker's Redis; a record outlives no visibility timeout."""
    return HeartbeatStore(app.redis, ttl=app.settings.broker.visibility_timeout)


@dataclass
class Recovered:
    """What the recovery of one dead worker did."""

    worker_id: str
    hostname: str
    silent_for: float  # seconds since its last beat
    restored: dict[str, str] = field(default_factory=dict)  # delivery tag -> job id
    gone: dict[str, str] = field(default_factory=dict)  # acked already, or redelivered since


def restore_tag(channel: Any, tag: str, *, delivered_before: float | None = None) -> bool:
    """Put message ``tag`` back on its queue if it is still unacked; True if this call did.

    ``channel`` is a kombu Redis channel (its client, key names and message re-publishing:
    exchange lookup, priority list, the ``redelivered`` flag). A tag delivered after
    ``delivered_before`` (epoch seconds, kombu's stamp) is left where it is.
    """
    client = channel.client
    unacked, index = channel.unacked_key, channel.unacked_index_key
    done = [False]

    def restore(pipe: Any) -> None:
        done[0] = False  # a WatchError retry starts over
        raw = pipe.hget(unacked, tag)
        stamp = pipe.zscore(index, tag)
        if raw is None:
            return
        if delivered_before is not None and stamp is not None \
                and float(stamp) > delivered_before + CLOCK_SLACK_S:
            return
        payload, exchange, routing_key = json.loads(raw)
        pipe.multi()
        pipe.zrem(index, tag)
        pipe.hdel(unacked, tag)
        # kombu's own re-publish (what restore_by_tag and the visibility restore call): the
        # queue from the exchange's bindings, the list of the message's priority, RPUSH so it
        # is the next one served.
        channel._do_restore_message(payload, exchange, routing_key, pipe)
        done[0] = True

    # WATCH unacked: an ack or another restore of any tag in between makes the transaction
    # start again, so a tag is never pushed twice.
    client.transaction(restore, unacked)
    return done[0]


def recover_worker(app: Any, store: HeartbeatStore, worker_id: str,
                   silence: float) -> Recovered | None:
    """Claim worker ``worker_id`` if it has been silent more than ``silence`` seconds (any
    ``silence < 0``: whatever its last beat) and put its unacked messages back on their queues.
    None when it is not silent that long, unknown, or another worker got it first."""
    claimed = store.claim(worker_id, silence)
    if claimed is None:
        return None
    record, silent_for = claimed
    done = Recovered(worker_id, record.hostname, silent_for)
    if record.held:
        _restore_held(app, record, done)
    if done.restored:
        log.warning("worker %s (%s, pid %s) silent for %.1f s: re-published its %d job(s) %s",
                    worker_id, record.hostname, record.pid, silent_for, len(done.restored),
                    ", ".join(sorted(done.restored.values())))
        observe_recovered(len(done.restored))
    else:
        log.info("worker %s (%s) silent for %.1f s held no unacked job", worker_id,
                 record.hostname, silent_for)
    return done


def _restore_held(app: Any, record: WorkerRecord, done: Recovered) -> None:
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        for tag, job_id in record.held.items():
            if restore_tag(channel, tag, delivered_before=record.beat_local or None):
                done.restored[tag] = job_id
            else:
                done.gone[tag] = job_id


def recover_dead_workers(app: Any, store: HeartbeatStore, *,
                         exclude: str | None = None) -> list[Recovered]:
    """Recover every worker silent for longer than the settings allow (but ``exclude``)."""
    silence = dead_after(app.settings)
    found = []
    for worker_id in store.silent(silence):
        if worker_id == exclude:
            continue  # our own beat is late (Redis was away): we are not dead
        try:
            done = recover_worker(app, store, worker_id, silence)
        except Exception:
            # The claim took the record: its jobs now wait for the visibility timeout.
            log.exception("recovering the jobs of worker %s failed", worker_id)
            continue
        if done is not None:
            found.append(done)
    return found


class Recovery:
    """One worker process's heartbeat and its periodic look for dead workers (two threads)."""

    def __init__(self, app: Any, hostname: str | None = None,
                 held: Mapping[str, str] | None = None,
                 engines: Callable[[], Mapping[str, str]] | None = None) -> None:
        r = app.settings.recovery
        self.app = app
        self.store = store_for(app)
        self.worker_id = new_worker_id(hostname)
        kwargs: dict[str, Any] = {} if held is None else {"held": lambda: held}
        self.heartbeat = Heartbeat(self.store, self.worker_id, hostname=hostname or self.worker_id,
                                   interval=r.heartbeat_interval, engines=engines, **kwargs)
        self.scan_interval = r.scan_interval
        self._stopped = threading.Event()
        self._scanner = threading.Thread(target=self._scan, name="musicgen-recovery", daemon=True)

    def start(self) -> None:
        self.heartbeat.start()
        self._scanner.start()
        log.info("heartbeat of worker %s every %g s; dead after %g s of silence",
                 self.worker_id, self.heartbeat.interval, dead_after(self.app.settings))

    def stop(self) -> None:
        self._stopped.set()
        self.heartbeat.stop()

    def _scan(self) -> None:
        # A look at start too: a worker restarted after its node died finds its predecessor.
        while not self._stopped.is_set():
            try:
                recover_dead_workers(self.app, self.store, exclude=self.worker_id)
            except Exception:  # Redis away: the next scan tries again
                log.warning("looking for dead workers failed", exc_info=True)
            self._stopped.wait(self.scan_interval)
