"""Per-user job quotas and the usage ledger, in SQL (SQLite or PostgreSQL)."""

from pipeline.quota.migrate import current, upgrade
from pipeline.quota.rollup import daily_usage, roll_up
from pipeline.quota.store import Charge, QuotaStore, Reservation, UsageSummary
from pipeline.quota.tables import DailyUsageRow, LedgerRow, LedgerStatus, make_engine
from pipeline.quota.windows import (
    DEFAULT_TIERS,
    UNLIMITED,
    SecondsUsage,
    TierLimits,
    WindowUsage,
)

__all__ = [
    # the store and what it returns
    "QuotaStore", "Charge", "Reservation", "UsageSummary", "WindowUsage", "SecondsUsage", "LedgerRow", "LedgerStatus",
    # limits
    "TierLimits", "DEFAULT_TIERS", "UNLIMITED",
    # daily roll-ups of the ledger
    "roll_up", "daily_usage", "DailyUsageRow",
    # the database
    "make_engine", "upgrade", "current",
]
