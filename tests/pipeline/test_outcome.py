"""``pipeline.contract.outcome``: one final status for the ledger, webhooks and metrics, and the typed
ledger write of each outcome, on a real SQLite ledger."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import webhooks
from pipeline.contract.outcome import FinalStatus, Outcome
from pipeline.quota import DEFAULT_TIERS, QuotaStore, make_engine, upgrade
from pipeline.quota.outcomes import record
from pipeline.quota.tables import TERMINAL_STATUSES

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[QuotaStore]:
    url = f"sqlite:///{tmp_path / 'quota.db'}"
    upgrade(url)
    store = QuotaStore(make_engine(url), tiers=DEFAULT_TIERS, default_tier="free", timezone="UTC")
    yield store
    store.close()


def _reserved(store: QuotaStore, job_id: str) -> None:
    store.reserve(job_id=job_id, user_id="u1", model="tiny", requested_seconds=4.0)


def test_every_record_speaks_the_one_final_status() -> None:
    assert {s.value for s in TERMINAL_STATUSES} == {s.value for s in FinalStatus}
    assert {status: webhooks.event("j", status)["type"] for status in FinalStatus} == {
        FinalStatus.SUCCEEDED: "job.succeeded", FinalStatus.FAILED: "job.failed",
        FinalStatus.TIMEOUT: "job.timeout", FinalStatus.CANCELLED: "job.cancelled"}
    assert webhooks.message_id_for("j", FinalStatus.TIMEOUT) == "msg_j_timeout"
    assert FinalStatus.of_error("timeout") is FinalStatus.TIMEOUT
    assert FinalStatus.of_error("gpu_oom") is FinalStatus.FAILED


def test_a_success_records_its_share_of_the_batch(ledger: QuotaStore) -> None:
    _reserved(ledger, "ok")
    result = {"duration": 4.0, "batch_size": 4, "timings": {"generate": 2.0}, "model": "tiny"}
    assert record(ledger, Outcome.succeeded("ok", result)) is True
    [row] = ledger.ledger()
    assert (row["status"], row["produced_seconds"], row["gpu_seconds"], row["batch_size"]) == \
        ("succeeded", 4.0, 0.5, 4)


@pytest.mark.parametrize(("outcome", "status", "code"), [
    (Outcome.failed("j", "gpu_oom", "out of memory"), "failed", "gpu_oom"),
    (Outcome.failed("j", "timeout", "past its hard limit"), "timeout", "timeout"),
    (Outcome.cancelled("j"), "cancelled", "cancelled"),
])
def test_an_error_end_is_recorded_once(ledger: QuotaStore, outcome: Outcome, status: str,
                                       code: str) -> None:
    _reserved(ledger, "j")
    assert record(ledger, outcome) is True
    # The first final outcome wins: a late second end changes nothing and says so.
    assert record(ledger, Outcome.succeeded("j", {"duration": 1.0, "timings": {"generate": 1.0}})) \
        is False
    [row] = ledger.ledger()
    assert (row["status"], row["error_code"], row["produced_seconds"]) == (status, code, None)
