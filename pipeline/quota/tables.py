"""The quota database: its tables (SQLAlchemy 2 declarative) and the engine that reaches them.

``user_quotas`` holds per-user limits, ``usage_ledger`` one row per job, ``usage_daily`` the
ledger's per-day aggregates (``pipeline.quota.rollup`` recomputes them). The schema is owned by
the Alembic migrations in ``migrations/versions``; a test checks that autogenerate finds no
difference between these models and a migrated database, so change both together (a new
revision, never an edit of a released one).
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from enum import Enum
from typing import Any, TypedDict, cast

from sqlalchemy import (
    JSON,
    Connection,
    Date,
    DateTime,
    Dialect,
    Engine,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    create_engine,
    event,
    make_url,
)
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import ConnectionPoolEntry

from pipeline.contract.outcome import FinalStatus

__all__ = ["Base", "DailyUsageRow", "LedgerRow", "LedgerStatus", "UTCDateTime", "UsageDaily",
           "UsageLedger", "WebhookSecret", "UserQuota", "CHARGED_STATUSES", "TERMINAL_STATUSES", "make_engine"]

# How long a SQLite writer waits for the file lock before "database is locked" (seconds).
SQLITE_BUSY_TIMEOUT_S = 30.0


def make_engine(url: str, **engine_kwargs: Any) -> Engine:
    """Build the engine for the quota database at ``url`` (SQLite file or PostgreSQL).

    SQLite: every transaction starts with ``BEGIN IMMEDIATE``, which takes the database's write
    lock up front, so a count-then-insert cannot interleave with another writer (deferred
    transactions that read first would either both see "9 used" or deadlock on the upgrade to a
    write lock). This is the pysqlite recipe from SQLAlchemy's SQLite docs: the driver's own
    BEGIN is switched off and SQLAlchemy's ``begin`` event emits ours. Use a file on a local
    disk (WAL needs shared memory); ``sqlite://`` (memory) cannot be shared between threads.

    PostgreSQL: ``pool_pre_ping``, so a restarted server costs a reconnect, not a failed job.
    ``engine_kwargs`` go to ``create_engine`` (pool sizes, echo).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        engine_kwargs.setdefault("pool_pre_ping", True)
        return create_engine(parsed, **engine_kwargs)
    connect_args = dict(engine_kwargs.pop("connect_args", {}))
    # Pooled connections move between threads; the busy timeout makes writers queue, not fail.
    connect_args.setdefault("check_same_thread", False)
    connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
    engine = create_engine(parsed, connect_args=connect_args, **engine_kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        dbapi_conn.isolation_level = None
        # WAL: one fsync per commit instead of three (reserves are commit-bound), and readers
        # such as an operator's sqlite3 shell do not block the writers. It sticks to the file.
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


class LedgerStatus(str, Enum):
    """The life of one job in the ledger."""

    RESERVED = "reserved"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"


# Rows in these states count against the quota; the others were refunded.
CHARGED_STATUSES = frozenset({LedgerStatus.RESERVED, LedgerStatus.STARTED, LedgerStatus.SUCCEEDED})
# A job's final statuses are pipeline.contract.outcome's, which the webhooks and metrics speak too.
TERMINAL_STATUSES = frozenset(LedgerStatus(final.value) for final in FinalStatus)


class UTCDateTime(TypeDecorator[datetime]):
    """An aware datetime stored as UTC; always read back aware (UTC).

    PostgreSQL keeps the offset (timestamptz) but SQLite stores a naive string, so values are
    normalised to UTC on the way in (their text then sorts chronologically, which the window
    queries rely on) and tagged UTC on the way out. Naive values are refused rather than guessed.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value.isoformat()} given; pass an aware one")
        # SQLite's DATETIME drops the offset when it writes the text, so convert first.
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class LedgerRow(TypedDict):
    """One ledger row as plain data, for stats and reports."""

    job_id: str
    user_id: str
    model: str
    requested_seconds: float
    produced_seconds: float | None
    gpu_seconds: float | None
    queue_wait_seconds: float | None
    status: str
    error_code: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None
    attempts: int
    batch_size: int | None
    experiment: str | None
    variant: str | None


class DailyUsageRow(TypedDict):
    """One ``usage_daily`` row as plain data: a user's jobs on one model on one local day."""

    day: date
    user_id: str
    model: str
    jobs: int
    succeeded: int
    failed: int
    cancelled: int
    requested_seconds: float
    produced_seconds: float
    gpu_seconds: float
    updated_at: datetime


class Base(DeclarativeBase):
    """Declarative base of the quota tables, with constraint names fixed by convention."""

    metadata = MetaData(naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    })


