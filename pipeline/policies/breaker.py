"""A circuit breaker per model preset, shared by every producer and worker through Redis.

CLOSED -> OPEN after ``threshold`` consecutive failures -> HALF_OPEN once ``reset_timeout`` s
have passed -> CLOSED on a success, OPEN again on a failure.

* Producer: :meth:`CircuitBreaker.check` (one round trip) refuses only while OPEN. In HALF_OPEN
  it *accepts*, or no job would ever exist to be the probe.
* Worker: :meth:`~CircuitBreaker.try_acquire` before a job. In HALF_OPEN exactly one caller
  across all machines wins the probe claim; the others leave their job queued (the caller
  requeues/delays it). The claim expires after ``probe_timeout``, so a dead probe worker cannot
  wedge the breaker. Then :meth:`~CircuitBreaker.record_success` / ``record_failure`` for
  model/GPU failures only: bad input says nothing about the model's health. A probe job that
  ends with neither (bad input, a cancel, a deferral) must :meth:`~CircuitBreaker.release_probe`,
  or the model takes no job until the claim expires. :meth:`~CircuitBreaker.admit` says which
  kind of pass a worker got, so it can release exactly its own claim.

The state is derived, not stored: the shared record is ``failures``, ``opened_at`` and
``probe_until``, and OPEN vs HALF_OPEN is ``now < opened_at + reset_timeout``, so no process has
to "move" the breaker to HALF_OPEN and none can race another doing it.

Why not pybreaker (1.4.1, from its source): ``CircuitRedisStorage`` keeps state and counters in
separate keys written by separate commands (INCR, GET the counter, SET the state), so counting
and the OPEN->HALF_OPEN switch race across processes; a process that merely *notices* a remote
switch to CLOSED resets the shared counter; HALF_OPEN lets every call through (no single, let
alone expiring, probe claim); ``opened_at`` is whole seconds of ``datetime.now`` (no injectable
clock); and it wraps a call (``breaker.call(fn)``) while here check and outcome happen in
different processes. So the transitions here are pure functions, run under a lock in memory and
under WATCH/MULTI in Redis: both backends share one implementation of the rules.

Timestamps come from the caller's clock: hosts must be NTP-synced (millisecond skew is nothing
against a reset timeout of seconds), and all processes built from the same Settings.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime
from enum import Enum
from typing import Any, TypeVar, cast

import redis

from pipeline.errors import ServiceUnavailable
from pipeline.infra import keys

log = logging.getLogger(__name__)
T = TypeVar("T")
_FIELDS = ("failures", "opened_at", "probe_until")  # of BreakerSnapshot, stored in one HASH


class BreakerState(str, Enum):
    """The three states of a circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclasses.dataclass(frozen=True)
class BreakerSnapshot:
    """The shared record of one breaker; the default value is a closed breaker."""

    failures: int = 0
    opened_at: float | None = None
    probe_until: float | None = None

    def state(self, now: float, reset_timeout: float) -> BreakerState:
        """The state this record means at time ``now``."""
        if self.opened_at is None:
            return BreakerState.CLOSED
        if now < self.opened_at + reset_timeout:
            return BreakerState.OPEN
        return BreakerState.HALF_OPEN

    def retry_after(self, now: float, reset_timeout: float) -> float:
        """Seconds until HALF_OPEN (when jobs are accepted again); 0.0 unless OPEN."""
        if self.opened_at is None or now >= self.opened_at + reset_timeout:
            return 0.0
        return max(round(self.opened_at + reset_timeout - now, 3), 0.001)


# The rules: pure transitions, shared by every backend.
def _after_failure(s: BreakerSnapshot, now: float, threshold: int,
                   reset_timeout: float) -> BreakerSnapshot:
    failures = s.failures + 1
    state = s.state(now, reset_timeout)
    if state is BreakerState.OPEN:
        # A job that started before the trip and failed late: count it, but do not push the
        # reset further away, or a burst of stragglers would keep the breaker open forever.
        return dataclasses.replace(s, failures=failures)
    if state is BreakerState.HALF_OPEN:
        return BreakerSnapshot(failures, opened_at=now)  # the probe failed: open again
    return BreakerSnapshot(failures, opened_at=now if failures >= threshold else None)


def _after_success(s: BreakerSnapshot, now: float, reset_timeout: float) -> BreakerSnapshot:
    if s.state(now, reset_timeout) is BreakerState.OPEN:
        return s  # a job that started before the trip is not a probe; wait for the timeout
    return BreakerSnapshot()


def _claim(s: BreakerSnapshot, now: float, reset_timeout: float,
           probe_timeout: float) -> tuple[BreakerSnapshot, bool]:
    state = s.state(now, reset_timeout)
    if state is not BreakerState.HALF_OPEN:
        return s, state is BreakerState.CLOSED
    if s.probe_until is not None and now < s.probe_until:
        return s, False  # a live probe is running
    return dataclasses.replace(s, probe_until=now + probe_timeout), True


