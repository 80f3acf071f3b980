"""Daily roll-ups of real ledger rows, on real SQLite files and a real PostgreSQL database."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime
from typing import TYPE_CHECKING, Any

import pytest

from pipeline.quota import QuotaStore, daily_usage, roll_up

if TYPE_CHECKING:  # only the types: the module itself is loaded as a plugin, below
    from tests.pipeline.quota_conftest import FakeClock, StoreFactory

# The quota fixtures (quota_db_url, make_quota_store, quota_clock): both backends for every test.
pytest_plugins = ["tests.pipeline.quota_conftest"]

NOV_20, NOV_21, NOV_22 = date(2026, 11, 20), date(2026, 11, 21), date(2026, 11, 22)


@pytest.fixture
def store(make_quota_store: StoreFactory, quota_db_url: str) -> QuotaStore:
    """An unlimited store on an empty database (quota_db_url empties ledger and roll-ups)."""
    return make_quota_store(default_tier="enterprise")


def job(store: QuotaStore, clock: FakeClock, at: str, job_id: str, *, user: str = "alice",
        model: str = "small", requested: float = 10.0, status: str | None = None,
        produced: float | None = None, gpu: float | None = None, ended: str | None = None) -> None:
    """Reserve a job at ``at``; with ``status``, start it and end it (at ``ended`` if given)."""
    clock.set(at)
    store.reserve(job_id=job_id, user_id=user, model=model, requested_seconds=requested)
    if status is None:
        return
    store.mark_started(job_id, worker="gpu-0", queue_wait_seconds=0.5)
    if ended is not None:
        clock.set(ended)
    assert store.mark_finished(job_id, status=status, produced_seconds=produced, gpu_seconds=gpu,
                               error_code=None if status == "succeeded" else "some_error")


def usage(day: date, user: str, model: str, *, jobs: int, succeeded: int = 0, failed: int = 0,
          cancelled: int = 0, requested: float = 0.0, produced: float = 0.0,
          gpu: float = 0.0) -> dict[str, Any]:
    return {"day": day, "user_id": user, "model": model, "jobs": jobs, "succeeded": succeeded,
            "failed": failed, "cancelled": cancelled, "requested_seconds": requested,
            "produced_seconds": produced, "gpu_seconds": gpu}


def rolled(store: QuotaStore, since: date, until: date | None = None) -> list[dict[str, Any]]:
    """The roll-ups of ``since``..``until`` without ``updated_at`` (checked on its own)."""
    rows = daily_usage(store.engine, since=since, until=until or since)
    for row in rows:
        assert isinstance(row["updated_at"], datetime) and row["updated_at"].tzinfo is not None
    return [{k: v for k, v in row.items() if k != "updated_at"} for row in rows]


def two_users_two_models(store: QuotaStore, clock: FakeClock) -> None:
    """A day (2026-11-21, UTC) of alice's and bob's jobs, and one just outside each end."""
    # Seconds are multiples of 1/4, so their sums are exact on every backend.
    day = "2026-11-21T{}+00:00"
    job(store, clock, day.format("09:00"), "a1", requested=10, status="succeeded", produced=10,
        gpu=4)
    job(store, clock, day.format("10:00"), "a2", requested=20, status="succeeded", produced=19.5,
        gpu=7.5)
    job(store, clock, day.format("11:00"), "a3", requested=15, status="failed")
    job(store, clock, day.format("12:00"), "a4", requested=15, status="timeout")
    job(store, clock, day.format("13:00"), "a5", requested=15, status="cancelled")
    job(store, clock, day.format("14:00"), "a6", requested=12)  # still queued: a job, no outcome
    # Created before midnight, done after it: it counts on the day it was created, as quotas do.
    job(store, clock, day.format("23:50"), "a7", model="medium", requested=30, status="succeeded",
        produced=30, gpu=20.25, ended="2026-11-22T00:20:00+00:00")
    job(store, clock, day.format("08:00"), "b1", user="bob", requested=5, status="failed")
    job(store, clock, day.format("08:30"), "b2", user="bob", requested=5, status="succeeded",
        produced=5, gpu=1.25)
    job(store, clock, day.format("09:30"), "b3", user="bob", requested=8)
    store.mark_started("b3", worker="gpu-1")  # running: a job, no outcome yet
    job(store, clock, "2026-11-20T23:59:59.999999+00:00", "a0", requested=9, status="succeeded",
        produced=9, gpu=3)
    job(store, clock, "2026-11-22T00:00:00+00:00", "b4", user="bob", requested=6,
        status="succeeded", produced=6, gpu=2)


EXPECTED_NOV_21 = [
    usage(NOV_21, "alice", "medium", jobs=1, succeeded=1, requested=30, produced=30, gpu=20.25),
    usage(NOV_21, "alice", "small", jobs=6, succeeded=2, failed=2, cancelled=1, requested=30,
          produced=29.5, gpu=11.5),
    usage(NOV_21, "bob", "small", jobs=3, succeeded=1, failed=1, requested=5, produced=5,
          gpu=1.25),
]


def test_roll_up_counts_and_sums_each_user_and_model_on_its_day(
        store: QuotaStore, quota_clock: FakeClock) -> None:
    two_users_two_models(store, quota_clock)

    assert roll_up(store.engine, day=NOV_21) == 3
    assert rolled(store, NOV_21) == EXPECTED_NOV_21
    # The rows a microsecond before and exactly at midnight land on their own days.
    assert roll_up(store.engine, day=NOV_20) == 1
    assert roll_up(store.engine, day=NOV_22) == 1
    assert rolled(store, NOV_20, NOV_22) == [
        usage(NOV_20, "alice", "small", jobs=1, succeeded=1, requested=9, produced=9, gpu=3),
        *EXPECTED_NOV_21,
        usage(NOV_22, "bob", "small", jobs=1, succeeded=1, requested=6, produced=6, gpu=2),
    ]
    assert roll_up(store.engine, day=date(2026, 11, 23)) == 0  # a day without jobs
    assert rolled(store, date(2026, 11, 23)) == []


def test_roll_up_is_idempotent_and_recomputes_what_changed(
        store: QuotaStore, quota_clock: FakeClock) -> None:
    two_users_two_models(store, quota_clock)
    assert roll_up(store.engine, day=NOV_21) == 3
    first = daily_usage(store.engine, since=NOV_21, until=NOV_21)

    assert roll_up(store.engine, day=NOV_21) == 3
    assert rolled(store, NOV_21) == EXPECTED_NOV_21
    second = daily_usage(store.engine, since=NOV_21, until=NOV_21)
    assert [r["updated_at"] >= f["updated_at"] for r, f in zip(second, first, strict=True)] == [
        True] * 3

    # The queued job succeeds after the first roll-up: the next one sees it.
    store.mark_started("a6", worker="gpu-0")
    assert store.mark_finished("a6", status="succeeded", produced_seconds=12, gpu_seconds=4.5)
    assert roll_up(store.engine, day=NOV_21) == 3
    assert rolled(store, NOV_21)[1] == usage(NOV_21, "alice", "small", jobs=6, succeeded=3,
                                             failed=2, cancelled=1, requested=42, produced=41.5,
                                             gpu=16)


def test_a_local_zone_puts_a_2330_job_on_its_local_day(
        store: QuotaStore, quota_clock: FakeClock) -> None:
    # New York leaves daylight saving on 2026-11-01, a 25-hour day: its local midnights are
    # 04:00 UTC on Nov 1 and 05:00 UTC on Nov 2.
    nov_1, nov_2, oct_31 = date(2026, 11, 1), date(2026, 11, 2), date(2026, 10, 31)
    job(store, quota_clock, "2026-10-31T23:30:00-04:00", "oct31-late", status="succeeded",
        produced=1, gpu=1)
    job(store, quota_clock, "2026-11-01T00:30:00-04:00", "nov1-early", status="succeeded",
        produced=2, gpu=1)
    job(store, quota_clock, "2026-11-01T23:30:00-05:00", "nov1-late", status="succeeded",
        produced=4, gpu=1)  # 04:30 UTC on Nov 2
    job(store, quota_clock, "2026-11-02T00:15:00-05:00", "nov2-early", status="failed")

    zone = "America/New_York"
    assert [roll_up(store.engine, day=d, timezone=zone) for d in (oct_31, nov_1, nov_2)] == [1, 1, 1]
    assert rolled(store, oct_31, nov_2) == [
        usage(oct_31, "alice", "small", jobs=1, succeeded=1, requested=10, produced=1, gpu=1),
        usage(nov_1, "alice", "small", jobs=2, succeeded=2, requested=20, produced=6, gpu=2),
        usage(nov_2, "alice", "small", jobs=1, failed=1),
    ]
    # In UTC the same 23:30 job belongs to Nov 2: the zone, not the server, decides.
    assert roll_up(store.engine, day=nov_2) == 1
    assert rolled(store, nov_2) == [usage(nov_2, "alice", "small", jobs=2, succeeded=1, failed=1,
                                          requested=10, produced=4, gpu=1)]


def test_concurrent_roll_ups_of_one_day_take_turns(
        store: QuotaStore, quota_clock: FakeClock) -> None:
    # A redelivered message and beat's next one may roll the same day up at once: without the
    # per-day lock both insert the day's rows and one fails on the primary key.
    two_users_two_models(store, quota_clock)
    barrier = threading.Barrier(4)

    def run(_: int) -> int:
        barrier.wait()
        return roll_up(store.engine, day=NOV_21)

    for _ in range(3):
        with ThreadPoolExecutor(max_workers=4) as pool:
            assert list(pool.map(run, range(4))) == [3, 3, 3, 3]  # re-raises a thread's error
        assert rolled(store, NOV_21) == EXPECTED_NOV_21


def test_bad_arguments_are_refused(store: QuotaStore) -> None:
    with pytest.raises(ValueError, match="unknown time zone 'Mars/Olympus'"):
        roll_up(store.engine, day=NOV_21, timezone="Mars/Olympus")
    with pytest.raises(ValueError, match="before since"):
        daily_usage(store.engine, since=NOV_22, until=NOV_21)
