"""Audio-seconds quotas and all-or-nothing list reserves, on real SQLite files and a real
PostgreSQL database: a job holds the seconds it asked for while open, the seconds it made once
it succeeded, and none once it failed; limits are exact under 100 concurrent reserves."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pytest

from pipeline.errors import JobIdConflict, QuotaExceeded
from pipeline.quota import Charge, QuotaStore, TierLimits

if TYPE_CHECKING:
    from tests.pipeline.quota_conftest import StoreFactory

pytest_plugins = ["tests.pipeline.quota_conftest"]
pytestmark = pytest.mark.timeout(120)

TIERS = {"metered": TierLimits(daily=-1, monthly=-1, daily_seconds=100, monthly_seconds=150)}


def reserve(store: QuotaStore, job_id: str, seconds: float, user_id: str = "alice") -> None:
    store.reserve(job_id=job_id, user_id=user_id, model="small", requested_seconds=seconds)


def test_seconds_are_held_while_open_settled_on_success_and_given_back_on_failure(
        make_quota_store: StoreFactory) -> None:
    store = make_quota_store(tiers=TIERS, default_tier="metered")
    for i in range(3):
        reserve(store, f"a{i}", 30.0)
    with pytest.raises(QuotaExceeded) as over:
        reserve(store, "a3", 30.0)  # 90 + 30 > 100
    assert over.value.details["limit"] == "daily_seconds"
    assert (over.value.details["used"], over.value.details["requested"]) == (90.0, 30.0)
    reserve(store, "a4", 10.0)  # exactly the limit
    store.mark_finished("a0", status="succeeded", produced_seconds=12.0, gpu_seconds=3.5)
    store.mark_finished("a1", status="failed", error_code="model_runtime_error")
    usage = store.usage("alice")
    assert usage.daily_seconds is not None and usage.monthly_seconds is not None
    assert (usage.daily_seconds.used, usage.daily_seconds.remaining) == (52.0, 48.0)
    assert usage.monthly_seconds.limit == 150 and usage.monthly_gpu_seconds == 3.5
    reserve(store, "a5", 48.0)
    with pytest.raises(QuotaExceeded):
        reserve(store, "a6", 0.5)


@pytest.mark.parametrize("already", [0, 40.0], ids=["new-user", "40-s-used"])
def test_100_concurrent_reserves_accept_exactly_the_seconds_left(
        make_quota_store: StoreFactory, quota_db_url: str, already: float) -> None:
    pool = 100 if quota_db_url.startswith("sqlite") else 20
    store = make_quota_store(tiers=TIERS, default_tier="metered", pool_size=pool,
                             max_overflow=0, pool_timeout=60)
    if already:
        reserve(store, "earlier", already)
    barrier = threading.Barrier(100)

    def attempt(i: int) -> str:
        barrier.wait()
        try:
            reserve(store, f"burst-{i}", 10.0)
        except QuotaExceeded:
            return "refused"
        return "accepted"

    with ThreadPoolExecutor(max_workers=100) as executor:
        outcomes = Counter(executor.map(attempt, range(100)))
    left = int((100 - already) // 10)
    assert outcomes == {"accepted": left, "refused": 100 - left}
    assert store.usage("alice").daily_seconds.used == already + 10 * left  # type: ignore[union-attr]


def test_reserve_many_charges_the_whole_list_or_nothing(make_quota_store: StoreFactory) -> None:
    store = make_quota_store(tiers={"free": TierLimits(daily=3, monthly=-1)})
    reserve(store, "first", 8.0)

    def charges(*ids: str, user: str = "alice") -> list[Charge]:
        return [Charge(job_id, user, "small", 8.0, request_hash="h-" + job_id) for job_id in ids]

    with pytest.raises(QuotaExceeded):  # the third of the list does not fit
        store.reserve_many(charges("l1", "l2", "l3"))
    assert [r["job_id"] for r in store.ledger(user_id="alice")] == ["first"]
    with pytest.raises(JobIdConflict):  # bob's list names alice's job: none of it is charged
        store.reserve_many(charges("b1", "first", user="bob"))
    assert store.ledger(user_id="bob") == []
    made = store.reserve_many(charges("first", "l1"))
    assert [(r.job_id, r.new) for r in made] == [("first", False), ("l1", True)]
    assert made[1].request_hash == "h-l1"
    assert store.release("l1") and not store.release("l1")  # only a reserved row, once
    assert [r["job_id"] for r in store.ledger(user_id="alice")] == ["first"]