def _release(s: BreakerSnapshot, probe_until: float) -> tuple[BreakerSnapshot, bool]:
    # Only the claim this caller won: after an expiry another worker may hold a newer one.
    if s.probe_until != probe_until:
        return s, False
    return dataclasses.replace(s, probe_until=None), True


@dataclasses.dataclass(frozen=True)
class Admission:
    """A worker's pass to run a job: ``probe_until`` is set when it is the half-open probe (the
    claim's expiry, which identifies it), None when the breaker was simply closed."""

    probe_until: float | None = None

    @property
    def is_probe(self) -> bool:
        """True when this job is the half-open probe and must settle it."""
        return self.probe_until is not None


class BreakerBackend(ABC):
    """Where breaker records live. ``update`` must be atomic across every user of the backend."""

    @abstractmethod
    def load(self, name: str) -> BreakerSnapshot:
        """Read the record of breaker ``name`` (the default record if there is none)."""

    @abstractmethod
    def update(self, name: str,
               change: Callable[[BreakerSnapshot], tuple[BreakerSnapshot, T]]) -> T:
        """Atomically replace the record with ``change(record)[0]``; return ``[1]``.

        ``change`` must be pure: a backend may call it again after losing a race.
        """


class MemoryBreakerBackend(BreakerBackend):
    """Records in a dict, for one process only: tests, a solo development worker."""

    def __init__(self) -> None:
        self._records: dict[str, BreakerSnapshot] = {}
        self._lock = threading.Lock()

    def load(self, name: str) -> BreakerSnapshot:
        with self._lock:
            return self._records.get(name, BreakerSnapshot())

    def update(self, name: str,
               change: Callable[[BreakerSnapshot], tuple[BreakerSnapshot, T]]) -> T:
        with self._lock:
            new, result = change(self._records.get(name, BreakerSnapshot()))
            self._records[name] = new
            return result


class RedisBreakerBackend(BreakerBackend):
    """Records as one Redis HASH per breaker (see :mod:`pipeline.infra.keys`), shared by all hosts.

    ``load`` is one HMGET; ``update`` is WATCH + HMGET + MULTI/EXEC, retried if another process
    wrote the key in between (so concurrent probe claims serialise and exactly one wins).
    """

    def __init__(self, redis_client: redis.Redis, prefix: str = keys.BREAKER_PREFIX) -> None:
        self._redis = redis_client
        self._prefix = prefix

    def load(self, name: str) -> BreakerSnapshot:
        try:
            return _decode(self._redis.hmget(keys.breaker_key(name, self._prefix), _FIELDS))
        except redis.RedisError as e:
            raise _unreachable(name) from e

    def update(self, name: str,
               change: Callable[[BreakerSnapshot], tuple[BreakerSnapshot, T]]) -> T:
        key = keys.breaker_key(name, self._prefix)

        def transaction(pipe: Any) -> T:
            current = _decode(pipe.hmget(key, _FIELDS))  # immediate mode while WATCHing
            new, result = change(current)
            pipe.multi()
            if new != current:
                pipe.delete(key)  # a closed breaker with no failures leaves no key behind
                if new != BreakerSnapshot():
                    pipe.hset(key, mapping={f: repr(v) for f, v in
                                            dataclasses.asdict(new).items() if v is not None})
            return result

        try:
            # redis-py types the callback as returning None; value_from_callable returns ours.
            return cast(T, self._redis.transaction(
                transaction, key, value_from_callable=True))  # type: ignore[arg-type]
        except redis.RedisError as e:
            raise _unreachable(name) from e


def _unreachable(name: str) -> ServiceUnavailable:
    return ServiceUnavailable(f"cannot reach Redis for the circuit breaker of model {name!r}",
                              details={"breaker": name})


def _decode(values: list[Any]) -> BreakerSnapshot:
    failures, opened_at, probe_until = (None if v is None else float(v) for v in values)
    return BreakerSnapshot(int(failures or 0), opened_at, probe_until)


