"""Daily roll-ups of the usage ledger: one ``usage_daily`` row per local day, user and model.

The ledger stays the truth; a roll-up is a cache of it that a report can read without scanning
every job. ``roll_up`` recomputes one whole day from the ledger, so it is idempotent and also
picks up what changed since the last run (a job reserved at 23:55 that succeeded at 00:10 is
counted on the day it was created, as the quota counts it). Beat runs it hourly for yesterday
and today (``workers/maintenance.py``).

Days are local days in the quotas' time zone, handed to SQL as UTC instants exactly as the quota
windows are (``windows.py``): the ledger holds UTC, and a local day may last 23 or 25 hours.
The aggregation is one ``INSERT ... SELECT ... GROUP BY``, the same statement on SQLite and
PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

from sqlalchemy import (
    ColumnElement,
    Connection,
    Date,
    Engine,
    Float,
    Insert,
    SQLColumnExpression,
    case,
    delete,
    func,
    insert,
    literal,
    select,
    text,
)

from pipeline.quota.tables import DailyUsageRow, LedgerStatus, UsageDaily, UsageLedger, UTCDateTime
from pipeline.quota.windows import Window, resolve_zone

__all__ = ["daily_usage", "roll_up"]

# The class key of the per-day advisory lock (the second key is the day's ordinal): any
# constant works, as long as every process that rolls up this schema uses the same one.
_PG_ROLLUP_LOCK = 0x6D7572  # "mur"
_FAILED = (LedgerStatus.FAILED.value, LedgerStatus.TIMEOUT.value)


def _local_day(day: date, zone: ZoneInfo) -> Window:
    # As windows.py: local midnights converted to UTC, never wall-clock arithmetic in the zone.
    def midnight(d: date) -> datetime:
        return datetime.combine(d, time(0), tzinfo=zone).astimezone(UTC)

    return Window(midnight(day), midnight(day + timedelta(days=1)))


def _lock_day(conn: Connection, day: date) -> None:
    # Two roll-ups of one day at once (a redelivered message, an operator's run) would both
    # insert the day's rows and one would fail on the primary key. PostgreSQL: a transaction
    # lock per day makes them take turns; the later one then deletes what the first wrote.
    # SQLite: make_engine's BEGIN IMMEDIATE already serialises every writer.
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:cls, :key)"),
                     {"cls": _PG_ROLLUP_LOCK, "key": day.toordinal()})


def _insert_day(day: date, window: Window, now: datetime) -> Insert:
    # INSERT ... SELECT ... GROUP BY: the database aggregates, nothing is read into Python.
    status = UsageLedger.status
    done = status == LedgerStatus.SUCCEEDED.value

    def count_if(condition: ColumnElement[bool]) -> ColumnElement[int]:
        return func.count(case((condition, 1)))

    def delivered(column: SQLColumnExpression[float | None]) -> ColumnElement[float]:
        return func.coalesce(func.sum(case((done, column))), literal(0.0, Float()))

    columns: dict[str, SQLColumnExpression[Any]] = {
        "day": literal(day, Date()),
        "user_id": UsageLedger.user_id,
        "model": UsageLedger.model,
        "jobs": func.count(),
        "succeeded": count_if(done),
        "failed": count_if(status.in_(_FAILED)),
        "cancelled": count_if(status == LedgerStatus.CANCELLED.value),
        "requested_seconds": delivered(UsageLedger.requested_seconds),
        "produced_seconds": delivered(UsageLedger.produced_seconds),
        "gpu_seconds": delivered(UsageLedger.gpu_seconds),
        "updated_at": literal(now, UTCDateTime()),
    }
    return insert(UsageDaily).from_select(
        list(columns),
        select(*(c.label(name) for name, c in columns.items()))
        .where(UsageLedger.created_at >= window.start, UsageLedger.created_at < window.end)
        .group_by(UsageLedger.user_id, UsageLedger.model))


def roll_up(engine: Engine, *, day: date, timezone: str = "UTC") -> int:
    """Recompute ``day``'s ``usage_daily`` rows from the ledger; return how many were written.

    ``day`` is a local day in ``timezone`` (an IANA name; the deployment's ``quotas.timezone``,
    so that reports and quotas agree on what "a day" is). One transaction replaces the day's
    rows: a reader sees the old ones or the new ones, and running it again changes nothing but
    ``updated_at``. Unknown zone: ``ValueError``.
    """
    window = _local_day(day, resolve_zone(timezone))
    this_day = UsageDaily.day == day
    with engine.begin() as conn:
        _lock_day(conn, day)
        conn.execute(delete(UsageDaily).where(this_day))
        conn.execute(_insert_day(day, window, datetime.now(UTC)))
        # Counted rather than read from rowcount, which drivers need not report for INSERT ... SELECT.
        written = conn.scalar(select(func.count()).select_from(UsageDaily).where(this_day))
    return int(written or 0)


def daily_usage(engine: Engine, *, since: date, until: date) -> list[DailyUsageRow]:
    """Return the rolled-up rows from ``since`` to ``until``, both included, ordered by day,
    user and model. Days never rolled up are simply absent."""
    if until < since:
        raise ValueError(f"until ({until}) is before since ({since})")
    stmt = (select(*UsageDaily.__table__.columns)
            .where(UsageDaily.day >= since, UsageDaily.day <= until)
            .order_by(UsageDaily.day, UsageDaily.user_id, UsageDaily.model))
    with engine.connect() as conn:
        rows = conn.execute(stmt).mappings().all()
    return [cast(DailyUsageRow, dict(row)) for row in rows]
