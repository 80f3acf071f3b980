"""Per-user job quotas: reserve a slot before enqueueing, settle it when the job ends.

Quotas count jobs, as the product promises ("10 conversions per day"): a ledger row that is
reserved, started or succeeded counts against the user's day and month; failed, timed-out and
cancelled rows are refunded simply by no longer matching the count. There is no counter column
to drift out of step with the ledger: the ledger is the truth and the count is taken under a
per-user lock, so the same code is exact on SQLite and PostgreSQL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, cast

from sqlalchemy import (
    CursorResult,
    Engine,
    Update,
    case,
    delete,
    func,
    inspect,
    literal,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from pipeline.errors import (
    InvalidRequest,
    JobIdConflict,
    JobNotFound,
    QuotaExceeded,
    SettingsError,
)
from pipeline.quota.tables import (
    CHARGED_STATUSES,
    TERMINAL_STATUSES,
    LedgerRow,
    LedgerStatus,
    UsageLedger,
    UserQuota,
    UTCDateTime,
)
from pipeline.quota.windows import (
    UNLIMITED,
    SecondsUsage,
    TierLimits,
    Window,
    WindowUsage,
    day_window,
    month_window,
    resolve_zone,
)

__all__ = ["Charge", "QuotaStore", "Reservation", "UsageSummary"]


@dataclass(frozen=True)
class Charge:
    """One job to reserve (``reserve_many``); ``request_hash`` and ``request`` are its record."""

    job_id: str
    user_id: str
    model: str
    requested_seconds: float
    experiment: str | None = None
    variant: str | None = None
    request_hash: str | None = None
    request: dict[str, Any] | None = None


@dataclass(frozen=True)
class Reservation:
    """A job's slot in the ledger; ``new`` is False when an earlier reserve already made it
    (``request_hash`` is then the earlier request's: None for rows from before revision 0006)."""

    job_id: str
    user_id: str
    model: str
    requested_seconds: float
    status: LedgerStatus
    created_at: datetime
    new: bool
    request_hash: str | None = None


@dataclass(frozen=True)
class UsageSummary:
    """What ``usage()`` reports for one user: jobs and seconds of audio against the limits,
    and the GPU seconds the month's succeeded jobs used (reported, not limited)."""

    user_id: str
    tier: str
    daily: WindowUsage
    monthly: WindowUsage
    daily_seconds: SecondsUsage | None = None
    monthly_seconds: SecondsUsage | None = None
    monthly_gpu_seconds: float = 0.0


@dataclass(frozen=True)
class _Used:
    """One user's charged jobs and seconds in the current day and month."""

    day: Window
    month: Window
    day_jobs: int
    month_jobs: int
    day_seconds: float
    month_seconds: float
    month_gpu_seconds: float


# Upserts are dialect-specific statements; both dialects spell ON CONFLICT the same way.
_INSERTS: dict[str, Callable[[Any], postgresql.Insert | sqlite.Insert]] = {
    "postgresql": postgresql.insert, "sqlite": sqlite.insert}
_OPEN = (LedgerStatus.RESERVED.value, LedgerStatus.STARTED.value)  # a worker may still move on
_CHARGED = sorted(st.value for st in CHARGED_STATUSES)
_utcnow = partial(datetime.now, UTC)


def _check_text(field: str, value: str, max_len: int) -> None:
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise InvalidRequest(f"{field} must be 1 to {max_len} characters", field=field)
    if "\x00" in value:  # PostgreSQL text cannot hold NUL: the driver would raise DataError
        raise InvalidRequest(f"{field} must not contain a NUL character", field=field)


class QuotaStore:
    """Quota checks and the usage ledger over one SQL database (SQLite file or PostgreSQL).

    Safe to share between threads: each call opens its own short transaction. The schema must
    exist (``pipeline.quota.migrate.upgrade``). ``clock`` must return aware datetimes.
    """

    def __init__(self, engine: Engine, *, tiers: Mapping[str, TierLimits], default_tier: str,
                 timezone: str = "UTC", clock: Callable[[], datetime] = _utcnow) -> None:
        if engine.dialect.name not in _INSERTS:  # the upserts below exist for these two only
            raise ValueError(f"quota store supports {sorted(_INSERTS)}, not {engine.dialect.name}")
        if default_tier not in tiers:
            raise ValueError(f"default tier {default_tier!r} is not one of {sorted(tiers)}")
        self.engine = engine
        self._insert = _INSERTS[engine.dialect.name]
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._tiers = dict(tiers)
        self._default_tier = default_tier
        self._zone = resolve_zone(timezone)
        self._clock = clock

    # --- the job's life -------------------------------------------------------------------

    def close(self) -> None:
        """Close the engine's pooled connections (a short-lived CLI command ends with this)."""
        self.engine.dispose()

    def schema_ready(self) -> bool | None:
        """Whether the ledger's tables exist; None when the database cannot be asked."""
        try:
            with self.engine.connect() as connection:
                return bool(inspect(connection).has_table(UsageLedger.__tablename__))
        except SQLAlchemyError:
            return None

    def reserve(self, *, job_id: str, user_id: str, model: str, requested_seconds: float,
                experiment: str | None = None, variant: str | None = None,
                request_hash: str | None = None,
                request: dict[str, Any] | None = None) -> Reservation:
        """Charge one job to ``user_id``, or raise ``QuotaExceeded``; idempotent per ``job_id``.

        ``experiment`` and ``variant`` record the model experiment that chose the job's preset
        (``stats --by variant`` compares its variants); None for a job no experiment touched.
        ``request_hash`` and ``request`` are the job's record (``pipeline.client.records``).
        """
        [reservation] = self.reserve_many([Charge(job_id, user_id, model, requested_seconds,
                                                  experiment, variant, request_hash, request)])
        return reservation

    def reserve_many(self, charges: Sequence[Charge]) -> list[Reservation]:
        """Charge every job in one transaction: all of them, or none (``QuotaExceeded`` for
        the first that does not fit, with the earlier ones of the list counted). Each is
        idempotent per ``job_id`` like ``reserve``."""
        for charge in charges:
            self._check_charge(charge)
        if len({c.job_id for c in charges}) != len(charges):
            raise InvalidRequest("the same job_id appears twice in one list", field="job_id")
        now = self._now()
        try:
            with self._sessions.begin() as s:
                # Users locked in one order, so two lists sharing users cannot deadlock.
                for user_id in sorted({c.user_id for c in charges}):
                    self._lock_user(s, user_id, now)
                reservations = [self._reserve_one(s, charge, now) for charge in charges]
            return reservations
        except IntegrityError as e:
            # Only another user's concurrent reserve of the same job_id gets here (one user's
            # reserves are serialised by the lock); report it like the sequential case.
            with self._sessions.begin() as s:
                taken = s.scalars(select(UsageLedger).where(
                    UsageLedger.job_id.in_([c.job_id for c in charges]))).all()
            for existing in taken:
                owner = next(c.user_id for c in charges if c.job_id == existing.job_id)
                if existing.user_id != owner:
                    raise JobIdConflict(f"job_id {existing.job_id!r} is already taken by "
                                        "another user", field="job_id") from e
            raise

    def release(self, job_id: str) -> bool:
        """Delete a reservation whose job was never queued (the producer's give-back): a job
        that never was leaves no row to count, list or find. Only a row still ``reserved``."""
        with self._sessions.begin() as s:
            result = s.execute(delete(UsageLedger).where(
                UsageLedger.job_id == job_id,
                UsageLedger.status == LedgerStatus.RESERVED.value))
            return cast(CursorResult[Any], result).rowcount == 1

    def mark_started(self, job_id: str, *, worker: str,
                     queue_wait_seconds: float | None = None) -> bool:
        """Record that ``worker`` began the job; a redelivery adds an attempt, never a charge.

        ``started_at`` and ``queue_wait_seconds`` keep the first attempt's values (what the user
        waited); ``worker`` names the latest. Returns False when the job already ended: the
        delivery is a duplicate and the worker should drop it. Unknown job: ``JobNotFound``.
        """
        now = literal(self._now(), UTCDateTime())
        stmt = (update(UsageLedger)
                .where(UsageLedger.job_id == job_id, UsageLedger.status.in_(_OPEN))
                .values(status=LedgerStatus.STARTED.value, worker=worker,
                        attempts=UsageLedger.attempts + 1,
                        started_at=func.coalesce(UsageLedger.started_at, now),
                        queue_wait_seconds=func.coalesce(UsageLedger.queue_wait_seconds,
                                                         queue_wait_seconds))
                .execution_options(synchronize_session=False))
        return self._settle(stmt, job_id)

    def mark_finished(self, job_id: str, *, status: LedgerStatus | str,
                      produced_seconds: float | None = None, gpu_seconds: float | None = None,
                      error_code: str | None = None, batch_size: int | None = None,
                      result: dict[str, Any] | None = None,
                      error_message: str | None = None) -> bool:
        """Record the job's final outcome; failed, timeout and cancelled refund the slot.

        ``gpu_seconds`` is the job's own share of the generate call, and ``batch_size`` how many
        jobs shared that call (None: not known, as on rows from before batching). Call it once
        per job, on the final outcome (not before a retry). ``result`` (the job's JSON result)
        and ``error_message`` complete its record (``pipeline.client.records``). The first final outcome wins:
        returns False, changing nothing, when the job had already ended.
        """
        final = LedgerStatus(status)
        if final not in TERMINAL_STATUSES:
            raise ValueError(f"{final.value!r} is not a final status; use one of "
                             f"{sorted(s.value for s in TERMINAL_STATUSES)}")
        # A caller's bug (the worker's), not a user's request: refused before it skews stats.
        if batch_size is not None and (isinstance(batch_size, bool)
                                       or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a whole number >= 1 or None, got {batch_size!r}")
        stmt = (update(UsageLedger)
                .where(UsageLedger.job_id == job_id, UsageLedger.status.in_(_OPEN))
                .values(status=final.value, finished_at=self._now(),
                        produced_seconds=produced_seconds, gpu_seconds=gpu_seconds,
                        error_code=error_code, batch_size=batch_size, result=result,
                        error_message=None if error_message is None else error_message[:2000])
                .execution_options(synchronize_session=False))
        return self._settle(stmt, job_id)

    # --- reading and administration -------------------------------------------------------

    def usage(self, user_id: str) -> UsageSummary:
        """Return the user's tier, and jobs used of the limit in the current day and month."""
        now = self._now()
        with self._sessions.begin() as s:
            quota = s.get(UserQuota, user_id)
            tier, daily, monthly = self._limits(quota)
            used = self._count(s, user_id, now)
        limits = self._tiers[tier]
        day_end, month_end = self._local(used.day.end), self._local(used.month.end)
        return UsageSummary(user_id, tier, WindowUsage(used.day_jobs, daily, day_end),
                            WindowUsage(used.month_jobs, monthly, month_end),
                            SecondsUsage(used.day_seconds, limits.daily_seconds, day_end),
                            SecondsUsage(used.month_seconds, limits.monthly_seconds, month_end),
                            used.month_gpu_seconds)

    def tier_of(self, user_id: str) -> str:
        """The user's tier (the default tier for a user with no row yet); one indexed read."""
        with self._sessions.begin() as s:
            tier = s.scalar(select(UserQuota.tier).where(UserQuota.user_id == user_id))
        return tier if tier is not None else self._default_tier

    def set_quota(self, user_id: str, *, tier: str, daily: int | None = None,
                  monthly: int | None = None) -> None:
        """Put ``user_id`` on ``tier``; ``daily``/``monthly`` override the tier (None = tier's)."""
        _check_text("user_id", user_id, 128)
        if tier not in self._tiers:
            raise InvalidRequest(f"unknown tier {tier!r}; known tiers: {', '.join(self._tiers)}",
                                 field="tier", details={"known_tiers": list(self._tiers)})
        for field, value in (("daily", daily), ("monthly", monthly)):
            if value is not None and value < UNLIMITED:
                raise InvalidRequest(f"{field} must be >= 0, -1 (unlimited) or None (the tier's)",
                                     field=field)
        now = self._now()
        stmt = self._insert(UserQuota).values(user_id=user_id, tier=tier, daily_limit=daily,
                                              monthly_limit=monthly, created_at=now,
                                              updated_at=now)
        stmt = stmt.on_conflict_do_update(
            index_elements=[UserQuota.user_id],
            set_={"tier": tier, "daily_limit": daily, "monthly_limit": monthly,
                  "updated_at": stmt.excluded.updated_at})
        with self._sessions.begin() as s:
            s.execute(stmt)

    def ledger(self, *, since: datetime | None = None,
               user_id: str | None = None) -> list[LedgerRow]:
        """Return ledger rows, oldest first, created at or after ``since`` (aware)."""
        stmt = select(UsageLedger).order_by(UsageLedger.created_at, UsageLedger.id)
        if since is not None:
            stmt = stmt.where(UsageLedger.created_at >= since)
        if user_id is not None:
            stmt = stmt.where(UsageLedger.user_id == user_id)
        with self._sessions.begin() as s:
            rows = s.scalars(stmt).all()
        return [r.to_row() for r in rows]

    # --- internals --------------------------------------------------------------------------

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None or now.utcoffset() is None:
            raise ValueError("the quota clock returned a naive datetime; it must be aware")
        return now.astimezone(UTC)

    def _local(self, instant: datetime) -> datetime:
        # Reset times are shown in the deployment's zone: "00:00-05:00" reads as midnight.
        return instant.astimezone(self._zone)

    def _lock_user(self, s: Session, user_id: str, now: datetime) -> None:
        # PostgreSQL: the row lock serialises one user's reserves (others go on in parallel);
        # the insert first gives a new user a row to lock. SQLite ignores FOR UPDATE: BEGIN
        # IMMEDIATE (see make_engine) already serialises every writer.
        s.execute(self._insert(UserQuota)
                  .values(user_id=user_id, tier=self._default_tier, created_at=now, updated_at=now)
                  .on_conflict_do_nothing(index_elements=[UserQuota.user_id]))
        s.execute(select(UserQuota.user_id).where(UserQuota.user_id == user_id).with_for_update())

    def _limits(self, quota: UserQuota | None) -> tuple[str, int, int]:
        tier = quota.tier if quota is not None else self._default_tier
        limits = self._tiers.get(tier)
        if limits is None:
            raise SettingsError(f"tier {tier!r} is in the database but not configured; "
                                f"configured tiers: {', '.join(self._tiers)}")
        daily = quota.daily_limit if quota is not None else None
        monthly = quota.monthly_limit if quota is not None else None
        return (tier, limits.daily if daily is None else daily,
                limits.monthly if monthly is None else monthly)

    def _count(self, s: Session, user_id: str, now: datetime) -> _Used:
        day, month = day_window(now, self._zone), month_window(now, self._zone)
        # A local day always lies inside its local month: one scan of the month counts both.
        in_day = (UsageLedger.created_at >= day.start) & (UsageLedger.created_at < day.end)
        # An open job holds what it asked for; a succeeded one, what it made.
        seconds = case((UsageLedger.status == LedgerStatus.SUCCEEDED.value,
                        func.coalesce(UsageLedger.produced_seconds,
                                      UsageLedger.requested_seconds)),
                       else_=UsageLedger.requested_seconds)
        row = s.execute(
            select(func.count(case((in_day, 1))), func.count(),
                   func.coalesce(func.sum(case((in_day, seconds), else_=0.0)), 0.0),
                   func.coalesce(func.sum(seconds), 0.0),
                   func.coalesce(func.sum(UsageLedger.gpu_seconds), 0.0))
            .where(UsageLedger.user_id == user_id,
                   UsageLedger.status.in_(_CHARGED),
                   UsageLedger.created_at >= month.start, UsageLedger.created_at < month.end)
        ).one()
        return _Used(day, month, int(row[0]), int(row[1]), float(row[2]), float(row[3]),
                     float(row[4]))

    def _check_room(self, s: Session, user_id: str, now: datetime,
                    requested_seconds: float) -> None:
        tier, daily, monthly = self._limits(s.get(UserQuota, user_id))
        limits = self._tiers[tier]
        used = self._count(s, user_id, now)
        # Monthly first: when both are spent, the month's reset is the one that matters.
        for name, jobs, limit, window in (("monthly", used.month_jobs, monthly, used.month),
                                          ("daily", used.day_jobs, daily, used.day)):
            if limit != UNLIMITED and jobs >= limit:
                resets = self._local(window.end).isoformat()
                raise QuotaExceeded(
                    f"{name} quota of {limit} jobs used ({jobs}/{limit}); resets at {resets}",
                    details={"limit": name, "used": jobs, "limit_value": limit,
                             "resets_at": resets, "user_id": user_id, "tier": tier})
        for name, secs, cap, window in (
                ("monthly_seconds", used.month_seconds, limits.monthly_seconds, used.month),
                ("daily_seconds", used.day_seconds, limits.daily_seconds, used.day)):
            if cap != UNLIMITED and secs + requested_seconds > cap + 1e-9:
                resets = self._local(window.end).isoformat()
                raise QuotaExceeded(
                    f"{name.replace('_', ' ')} quota of {cap:g} s of audio would be passed "
                    f"({secs:g} s used, {requested_seconds:g} s asked); resets at {resets}",
                    details={"limit": name, "used": secs, "limit_value": cap,
                             "requested": requested_seconds, "resets_at": resets,
                             "user_id": user_id, "tier": tier})

    def _check_charge(self, c: Charge) -> None:
        for field, value, longest in (("job_id", c.job_id, 128), ("user_id", c.user_id, 128),
                                      ("model", c.model, 64)):
            _check_text(field, value, longest)
        for field, optional in (("experiment", c.experiment), ("variant", c.variant)):
            if optional is not None:
                _check_text(field, optional, 64)
        if not (math.isfinite(c.requested_seconds) and c.requested_seconds > 0):
            raise InvalidRequest("requested_seconds must be a positive number",
                                 field="requested_seconds")

    def _reserve_one(self, s: Session, c: Charge, now: datetime) -> Reservation:
        existing = s.scalar(select(UsageLedger).where(UsageLedger.job_id == c.job_id))
        if existing is not None:
            return self._as_reservation(existing, c.user_id, new=False)
        self._check_room(s, c.user_id, now, float(c.requested_seconds))
        row = UsageLedger(job_id=c.job_id, user_id=c.user_id, model=c.model,
                          requested_seconds=float(c.requested_seconds), created_at=now,
                          status=LedgerStatus.RESERVED.value, attempts=0,
                          experiment=c.experiment, variant=c.variant,
                          request_hash=c.request_hash, request=c.request)
        s.add(row)
        s.flush()  # the next job of the list counts this one
        return self._as_reservation(row, c.user_id, new=True)

    def _settle(self, stmt: Update, job_id: str) -> bool:
        # The guarded UPDATE is the whole state machine: it matches only an open job, so a
        # duplicate or late message changes nothing and says so.
        with self._sessions.begin() as s:
            if cast(CursorResult[Any], s.execute(stmt)).rowcount == 1:
                return True
            if s.scalar(select(UsageLedger.id).where(UsageLedger.job_id == job_id)) is None:
                raise JobNotFound(f"no ledger row for job {job_id!r}", details={"job_id": job_id})
            return False

    @staticmethod
    def _as_reservation(row: UsageLedger, user_id: str, *, new: bool) -> Reservation:
        if row.user_id != user_id:
            raise JobIdConflict(f"job_id {row.job_id!r} is already taken by another user",
                                field="job_id")
        return Reservation(row.job_id, row.user_id, row.model, row.requested_seconds,
                           LedgerStatus(row.status), row.created_at, new, row.request_hash)