class CircuitBreaker:
    """The circuit breaker of one model preset (``name``); cheap to build, holds no state."""

    def __init__(self, name: str, *, threshold: int, reset_timeout: float,
                 backend: BreakerBackend, probe_timeout: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``probe_timeout`` (default ``reset_timeout``) bounds a probe's claim: make it at least
        the job time limit, or a slow probe gets a second one beside it."""
        if threshold < 1 or reset_timeout <= 0:
            raise ValueError(f"need threshold >= 1 and reset_timeout > 0, got threshold="
                             f"{threshold}, reset_timeout={reset_timeout}")
        self.name = name
        self.threshold = threshold
        self.reset_timeout = reset_timeout
        self.probe_timeout = reset_timeout if probe_timeout is None else probe_timeout
        self._backend = backend
        self._clock = clock

    def state(self) -> BreakerState:
        """The current state, as every process sees it."""
        return self._backend.load(self.name).state(self._clock(), self.reset_timeout)

    def check(self) -> None:
        """Producer side: raise :class:`ServiceUnavailable` while OPEN (one round trip).

        ``details`` is ``{breaker, state, retry_after, failures}``; ``retry_after`` is the
        seconds until HALF_OPEN, when a job is accepted again (and may become the probe).
        """
        now = self._clock()
        snap = self._backend.load(self.name)
        retry_after = snap.retry_after(now, self.reset_timeout)
        if not retry_after:
            return
        raise ServiceUnavailable(
            f"model {self.name!r} is failing ({snap.failures} consecutive failures), so its "
            f"circuit breaker is open; retry in {retry_after:.1f} s "
            f"(after {_iso(now + retry_after)})",
            details={"breaker": self.name, "state": BreakerState.OPEN.value,
                     "retry_after": retry_after, "failures": snap.failures})

    def try_acquire(self) -> bool:
        """Worker side, before a job: True when CLOSED, or HALF_OPEN and this caller won the
        (expiring) probe claim; False when OPEN or a probe is running: leave the job queued.
        """
        return self.admit() is not None

    def admit(self) -> Admission | None:
        """:meth:`try_acquire` that says what was granted: None (leave the job queued), a plain
        pass while CLOSED, or the probe claim (settle it: record an outcome or release it)."""
        now = self._clock()
        # Read first: the common answers (closed / open) need no transaction.
        state = self._backend.load(self.name).state(now, self.reset_timeout)
        if state is not BreakerState.HALF_OPEN:
            return Admission() if state is BreakerState.CLOSED else None

        def claim(s: BreakerSnapshot) -> tuple[BreakerSnapshot, Admission | None]:
            new, won = _claim(s, now, self.reset_timeout, self.probe_timeout)
            if not won:
                return new, None
            return new, Admission(new.probe_until)  # None when it turned out CLOSED meanwhile

        admission = self._backend.update(self.name, claim)
        if admission is not None and admission.is_probe:
            log.info("circuit breaker %s half-open: this worker runs the probe job", self.name)
        return admission

    def release_probe(self, admission: Admission) -> bool:
        """Worker side, after a probe job that says nothing about the model (bad input, a
        cancel, a deferral): give the claim back at once, so the next job can be the probe
        instead of every worker waiting ``probe_timeout``. Only this admission's own claim is
        released; a plain (closed) admission releases nothing. True when a claim was released.
        """
        if admission.probe_until is None:
            return False
        until = admission.probe_until
        released = self._backend.update(self.name, lambda s: _release(s, until))
        if released:
            log.info("circuit breaker %s: the probe job ended without a verdict; probe released",
                     self.name)
        return released

    def record_success(self) -> None:
        """Worker side, after a job that succeeded: zero the count; a probe closes it."""
        now = self._clock()
        if self._backend.load(self.name) == BreakerSnapshot():
            return  # closed with no failures: the hot path writes nothing
        rt = self.reset_timeout
        before = self._backend.update(
            self.name, lambda s: (_after_success(s, now, rt), s.state(now, rt)))
        if before is BreakerState.HALF_OPEN:
            log.info("circuit breaker %s closed: the probe job succeeded", self.name)

    def record_failure(self) -> None:
        """Worker side, after a model/GPU failure (not bad input: the caller decides)."""
        now = self._clock()

        def change(s: BreakerSnapshot) -> tuple[BreakerSnapshot, tuple[bool, int]]:
            new = _after_failure(s, now, self.threshold, self.reset_timeout)
            return new, (new.opened_at != s.opened_at, new.failures)

        opened, failures = self._backend.update(self.name, change)
        if opened:
            log.warning("circuit breaker %s opened after %d consecutive failures; "
                        "retry in %.1f s", self.name, failures, self.reset_timeout)

    def status(self) -> dict[str, Any]:
        """A JSON-ready report for ``musicgen-pipeline breaker status``."""
        now = self._clock()
        snap = self._backend.load(self.name)
        state = snap.state(now, self.reset_timeout)
        probing = snap.probe_until is not None and now < snap.probe_until
        return {"breaker": self.name, "state": state.value, "failures": snap.failures,
                "opened_at": None if snap.opened_at is None else _iso(snap.opened_at),
                "retry_after": snap.retry_after(now, self.reset_timeout),
                "threshold": self.threshold, "reset_timeout": self.reset_timeout,
                "probe_timeout": self.probe_timeout,
                "probe_running": state is BreakerState.HALF_OPEN and probing}

    def reset(self) -> None:
        """Operator: back to CLOSED with zero failures, whatever the state."""
        self._backend.update(self.name, lambda s: (BreakerSnapshot(), None))
        log.warning("circuit breaker %s reset to closed by an operator", self.name)


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