class UserQuota(Base):
    """One user's tier and optional per-user limits (NULL = the tier's limit; -1 = unlimited)."""

    __tablename__ = "user_quotas"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    tier: Mapped[str] = mapped_column(String(32))
    daily_limit: Mapped[int | None] = mapped_column(Integer)
    monthly_limit: Mapped[int | None] = mapped_column(Integer)
    # Set by the store from its clock (not the server's) so that tests can move time.
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())


class UsageLedger(Base):
    """One row per job: what was asked for, what ran, and whether it still counts."""

    __tablename__ = "usage_ledger"
    __table_args__ = (
        # The quota count scans one user's rows inside a window: user first, then time.
        Index("ix_usage_ledger_user_id_created_at", "user_id", "created_at"),
        # Stats read the whole ledger since a moment.
        Index("ix_usage_ledger_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(128), unique=True)
    user_id: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(64))
    requested_seconds: Mapped[float] = mapped_column(Float)
    produced_seconds: Mapped[float | None] = mapped_column(Float)
    gpu_seconds: Mapped[float | None] = mapped_column(Float)
    queue_wait_seconds: Mapped[float | None] = mapped_column(Float)
    # Plain strings rather than a database enum: adding a status then needs no ALTER TYPE.
    status: Mapped[str] = mapped_column(String(16))
    error_code: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    worker: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # How many jobs shared the succeeded job's generate call (gpu_seconds is its share of that
    # call). NULL on rows written before batching (revision 0003) and on jobs that did not
    # succeed: the worker records it with a success only.
    batch_size: Mapped[int | None] = mapped_column(Integer)
    # The model experiment that chose this job's preset and the variant it got (revision 0004;
    # pipeline/ops/experiments.py). NULL for jobs no experiment touched and for older rows.
    experiment: Mapped[str | None] = mapped_column(String(64))
    variant: Mapped[str | None] = mapped_column(String(64))
    # The job's own record (revision 0006; pipeline/client/records.py): a SHA-256 of the request (a
    # repeated job_id with another request is a conflict), the request as resolved, the result
    # or the error message. Deferred: stats scan the whole ledger and never need them.
    request_hash: Mapped[str | None] = mapped_column(String(64))
    request: Mapped[dict[str, Any] | None] = mapped_column(JSON, deferred=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, deferred=True)
    error_message: Mapped[str | None] = mapped_column(Text, deferred=True)

    def to_row(self) -> LedgerRow:
        """This row as plain data (no ORM state)."""
        return cast(LedgerRow, {key: getattr(self, key) for key in LedgerRow.__annotations__})


class UsageDaily(Base):
    """The ledger rolled up per local day, user and model (``pipeline.quota.rollup``).

    ``jobs`` counts every row created that day, still open ones included; ``failed`` counts
    failed and timed-out rows. The three sums are over succeeded rows only: what was delivered.
    A derived table: a roll-up replaces a day's rows wholesale, so nothing else writes here.
    """

    __tablename__ = "usage_daily"

    # The primary key leads with the day, so reading a range of days is an index scan.
    day: Mapped[date] = mapped_column(Date, primary_key=True)
    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    jobs: Mapped[int] = mapped_column(Integer)
    succeeded: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)
    cancelled: Mapped[int] = mapped_column(Integer)
    requested_seconds: Mapped[float] = mapped_column(Float)
    produced_seconds: Mapped[float] = mapped_column(Float)
    gpu_seconds: Mapped[float] = mapped_column(Float)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime())

    def to_row(self) -> DailyUsageRow:
        """This row as plain data (no ORM state)."""
        return cast(DailyUsageRow, {key: getattr(self, key) for key in DailyUsageRow.__annotations__})


class ApiKey(Base):
    """One API key of the HTTP gateway (pipeline/gateway/keystore.py): its public prefix, the
    user it acts for, and a SHA-256 of the whole key. The key itself is never stored."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_user_id", "user_id"),)  # `keys list --user`

    # The key's public part ("mgp_<prefix>_..."), so a request finds its row by primary key
    # and only that row's hash is compared.
    prefix: Mapped[str] = mapped_column(String(16), primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(String(128))
    name: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # Set once by `keys revoke`; a revoked row stays, so `keys list` shows what it was.
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookSecret(Base):
    """A user's own webhook signing secret (pipeline/quota/webhook_secrets.py), for receivers
    that belong to the deployment's customers: their deliveries are signed with it instead of
    the deployment's ``webhooks.secret``. Kept as it is, not hashed: signing needs the secret
    itself (as every webhook sender does). ``previous`` still signs until ``previous_until``,
    so a receiver has time to switch after a rotation."""

    __tablename__ = "webhook_secrets"

    user_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))
    previous: Mapped[str | None] = mapped_column(String(128))
    previous_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    rotated_at: Mapped[datetime] = mapped_column(UTCDateTime())
