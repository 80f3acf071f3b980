"""The quota store a process uses, built from Settings (one engine per process, after any fork)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config.schema import Settings
from pipeline.config.urls import with_password
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


def store_for(settings: Settings, *, migrate: bool = True) -> QuotaStore:
    """The quota store these settings describe (``close()`` it when done, if short-lived).

    A SQLite database is the embedded default with nothing to install, so it is created and
    migrated on first use unless ``migrate`` is False (readers such as `stats` must not create
    an empty file); PostgreSQL is migrated by the operator (`musicgen-pipeline db upgrade`).
    """
    url = database_url(settings)
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if migrate:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            upgrade(url)
        engine = make_engine(url)
    else:
        engine = make_engine(url, pool_size=settings.database.pool_size)
    q = settings.quotas
    # With quotas off the ledger still records every job (stats read it); nobody is refused.
    tiers = {name: TierLimits(daily=t.daily, monthly=t.monthly) if q.enabled else TierLimits(-1, -1)
             for name, t in q.tiers.items()}
    return QuotaStore(engine, tiers=tiers, default_tier=q.default_tier, timezone=q.timezone)
