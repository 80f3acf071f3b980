"""Job records from the ledger: a job found, and a user's jobs listed, after the result backend
has forgotten them.

The result backend keeps a job's state for ``broker.result_expires`` (a day); its file lives
``storage.retention_days``. The ledger row (one per job, in SQL) keeps the request, the result
or the error and the times, so a caller can find a job for as long as its file may exist.
A running job's live progress is the result backend's: the ledger knows only queued, started
and the end.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, undefer

from pipeline.contract.jobs import JobResult, JobSpec, JobStatus
from pipeline.errors import InvalidRequest
from pipeline.quota.tables import LedgerStatus, UsageLedger

if TYPE_CHECKING:
    from pipeline.quota import QuotaStore

__all__ = ["JobPage", "JobRecord", "job_record", "list_jobs", "request_echo", "MAX_PAGE"]

MAX_PAGE = 100

_STATUS = {LedgerStatus.RESERVED.value: JobStatus.queued,
           LedgerStatus.STARTED.value: JobStatus.started,
           LedgerStatus.SUCCEEDED.value: JobStatus.succeeded,
           LedgerStatus.FAILED.value: JobStatus.failed,
           LedgerStatus.TIMEOUT.value: JobStatus.failed,
           LedgerStatus.CANCELLED.value: JobStatus.cancelled}
# What a status filter matches in the ledger (progress is started: the ledger has no steps).
_LEDGER = {JobStatus.queued: [LedgerStatus.RESERVED.value],
           JobStatus.started: [LedgerStatus.STARTED.value],
           JobStatus.progress: [LedgerStatus.STARTED.value],
           JobStatus.succeeded: [LedgerStatus.SUCCEEDED.value],
           JobStatus.failed: [LedgerStatus.FAILED.value, LedgerStatus.TIMEOUT.value],
           JobStatus.cancelled: [LedgerStatus.CANCELLED.value]}


@dataclass(frozen=True)
class JobRecord:
    """A job as the ledger keeps it: ``request`` is the request as resolved (defaults filled
    in, a melody named by its URI), ``result`` the finished job's, ``error`` a failed one's
    ``{"code", "message"}``. Rows from before these were recorded have None there."""

    job_id: str
    user_id: str
    status: JobStatus
    model: str
    request: dict[str, Any] | None
    result: JobResult | None
    error: dict[str, str] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class JobPage:
    """One page of ``list_jobs``; pass ``next_cursor`` for the next (None: the last page)."""

    jobs: list[JobRecord]
    next_cursor: str | None


def request_echo(spec: JobSpec) -> dict[str, Any]:
    """What the ledger keeps of a job's request: every resolved field, the melody as a
    caller's URI or just ``True`` (uploaded bytes and local paths are not the caller's to see
    back), never the broker's bookkeeping."""
    echo = spec.model_dump(mode="json", exclude={"melody", "continuation", "enqueued_at",
                                                  "job_id", "user_id"})
    for name in ("melody", "continuation"):
        value = getattr(spec, name)
        echo[name] = (None if value is None
                      else value.uri if value.uri is not None and not value.owned else True)
    if spec.continuation is None:  # a job without one reads as jobs did before continuations
        for name in ("continuation", "continuation_start", "continuation_end",
                     "continuation_included"):
            echo.pop(name, None)
    return echo


def _record(row: UsageLedger) -> JobRecord:
    result = None
    if row.result is not None:
        try:
            result = JobResult.model_validate(row.result)
        except ValidationError:  # a result no worker of ours wrote: the status still holds
            result = None
    error = None
    if row.error_code is not None:
        error = {"code": row.error_code, "message": row.error_message or ""}
    return JobRecord(job_id=row.job_id, user_id=row.user_id, status=_STATUS[row.status],
                     model=row.model, request=row.request, result=result, error=error,
                     created_at=row.created_at, started_at=row.started_at,
                     finished_at=row.finished_at)


def _full() -> tuple[Any, ...]:
    return (undefer(UsageLedger.request), undefer(UsageLedger.result),
            undefer(UsageLedger.error_message))


def job_record(store: QuotaStore, job_id: str) -> JobRecord | None:
    """The ledger's record of ``job_id``; None for an id it does not know (and when there is
    no ledger schema yet: it knows no job then)."""
    try:
        with Session(store.engine) as s:
            row = s.scalar(select(UsageLedger).where(UsageLedger.job_id == job_id)
                           .options(*_full()))
            return None if row is None else _record(row)
    except SQLAlchemyError:
        if store.schema_ready() is False:
            return None
        raise


def _encode_cursor(row: JobRecord, row_id: int) -> str:
    text = json.dumps([row.created_at.isoformat(), row_id])
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, int]:
    try:
        created, row_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        at = datetime.fromisoformat(created)
        if at.tzinfo is None or not isinstance(row_id, int):
            raise ValueError("not a cursor of ours")
        return at.astimezone(UTC), row_id
    except (binascii.Error, ValueError, TypeError) as exc:
        raise InvalidRequest("cursor is not one a page of list_jobs returned", "cursor") from exc


def list_jobs(store: QuotaStore, user_id: str, *, status: JobStatus | str | None = None,
              since: datetime | None = None, limit: int = 20,
              cursor: str | None = None) -> JobPage:
    """``user_id``'s jobs, newest first: ``status`` filters (``progress`` reads as started),
    ``since`` (aware) keeps jobs created at or after it, ``limit`` (1..100) sizes the page and
    ``cursor`` (a page's ``next_cursor``) continues after it. Pages are stable: a job enqueued
    meanwhile appears on the first page, never twice."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_PAGE}", "limit")
    if since is not None and (since.tzinfo is None or since.utcoffset() is None):
        raise InvalidRequest("since must be an aware datetime (with a time zone)", "since")
    stmt = select(UsageLedger).where(UsageLedger.user_id == user_id).options(*_full())
    if status is not None:
        try:
            wanted = JobStatus(status)
        except ValueError as exc:
            raise InvalidRequest(f"status must be one of {', '.join(s.value for s in JobStatus)}",
                                 "status") from exc
        stmt = stmt.where(UsageLedger.status.in_(_LEDGER[wanted]))
    if since is not None:
        stmt = stmt.where(UsageLedger.created_at >= since)
    if cursor is not None:
        at, row_id = _decode_cursor(cursor)
        stmt = stmt.where(or_(UsageLedger.created_at < at,
                              and_(UsageLedger.created_at == at, UsageLedger.id < row_id)))
    # (created_at, id) is a total order, so a cursor never skips or repeats a row.
    stmt = stmt.order_by(UsageLedger.created_at.desc(), UsageLedger.id.desc()).limit(limit + 1)
    with Session(store.engine) as s:
        rows = s.scalars(stmt).all()
        records = [(_record(row), row.id) for row in rows[:limit]]
    next_cursor = _encode_cursor(*records[-1]) if len(rows) > limit else None
    return JobPage([record for record, _ in records], next_cursor)
