"""The global rate limit: each test body runs against limits' memory storage and real Redis."""

from __future__ import annotations

import logging
import multiprocessing
import time
from typing import Any

import pytest
import redis

from pipeline import keys
from pipeline.errors import ServiceUnavailable
from pipeline.policies import GlobalRateLimit
from pipeline.policies.rate_limit import redact_uri

SECRET = "hunter2-do-not-log"


def limiter(rate: str, uri: str, key_prefix: str) -> GlobalRateLimit:
    # limits appends ":" to its key_prefix; the conftest cleans up `key_prefix*`
    return GlobalRateLimit(rate, storage_uri=uri, key_prefix=key_prefix.rstrip(":"))


def test_count_starts_anew_as_the_window_moves(rate_storage_uri: str, key_prefix: str) -> None:
    rl = limiter("3 per 1 second", rate_storage_uri, key_prefix)
    assert rl.try_acquire("musicgen-small") == 0.0
    time.sleep(0.6)
    assert [rl.try_acquire("musicgen-small") for _ in range(2)] == [0.0, 0.0]
    wait = rl.try_acquire("musicgen-small")
    assert 0.0 < wait < 0.5  # the seconds until the oldest hit leaves the window
    time.sleep(wait + 0.01)
    assert rl.try_acquire("musicgen-small") == 0.0  # the oldest hit's slot is free again
    assert 0.3 < rl.try_acquire("musicgen-small") < 1.0  # the other two are still inside


def test_keys_are_limited_separately(rate_storage_uri: str, key_prefix: str) -> None:
    rl = limiter("1/minute", rate_storage_uri, key_prefix)
    assert rl.try_acquire("musicgen-small") == 0.0
    assert 59.0 < rl.try_acquire("musicgen-small") <= 60.0
    assert rl.try_acquire("musicgen-large") == 0.0


def test_acquire_waits_instead_of_failing(rate_storage_uri: str, key_prefix: str) -> None:
    rl = limiter("2 per 1 second", rate_storage_uri, key_prefix)
    rl.try_acquire("q")
    rl.try_acquire("q")
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        time.sleep(seconds)

    start = time.monotonic()
    rl.acquire("q", timeout=5, sleep=sleep)
    assert 0.5 < time.monotonic() - start < 2.0
    assert slept and all(0 < s <= 1.0 for s in slept)
    assert len(slept) <= 3  # it sleeps until the slot frees rather than polling


def test_acquire_times_out(rate_storage_uri: str, key_prefix: str) -> None:
    rl = limiter("1 per 10 seconds", rate_storage_uri, key_prefix)
    rl.try_acquire("q")
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="still full after 0.3 s"):
        rl.acquire("q", timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 1.5


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
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    wins = sorted(w for won, _ in outcomes for w in won)
    assert all(attempts > N for _, attempts in outcomes)  # both really contended
    # 1.5 windows: N at the start, then N more once the first ones leave the window.
    assert len(wins) == 2 * N
    # Any N+1 hits span at least one window (bounds: hit time lies in [before, after]).
    for i in range(len(wins) - N):
        group = wins[i:i + N + 1]
        assert max(a for _, a in group) - min(b for b, _ in group) >= WINDOW
    assert list(redis_client.scan_iter(match=f"{key_prefix}*")) == [
        f"{key_prefix}LIMITER/musicgen-small/{N}/{int(WINDOW)}/second".encode()]


def test_default_prefix_is_the_projects() -> None:
    assert GlobalRateLimit("1/second", storage_uri="memory://").key_prefix == \
        keys.RATE_LIMIT_PREFIX
