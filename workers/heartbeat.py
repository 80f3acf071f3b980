"""A worker's heartbeat, and its record of the messages it holds, in the broker's Redis.

With Redis as broker, kombu emulates acks: a delivered message waits in kombu's ``unacked`` hash
until it is acked, and goes back to its queue only once its delivery is older than
``broker.visibility_timeout`` (3,900 s by default, above the longest job's hard limit). A worker
killed with -9 would strand its jobs for an hour. So each worker's main process (the one that
receives and acks: prefork children hold no message) runs a thread that every
``recovery.heartbeat_interval`` seconds writes its beat and the delivery tags of every message it
holds (reserved, scheduled or running: Celery's ``state.requests``), and live workers give a
silent worker's messages back (workers/recovery.py).

The beat has a thread of its own, never runs between jobs: a worker deep in a long job keeps
beating, and only a process that is gone (or frozen, or cut off from Redis) falls silent. Beats
are stamped with Redis's clock (TIME inside the script), so workers whose clocks disagree still
agree on who is silent. Each process start is a new worker id: a worker restarted under the same
name must not overwrite the record of the one that died.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipeline.infra import keys

log = logging.getLogger(__name__)

__all__ = ["Heartbeat", "HeartbeatStore", "WorkerRecord", "held_requests", "new_worker_id"]

# KEYS: the workers ZSET, the worker's record. ARGV: worker id, hostname, pid, the worker's own
# clock, the held tags (JSON), the record's TTL in seconds, the engine serving each model (JSON).
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('HSET', KEYS[2], 'hostname', ARGV[2], 'pid', ARGV[3], 'beat', tostring(now),
           'beat_local', ARGV[4], 'held', ARGV[5], 'engines', ARGV[7])
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[6]))
return tostring(now)
"""

# KEYS: the workers ZSET, the worker's record. ARGV: worker id, silence in seconds that makes a
# worker dead (negative: any worker, for the operator's `workers recover`). Takes the record
# away only if the worker is still silent now, atomically: of several live workers that saw it
# silent, exactly one gets it, and a worker that beat again in the meantime keeps it.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local beat = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not beat then return false end
if tonumber(ARGV[2]) >= 0 and now - tonumber(beat) <= tonumber(ARGV[2]) then return false end
redis.call('ZREM', KEYS[1], ARGV[1])
local record = redis.call('HGETALL', KEYS[2])
redis.call('DEL', KEYS[2])
return {tostring(now), beat, record}
"""


def new_worker_id(hostname: str | None = None) -> str:
    """``hostname/pid/random``: unique per process start, readable by an operator."""
    return f"{hostname or socket.gethostname()}/{os.getpid()}/{secrets.token_hex(3)}"


@dataclass(frozen=True)
class WorkerRecord:
    """One worker process's last beat and the messages it held then."""

    worker_id: str
    hostname: str
    pid: int
    beat: float  # Redis's clock
    beat_local: float  # the worker's own clock at that beat (kombu stamps deliveries with it)
    held: dict[str, str] = field(default_factory=dict)  # delivery tag -> job id
    # model preset -> the engine serving it in this process ("static" or "hf"), once decided
    engines: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_hash(cls, worker_id: str, fields: Mapping[bytes | str, bytes | str],
                  beat: float | None = None) -> WorkerRecord:
        """The record from its Redis HASH (``beat`` from the ZSET when the hash has expired)."""
        f = {_text(k): _text(v) for k, v in fields.items()}
        return cls(worker_id, f.get("hostname", worker_id.split("/", 1)[0]),
                   int(f.get("pid") or 0), float(f.get("beat") or beat or 0.0),
                   float(f.get("beat_local") or 0.0), _json_map(f.get("held")),
                   _json_map(f.get("engines")))


