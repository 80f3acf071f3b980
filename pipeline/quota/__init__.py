"""Per-user job quotas and the usage ledger, in SQL (SQLite or PostgreSQL)."""

from pipeline.quota.migrate import current, upgrade
from pipeline.quota.store import QuotaStore, Reservation, UsageSummary
from pipeline.quota.tables import LedgerRow, LedgerStatus, make_engine
from pipeline.quota.windows import DEFAULT_TIERS, UNLIMITED, TierLimits, WindowUsage

__all__ = [
    # the store and what it returns
    "QuotaStore", "Reservation", "UsageSummary", "WindowUsage", "LedgerRow", "LedgerStatus",
    # limits
    "TierLimits", "DEFAULT_TIERS", "UNLIMITED",
    # the database
    "make_engine", "upgrade", "current",
]
