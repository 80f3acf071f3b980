"""QuotaStore on real SQLite files and a real PostgreSQL database (every DB test runs on both)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING
from zoneinfo import ZoneInfo

import pytest

from pipeline.errors import InvalidRequest, JobIdConflict, JobNotFound, QuotaExceeded
from pipeline.quota import LedgerStatus, QuotaStore, TierLimits
from pipeline.quota.windows import day_window, month_window

if TYPE_CHECKING:  # only the types: the module itself is loaded as a plugin, below
    from tests.pipeline.quota_conftest import FakeClock, StoreFactory

# The quota fixtures (quota_db_url, quota_store, ...): both backends for every test.
pytest_plugins = ["tests.pipeline.quota_conftest"]


def reserve(store: QuotaStore, job_id: str, user_id: str = "alice") -> None:
    store.reserve(job_id=job_id, user_id=user_id, model="small", requested_seconds=8.0)


def fill(store: QuotaStore, n: int, user_id: str = "alice", prefix: str = "job") -> None:
    for i in range(n):
        reserve(store, f"{user_id}/{prefix}-{i}", user_id)


def refused(store: QuotaStore, job_id: str, user_id: str = "alice") -> QuotaExceeded:
    with pytest.raises(QuotaExceeded) as info:
        reserve(store, job_id, user_id)
    return info.value


# --- atomicity -------------------------------------------------------------------------------
@pytest.mark.parametrize("already_used", [0, 5], ids=["new-user", "5-of-15-used"])
def test_100_concurrent_reserves_accept_exactly_the_10_left(
        make_quota_store: StoreFactory, quota_db_url: str, already_used: int) -> None:
    # SQLite connections are cheap: one per thread. The shared PostgreSQL server allows 100 in
    # all, so 100 threads contend for 20 connections there (still 20 racing transactions).
    pool = 100 if quota_db_url.startswith("sqlite") else 20
    store = make_quota_store(pool_size=pool, max_overflow=0, pool_timeout=60)
    if already_used:
        store.set_quota("alice", tier="free", daily=already_used + 10)
        fill(store, already_used, prefix="earlier")
    barrier = threading.Barrier(100)

    def attempt(i: int) -> str:
        barrier.wait()
        try:
            reserve(store, f"burst-{i}")
        except QuotaExceeded as e:
            assert e.details["limit"] == "daily"
            return "refused"
        return "accepted"

    with ThreadPoolExecutor(max_workers=100) as executor:
        outcomes = Counter(executor.map(attempt, range(100)))

    assert outcomes == {"accepted": 10, "refused": 90}
    assert len(store.ledger(user_id="alice")) == already_used + 10  # one row per accepted job
    assert store.usage("alice").daily.used == already_used + 10


def test_concurrent_reserves_of_one_job_id_charge_once(make_quota_store: StoreFactory) -> None:
    store = make_quota_store(pool_size=20, max_overflow=0)
    barrier = threading.Barrier(20)

    def attempt(_: int) -> bool:
        barrier.wait()
        return store.reserve(job_id="same", user_id="alice", model="small",
                             requested_seconds=8.0).new

    with ThreadPoolExecutor(max_workers=20) as pool:
        news = list(pool.map(attempt, range(20)))
    assert news.count(True) == 1 and store.usage("alice").daily.used == 1


# --- refunds and redelivery ------------------------------------------------------------------
@pytest.mark.parametrize("status", ["failed", "timeout", "cancelled"])
def test_failed_timeout_cancelled_give_the_slot_back(quota_store: QuotaStore, status: str) -> None:
    quota_store.set_quota("alice", tier="free", daily=3)
    fill(quota_store, 3)
    refused(quota_store, "extra")  # full
    quota_store.mark_started("alice/job-1", worker="gpu-0", queue_wait_seconds=0.5)
    assert quota_store.mark_finished("alice/job-1", status=status, error_code="gpu_oom")
    assert quota_store.usage("alice").daily.used == 2
    reserve(quota_store, "extra")  # the refunded slot is usable again
    assert quota_store.usage("alice").daily.used == 3


def test_succeeded_keeps_the_charge(quota_store: QuotaStore) -> None:
    quota_store.set_quota("alice", tier="free", daily=3)
    fill(quota_store, 3)
    quota_store.mark_started("alice/job-0", worker="gpu-0", queue_wait_seconds=0.5)
    quota_store.mark_finished("alice/job-0", status=LedgerStatus.SUCCEEDED, produced_seconds=8.0)
    assert refused(quota_store, "extra").details["used"] == 3
    # The first final outcome wins: a late "cancelled" neither changes the row nor refunds.
    assert quota_store.mark_finished("alice/job-0", status="cancelled") is False
    assert quota_store.usage("alice").daily.used == 3


def test_redelivered_job_is_charged_once(quota_store: QuotaStore) -> None:
    first = quota_store.reserve(job_id="j", user_id="alice", model="small", requested_seconds=8)
    assert first.new and first.status is LedgerStatus.RESERVED
    assert quota_store.mark_started("j", worker="gpu-0", queue_wait_seconds=1.5)
    assert quota_store.mark_started("j", worker="gpu-1", queue_wait_seconds=9.0)  # redelivery
    again = quota_store.reserve(job_id="j", user_id="alice", model="small", requested_seconds=8)
    assert not again.new and again.status is LedgerStatus.STARTED
    quota_store.mark_finished("j", status="succeeded", produced_seconds=8.0, gpu_seconds=2.5)
    assert quota_store.mark_started("j", worker="gpu-2") is False  # duplicate after the end
    [row] = quota_store.ledger()
    # attempts count deliveries; the queue wait is what the user waited before the first start
    assert (row["attempts"], row["worker"], row["queue_wait_seconds"]) == (2, "gpu-1", 1.5)
    assert (row["status"], row["produced_seconds"], row["gpu_seconds"]) == ("succeeded", 8.0, 2.5)
    assert row["created_at"].tzinfo is not None and row["finished_at"] is not None
    assert quota_store.usage("alice").daily.used == 1


def test_succeeded_records_the_batch_size_and_the_jobs_gpu_share(quota_store: QuotaStore) -> None:
    for job in ("batched", "failed", "unknown-size"):
        reserve(quota_store, job)
        quota_store.mark_started(job, worker="gpu-0")
    # The worker passes the call's generate time divided by the jobs that shared it.
    assert quota_store.mark_finished("batched", status="succeeded", produced_seconds=8.0,
                                     gpu_seconds=0.75, batch_size=4)
    assert quota_store.mark_finished("failed", status="failed", error_code="gpu_oom")
    assert quota_store.mark_finished("unknown-size", status="succeeded", produced_seconds=8.0,
                                     gpu_seconds=3.0)
    rows = {r["job_id"]: r for r in quota_store.ledger()}
    assert (rows["batched"]["batch_size"], rows["batched"]["gpu_seconds"]) == (4, 0.75)
    assert rows["failed"]["batch_size"] is None and rows["unknown-size"]["batch_size"] is None
    # The first final outcome wins for the batch size too.
    assert quota_store.mark_finished("batched", status="succeeded", batch_size=2) is False
    assert quota_store.ledger()[0]["batch_size"] == 4


@pytest.mark.parametrize("bad", [0, -1, True, 2.5, "4"])
def test_a_batch_size_below_one_or_not_whole_is_refused(quota_store: QuotaStore,
                                                        bad: object) -> None:
    reserve(quota_store, "j")
    with pytest.raises(ValueError, match="batch_size must be a whole number >= 1"):
        quota_store.mark_finished("j", status="succeeded", batch_size=bad)  # type: ignore[arg-type]
    [row] = quota_store.ledger()  # nothing was written: the job can still finish properly
    assert (row["status"], row["batch_size"]) == ("reserved", None)
    assert quota_store.mark_finished("j", status="succeeded", batch_size=1)


def test_rereserve_returns_existing_job_even_when_quota_is_full(quota_store: QuotaStore) -> None:
    fill(quota_store, 10)
    again = quota_store.reserve(job_id="alice/job-3", user_id="alice", model="small",
                                requested_seconds=8)
    assert not again.new
    assert quota_store.usage("alice").daily.used == 10
    with pytest.raises(JobIdConflict, match="another user") as conflict:
        reserve(quota_store, "alice/job-3", user_id="bob")
    assert (conflict.value.code, conflict.value.field) == ("job_id_conflict", "job_id")
    assert quota_store.usage("bob").daily.used == 0


@pytest.mark.parametrize("field", ["user_id", "job_id", "model"])
def test_a_nul_character_is_an_invalid_request_not_a_driver_error(quota_store: QuotaStore,
                                                                   field: str) -> None:
    # PostgreSQL's driver raised psycopg.DataError for this (issue 8.D); SQLite stored it.
    values = {"job_id": "j-nul", "user_id": "alice", "model": "small", field: "a\x00b"}
    with pytest.raises(InvalidRequest) as refused:
        quota_store.reserve(requested_seconds=8.0, **values)
    assert refused.value.field == field
    assert quota_store.ledger() == []


def test_settling_an_unknown_job_raises(quota_store: QuotaStore) -> None:
    with pytest.raises(JobNotFound):
        quota_store.mark_started("nope", worker="gpu-0")
    with pytest.raises(JobNotFound):
        quota_store.mark_finished("nope", status="failed")
    reserve(quota_store, "j")
    with pytest.raises(ValueError, match="not a final status"):
        quota_store.mark_finished("j", status="started")


# --- limits and messages ---------------------------------------------------------------------
def test_daily_limit_message_and_details(quota_store: QuotaStore) -> None:
    fill(quota_store, 10)
    err = refused(quota_store, "eleventh")
    assert err.code == "quota_exceeded"
    assert err.message == ("daily quota of 10 jobs used (10/10); "
                           "resets at 2026-11-22T00:00:00+00:00")
    assert err.details == {"limit": "daily", "used": 10, "limit_value": 10, "tier": "free",
                           "resets_at": "2026-11-22T00:00:00+00:00", "user_id": "alice"}
    json.dumps(err.to_dict())  # crosses the broker as JSON


def test_monthly_limit_hit_while_daily_is_not(quota_store: QuotaStore,
                                              quota_clock: FakeClock) -> None:
    quota_store.set_quota("alice", tier="premium", monthly=8)  # daily stays premium's 100
    quota_clock.set("2026-11-20T09:00:00+00:00")
    fill(quota_store, 5, prefix="thu")
    quota_clock.set("2026-11-21T09:00:00+00:00")
    fill(quota_store, 3, prefix="fri")
    err = refused(quota_store, "ninth")
    assert err.message == ("monthly quota of 8 jobs used (8/8); "
                           "resets at 2026-12-01T00:00:00+00:00")
    assert err.details == {"limit": "monthly", "used": 8, "limit_value": 8, "tier": "premium",
                           "resets_at": "2026-12-01T00:00:00+00:00", "user_id": "alice"}
    usage = quota_store.usage("alice")
    assert (usage.daily.used, usage.daily.limit, usage.daily.remaining) == (3, 100, 97)
    assert (usage.monthly.used, usage.monthly.remaining) == (8, 0)
    assert usage.monthly.resets_at == datetime(2026, 12, 1, tzinfo=UTC)


def test_unlimited_tier_never_refuses(quota_store: QuotaStore) -> None:
    quota_store.set_quota("bigco", tier="enterprise")
    fill(quota_store, 50, user_id="bigco")
    usage = quota_store.usage("bigco")
    assert (usage.tier, usage.daily.used, usage.daily.limit, usage.daily.remaining,
            usage.monthly.remaining) == ("enterprise", 50, -1, None, None)


def test_per_user_override_beats_the_tier(quota_store: QuotaStore) -> None:
    quota_store.set_quota("alice", tier="premium", daily=2)
    fill(quota_store, 2)
    assert refused(quota_store, "third").details["limit_value"] == 2
    quota_store.set_quota("bob", tier="free", daily=12)  # above the free tier's 10
    fill(quota_store, 12, user_id="bob")
    assert refused(quota_store, "thirteenth", user_id="bob").details["limit_value"] == 12
    quota_store.set_quota("alice", tier="premium")  # no override: back to the tier's limits
    usage = quota_store.usage("alice")
    assert (usage.daily.limit, usage.monthly.limit) == (100, 1000)
    assert quota_store.usage("carol").tier == "free"  # never seen: the default tier


def test_set_quota_refuses_unknown_tier_and_bad_limits(quota_store: QuotaStore) -> None:
    quota_store.set_quota("alice", tier="premium")
    with pytest.raises(InvalidRequest) as info:
        quota_store.set_quota("alice", tier="gold")
    assert info.value.field == "tier"
    assert "unknown tier 'gold'; known tiers: free, premium, enterprise" in info.value.message
    with pytest.raises(InvalidRequest, match="-1"):
        quota_store.set_quota("alice", tier="free", daily=-2)
    assert quota_store.usage("alice").tier == "premium"  # refused calls changed nothing


def test_store_rejects_bad_configuration(make_quota_store: StoreFactory) -> None:
    with pytest.raises(ValueError, match="default tier 'gold'"):
        make_quota_store(default_tier="gold")
    with pytest.raises(ValueError, match="Mars/Olympus"):
        make_quota_store(timezone="Mars/Olympus")
    with pytest.raises(ValueError, match=">= 0"):
        TierLimits(daily=-5, monthly=10)


# --- windows -----------------------------------------------------------------------------------
def test_daily_quota_rolls_over_at_utc_midnight(quota_store: QuotaStore,
                                                quota_clock: FakeClock) -> None:
    quota_clock.set("2026-11-21T23:59:59+00:00")
    fill(quota_store, 10)
    assert refused(quota_store, "late").details["resets_at"] == "2026-11-22T00:00:00+00:00"
    quota_clock.set("2026-11-22T00:00:00+00:00")
    reserve(quota_store, "early")
    usage = quota_store.usage("alice")
    assert (usage.daily.used, usage.monthly.used) == (1, 11)


def test_monthly_quota_rolls_over_on_the_first(quota_store: QuotaStore,
                                               quota_clock: FakeClock) -> None:
    quota_store.set_quota("alice", tier="free", daily=-1, monthly=3)
    quota_clock.set("2026-11-30T23:59:59+00:00")
    fill(quota_store, 3)
    assert refused(quota_store, "late").details["resets_at"] == "2026-12-01T00:00:00+00:00"
    quota_clock.set("2026-12-01T00:00:00+00:00")
    reserve(quota_store, "december")
    assert quota_store.usage("alice").monthly.used == 1


def test_windows_follow_new_york_not_utc(make_quota_store: StoreFactory,
                                         quota_clock: FakeClock) -> None:
    store = make_quota_store(timezone="America/New_York")
    quota_clock.set("2026-11-21T23:30:00+00:00")  # 18:30 in New York
    fill(store, 5, prefix="before-utc-midnight")
    quota_clock.set("2026-11-22T04:59:59+00:00")  # 23:59:59 in New York: still the same day
    fill(store, 5, prefix="after-utc-midnight")
    err = refused(store, "late")
    assert err.details["resets_at"] == "2026-11-22T00:00:00-05:00"
    quota_clock.set("2026-11-22T05:00:00+00:00")  # New York midnight
    reserve(store, "next-day")
    assert store.usage("alice").daily.used == 1

    store.set_quota("bob", tier="free", daily=-1, monthly=2)
    quota_clock.set("2026-12-01T04:59:59+00:00")  # still 30 November in New York
    fill(store, 2, user_id="bob", prefix="nov")
    err = refused(store, "nov-3", user_id="bob")
    assert err.details["resets_at"] == "2026-12-01T00:00:00-05:00"
    quota_clock.set("2026-12-01T05:00:00+00:00")
    reserve(store, "dec-1", user_id="bob")


def test_window_math_across_daylight_saving() -> None:
    ny = ZoneInfo("America/New_York")
    spring = day_window(datetime(2026, 3, 8, 12, tzinfo=UTC), ny)
    autumn = day_window(datetime(2026, 11, 1, 12, tzinfo=UTC), ny)
    assert [spring.end - spring.start, autumn.end - autumn.start] == [timedelta(hours=23),
                                                                       timedelta(hours=25)]
    march = month_window(datetime(2026, 3, 15, tzinfo=UTC), ny)  # EST at the start, EDT at the end
    assert [march.start, march.end] == [datetime(2026, 3, 1, 5, tzinfo=UTC),
                                        datetime(2026, 4, 1, 4, tzinfo=UTC)]
    december = month_window(datetime(2026, 12, 31, 23, tzinfo=UTC), ZoneInfo("UTC"))
    assert december.end == datetime(2027, 1, 1, tzinfo=UTC)
    with pytest.raises(ValueError, match="naive"):
        day_window(datetime(2026, 3, 8, 12), ny)


def test_ledger_since_filters_and_keeps_order(quota_store: QuotaStore,
                                              quota_clock: FakeClock) -> None:
    quota_clock.set("2026-11-20T10:00:00+00:00")
    reserve(quota_store, "old")
    quota_clock.set("2026-11-21T10:00:00+00:00")
    reserve(quota_store, "new-a")
    reserve(quota_store, "new-b", user_id="bob")
    since = datetime(2026, 11, 21, tzinfo=UTC)
    assert [r["job_id"] for r in quota_store.ledger(since=since)] == ["new-a", "new-b"]
    assert [r["job_id"] for r in quota_store.ledger(user_id="alice")] == ["old", "new-a"]
    assert quota_store.ledger()[0]["created_at"] == datetime(2026, 11, 20, 10, tzinfo=UTC)


def test_quota_package_does_not_import_the_model_stack() -> None:
    code = ("import sys, pipeline.quota; "
            "print(sorted(m for m in ('torch', 'transformers', 'ffmpeg') if m in sys.modules))")
    repo_root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