def _json_map(text: str | None) -> dict[str, str]:
    """A JSON object of strings from a record's field; empty when absent or unreadable."""
    try:
        found = json.loads(text or "{}")
    except ValueError:
        return {}
    return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class HeartbeatStore:
    """The beats and records of every worker, in one Redis (the broker's)."""

    def __init__(self, client: Any, *, ttl: int) -> None:
        self.client = client
        self.ttl = max(1, int(ttl))
        self._beat = client.register_script(_BEAT)
        self._claim = client.register_script(_CLAIM)

    def beat(self, worker_id: str, *, hostname: str, held: Mapping[str, str],
             beat_local: float, pid: int | None = None,
             engines: Mapping[str, str] | None = None) -> float:
        """Record a beat of ``worker_id`` holding ``held`` (and serving each model with
        ``engines``); returns Redis's time of it."""
        now = self._beat(keys=[keys.WORKERS_KEY, keys.worker_key(worker_id)],
                         args=[worker_id, hostname, pid if pid is not None else os.getpid(),
                               repr(beat_local), json.dumps(dict(held)), self.ttl,
                               json.dumps(dict(engines or {}))])
        return float(_text(now))

    def forget(self, worker_id: str) -> None:
        """Remove the worker's beat and record (a clean stop: kombu gives its messages back)."""
        self.client.pipeline().zrem(keys.WORKERS_KEY, worker_id) \
            .delete(keys.worker_key(worker_id)).execute()

    def now(self) -> float:
        seconds, micros = self.client.time()
        return float(seconds) + float(micros) / 1e6

    def silent(self, dead_after: float) -> list[str]:
        """The ids of the workers whose last beat is more than ``dead_after`` seconds old."""
        members = self.client.zrangebyscore(keys.WORKERS_KEY, "-inf",
                                            f"({self.now() - dead_after}")
        return [_text(m) for m in members]

    def records(self) -> tuple[float, list[WorkerRecord]]:
        """Redis's time now and every worker's record, the longest silent first."""
        now = self.now()
        beats = self.client.zrange(keys.WORKERS_KEY, 0, -1, withscores=True)
        pipe = self.client.pipeline(transaction=False)
        for member, _ in beats:
            pipe.hgetall(keys.worker_key(_text(member)))
        hashes = pipe.execute() if beats else []
        return now, [WorkerRecord.from_hash(_text(m), h, float(s))
                     for (m, s), h in zip(beats, hashes, strict=True)]

    def claim(self, worker_id: str, dead_after: float) -> tuple[WorkerRecord, float] | None:
        """Take a silent worker's record away: the record and how long it had been silent.

        None when the worker beat within ``dead_after`` seconds, is unknown, or another live
        worker claimed it first. ``dead_after < 0`` takes it whatever its last beat (the
        operator's word that it is dead).
        """
        found = self._claim(keys=[keys.WORKERS_KEY, keys.worker_key(worker_id)],
                            args=[worker_id, dead_after])
        if not found:
            return None
        now, beat, flat = float(_text(found[0])), float(_text(found[1])), found[2]
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        return WorkerRecord.from_hash(worker_id, fields, beat), max(0.0, now - beat)


def held_requests() -> dict[str, str]:
    """Delivery tag -> job id of every message this process holds unacked.

    Celery's ``state.requests`` has every request from its receipt (reserved, or waiting for
    an ETA) until it is ready. A request whose message is already acked may still be listed;
    recovery finds its tag gone from kombu's ``unacked`` hash and leaves it.
    """
    from celery.worker import state

    for _ in range(5):
        try:
            requests = list(state.requests.values())
            break
        except RuntimeError:  # changed size while copied by another thread: copy again
            continue
    else:
        return {}
    held: dict[str, str] = {}
    for request in requests:
        tag = getattr(getattr(request, "message", None), "delivery_tag", None)
        if tag is not None:
            held[str(tag)] = str(request.id)
    return held


class Heartbeat:
    """The thread that beats for one worker process, and records what it holds each time.

    ``poke()`` asks for a beat now (a message just arrived), so a job received a moment before
    the process dies is in its record too; beats never come closer than ``MIN_GAP_S``.
    """

    MIN_GAP_S = 0.05

    def __init__(self, store: HeartbeatStore, worker_id: str, *, hostname: str,
                 interval: float, held: Callable[[], Mapping[str, str]] = held_requests,
                 engines: Callable[[], Mapping[str, str]] | None = None) -> None:
        self.store, self.worker_id, self.hostname = store, worker_id, hostname
        self.interval = interval
        self._held = held
        self._engines = engines
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="musicgen-heartbeat", daemon=True)
        self._failing = False

    def start(self) -> None:
        self.beat_once()  # known as alive before the first message can arrive
        self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self, *, forget: bool = True) -> None:
        """Stop beating; ``forget`` removes the record (a clean exit holds nothing)."""
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval + 5)
        if forget:
            try:
                self.store.forget(self.worker_id)
            except Exception:
                log.warning("could not remove the heartbeat of %s", self.worker_id, exc_info=True)

    def beat_once(self) -> None:
        held = self._held()
        # Read after the snapshot: every tag in it was delivered before this instant.
        self.store.beat(self.worker_id, hostname=self.hostname, held=held,
                        beat_local=time.time(), engines=self._serving())

    def _serving(self) -> Mapping[str, str]:
        if self._engines is None:
            return {}
        try:
            return self._engines()
        except Exception:  # what it reports must never stop the beat
            log.warning("could not read which engine serves each model", exc_info=True)
            return {}

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._stopped.is_set():
                return
            try:
                self.beat_once()
                if self._failing:
                    log.info("heartbeat of %s is back", self.worker_id)
                self._failing = False
            except Exception:
                # Redis away: keep trying each interval; the first failure is enough to log.
                if not self._failing:
                    log.warning("heartbeat of %s failed; retrying every %g s", self.worker_id,
                                self.interval, exc_info=True)
                self._failing = True
            self._stopped.wait(self.MIN_GAP_S)
