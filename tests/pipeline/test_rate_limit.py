"""The global rate limit: each test body runs against limits' memory storage and real Redis."""

from __future__ import annotations

import logging
import multiprocessing
import queue
import time
from typing import Any

import limits.storage.memory
import limits.storage.redis
import pytest
import redis

import pipeline.policies.rate_limit
from pipeline.errors import ServiceUnavailable
from pipeline.infra import keys
from pipeline.policies import GlobalRateLimit
from pipeline.policies.rate_limit import redact_uri

SECRET = "hunter2-do-not-log"


def limiter(rate: str, uri: str, key_prefix: str) -> GlobalRateLimit:
    # limits appends ":" to its key_prefix; the conftest cleans up `key_prefix*`
    return GlobalRateLimit(rate, storage_uri=uri, key_prefix=key_prefix.rstrip(":"))


class FakeTime:
    """Stands in for the ``time`` module where the rate limit and ``limits``' storages read the
    clock (``limits`` takes no clock): it moves only when a test sleeps or advances it, so a
    loaded host cannot push a hit out of its window between two lines of a test."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    advance = sleep


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    """The fake clock in place. Windows in its tests are a minute: Redis expires a key after
    its window in real time, which must not run out while a test runs."""
    fake = FakeTime()
    for module in (pipeline.policies.rate_limit, limits.storage.memory, limits.storage.redis):
        monkeypatch.setattr(module, "time", fake)
    return fake


def test_count_starts_anew_as_the_window_moves(rate_storage_uri: str, key_prefix: str,
                                               fake_time: FakeTime) -> None:
    rl = limiter("3 per 1 minute", rate_storage_uri, key_prefix)
    assert rl.try_acquire("musicgen-small") == 0.0
    fake_time.advance(36)
    assert [rl.try_acquire("musicgen-small") for _ in range(2)] == [0.0, 0.0]
    wait = rl.try_acquire("musicgen-small")
    assert wait == pytest.approx(24.0)  # the seconds until the oldest hit leaves the window
    fake_time.advance(wait + 0.01)
    assert rl.try_acquire("musicgen-small") == 0.0  # the oldest hit's slot is free again
    # the other two, hit at 36 s, are still inside until 96 s
    assert rl.try_acquire("musicgen-small") == pytest.approx(96.0 - 60.01)


def test_keys_are_limited_separately(rate_storage_uri: str, key_prefix: str,
                                     fake_time: FakeTime) -> None:
    rl = limiter("1/minute", rate_storage_uri, key_prefix)
    assert rl.try_acquire("musicgen-small") == 0.0
    fake_time.advance(1)
    assert rl.try_acquire("musicgen-small") == pytest.approx(59.0)
    assert rl.try_acquire("musicgen-large") == 0.0


def test_acquire_waits_instead_of_failing(rate_storage_uri: str, key_prefix: str,
                                          fake_time: FakeTime) -> None:
    rl = limiter("2 per 1 minute", rate_storage_uri, key_prefix)
    rl.try_acquire("q")
    rl.try_acquire("q")
    fake_time.advance(20)
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        fake_time.sleep(seconds)

    rl.acquire("q", timeout=300, sleep=sleep)
    # It sleeps until the slot frees rather than polling: 40 s, then at most the instant a
    # hit exactly one window old still counts.
    assert slept[0] == pytest.approx(40.0) and len(slept) <= 2
    assert sum(slept) == pytest.approx(40.0, abs=0.01)


def test_acquire_times_out(rate_storage_uri: str, key_prefix: str, fake_time: FakeTime) -> None:
    rl = limiter("1 per 1 minute", rate_storage_uri, key_prefix)
    rl.try_acquire("q")
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        fake_time.sleep(seconds)

    with pytest.raises(TimeoutError, match="still full after 5.0 s"):
        rl.acquire("q", timeout=5.0, sleep=sleep)
    assert slept == [5.0]  # it waited out its timeout once, not the whole minute


# --- no password in reprs, logs or errors ---------------------------------------------------

def test_redact_uri() -> None:
    assert redact_uri(f"redis://:{SECRET}@h:6379/2") == "redis://:***@h:6379/2"
    assert redact_uri(f"rediss://user:{SECRET}@h/0") == "rediss://user:***@h/0"
    assert redact_uri("redis://h:6379/0") == "redis://h:6379/0"
    assert redact_uri("memory://") == "memory://"


def test_password_stays_out_of_repr_and_logs(redis_url: str, key_prefix: str,
                                             redis_client: redis.Redis,
                                             caplog: pytest.LogCaptureFixture) -> None:
    # Redis here has no password; its nopass default user accepts any, so the URI is real.
    uri = redis_url.replace("redis://", f"redis://default:{SECRET}@")
    rl = limiter("1 per 1 second", uri, key_prefix)
    assert SECRET not in repr(rl) and "default:***@" in repr(rl)
    caplog.set_level(logging.DEBUG)
    rl.acquire("q", timeout=5)
    rl.acquire("q", timeout=5)  # waits, and logs that it waits
    assert any("full" in r.getMessage() for r in caplog.records)
    assert all(SECRET not in r.getMessage() for r in caplog.records)


def test_password_stays_out_of_errors(key_prefix: str) -> None:
    rl = limiter("1/second", f"redis://:{SECRET}@127.0.0.1:1/0", key_prefix)  # nothing listens
    with pytest.raises(ServiceUnavailable) as caught:
        rl.try_acquire("q")
    assert "127.0.0.1:1" in caught.value.message and SECRET not in str(caught.value)
    with pytest.raises(ValueError) as bad:
        GlobalRateLimit("1/second", storage_uri=f"redsi://:{SECRET}@h/0", key_prefix="x")
    assert SECRET not in str(bad.value) and bad.value.__cause__ is None
    assert bad.value.__suppress_context__


# --- two OS processes, one limit ------------------------------------------------------------

N, WINDOW, HAMMER = 10, 2.0, 3.0


def _hammer(uri: str, prefix: str, start_at: Any, results: Any) -> None:
    rl = GlobalRateLimit(f"{N} per {int(WINDOW)} seconds", storage_uri=uri, key_prefix=prefix)
    start_at.wait(timeout=60)
    wins, attempts, end = [], 0, time.time() + HAMMER
    while time.time() < end:
        before = time.time()
        wait = rl.try_acquire("musicgen-small")
        attempts += 1
        if wait == 0.0:
            wins.append((before, time.time()))
        else:
            time.sleep(min(wait, 0.002))
    results.put((wins, attempts))


def test_two_processes_share_one_limit(redis_url: str, key_prefix: str,
                                       redis_client: redis.Redis) -> None:
    ctx = multiprocessing.get_context("spawn")
    start_at, results = ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=_hammer,
                         args=(redis_url, key_prefix.rstrip(":"), start_at, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    start_at.wait(timeout=60)
    # The keys are read while the processes hammer: Redis expires the limit's key one window
    # after its last hit, which on a loaded host may come before both processes have exited.
    written: set[bytes] = set()
    outcomes: list[Any] = []
    deadline = time.monotonic() + 60
    while len(outcomes) < len(procs):
        assert time.monotonic() < deadline, "the hammering processes never reported"
        written.update(redis_client.scan_iter(match=f"{key_prefix}*"))
        try:
            outcomes.append(results.get(timeout=0.05))
        except queue.Empty:
            pass
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    wins = sorted(w for won, _ in outcomes for w in won)
    assert all(attempts > N for _, attempts in outcomes)  # both really contended
    # 1.5 windows: N at the start, then more once the first ones leave the window (all N when
    # the first N came within the first half window; a loaded host may spread them out).
    assert N < len(wins) <= 2 * N
    # Any N+1 hits span at least one window (bounds: hit time lies in [before, after]).
    for i in range(len(wins) - N):
        group = wins[i:i + N + 1]
        assert max(a for _, a in group) - min(b for b, _ in group) >= WINDOW
    assert written == {f"{key_prefix}LIMITER/musicgen-small/{N}/{int(WINDOW)}/second".encode()}


def test_default_prefix_is_the_projects() -> None:
    assert GlobalRateLimit("1/second", storage_uri="memory://").key_prefix == \
        keys.RATE_LIMIT_PREFIX
