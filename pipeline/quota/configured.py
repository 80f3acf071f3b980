"""The quota store a process uses, built from Settings (one engine per process, after any fork)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.exc import DataError, SQLAlchemyError

from pipeline.config.schema import Settings
from pipeline.config.urls import with_password
from pipeline.errors import InvalidRequest, PipelineError, ServiceUnavailable
from pipeline.quota.migrate import upgrade
from pipeline.quota.store import QuotaStore
from pipeline.quota.tables import make_engine
from pipeline.quota.windows import TierLimits


def database_url(settings: Settings) -> str:
    """``database.url`` with the password put in from its secret (the setting never holds it)."""
    return with_password(settings.database.url, settings.database.password)


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///path`` URL (None for other databases and in-memory SQLite)."""
    path = url.split(":///", 1)[1] if url.startswith("sqlite") and ":///" in url else ""
    return Path(path).expanduser() if path and path != ":memory:" else None


UPGRADE_HINT = "run `musicgen-pipeline db upgrade` with the same settings to create it"


def prepare_database(settings: Settings) -> None:
    """Create the schema (and a SQLite file's folder) or bring it to head: the explicit step
    that ``db upgrade`` and the embedded default's set-up take. Idempotent."""
    url = database_url(settings)
    path = sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
    upgrade(url)


def store_for(settings: Settings, *, migrate: bool = False) -> QuotaStore:
    """The quota store these settings describe (``close()`` it when done, if short-lived).

    Building a store has no side effect by default: a SQLite file that is not there is a
    ``ServiceUnavailable`` naming ``musicgen-pipeline db upgrade`` (connecting would create an
    empty file), and a database without the schema is reported the same way by the first call
    that needs it (``QuotaStore.schema_ready``). ``migrate=True`` runs ``prepare_database``
    first, for the processes whose start is the operator's explicit step.
    """
    url = database_url(settings)
    if migrate:
        prepare_database(settings)
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise ServiceUnavailable(f"no quota database: no SQLite file at {path} (database.url); "
                                 f"{UPGRADE_HINT}", "database.url")
    if url.startswith("sqlite"):
        engine = make_engine(url)
    else:
        engine = make_engine(url, pool_size=settings.database.pool_size)
    q = settings.quotas
    # With quotas off the ledger still records every job (stats read it); nobody is refused.
    tiers = {name: TierLimits(daily=t.daily, monthly=t.monthly, daily_seconds=t.daily_seconds,
                              monthly_seconds=t.monthly_seconds)
             if q.enabled else TierLimits(-1, -1) for name, t in q.tiers.items()}
    return QuotaStore(engine, tiers=tiers, default_tier=q.default_tier, timezone=q.timezone)


def database_failure(exc: SQLAlchemyError, store: QuotaStore) -> PipelineError:
    """The typed error a caller gets for a database error in the quota path.

    Only the driver's exception class is named: its message can hold hosts, users or values.
    """
    reason = type(getattr(exc, "orig", None) or exc).__name__
    if isinstance(exc, DataError):  # a value the database cannot store (and validation missed)
        return InvalidRequest(f"the quota database refused a value of this request ({reason})",
                              "request")
    if store.schema_ready() is False:
        return ServiceUnavailable(f"the quota database has no schema; {UPGRADE_HINT}",
                                  "database.url")
    return ServiceUnavailable(f"the quota database is unavailable ({reason})", None,
                              {"retry_after": 5})
