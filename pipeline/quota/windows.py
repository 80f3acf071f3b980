"""Day and month quota windows in a configured time zone, and the limits that apply to them.

A quota day runs from local midnight to the next local midnight, a quota month from 00:00 on
the 1st to 00:00 on the next 1st, both in the deployment's zone (``zoneinfo``). The ledger stores
UTC instants, so every window is handed back as a pair of UTC datetimes. UTC rather than the
local zone on purpose: Python subtracts and compares two datetimes that share a tzinfo by wall
clock, which is wrong across daylight-saving changes (a local day may last 23 or 25 hours).
Convert to the zone only for display.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

__all__ = ["DEFAULT_TIERS", "UNLIMITED", "SecondsUsage", "TierLimits", "Window", "WindowUsage",
           "day_window", "month_window", "resolve_zone"]

UNLIMITED = -1


@dataclass(frozen=True)
class TierLimits:
    """Jobs, and seconds of audio, allowed per local day and per local month; ``UNLIMITED``
    (-1) never refuses. Seconds count what a job asked for while it is open and what it made
    once it succeeded; a failed, timed-out or cancelled job gives them back."""

    daily: int
    monthly: int
    daily_seconds: float = UNLIMITED
    monthly_seconds: float = UNLIMITED

    def __post_init__(self) -> None:
        for name in ("daily", "monthly", "daily_seconds", "monthly_seconds"):
            if getattr(self, name) < UNLIMITED:
                raise ValueError(f"{name} limit must be >= 0, or -1 for unlimited")


# The tiers the product documents; deployments pass their own from settings.
DEFAULT_TIERS: Mapping[str, TierLimits] = {
    "free": TierLimits(daily=10, monthly=100),
    "premium": TierLimits(daily=100, monthly=1000),
    "enterprise": TierLimits(daily=UNLIMITED, monthly=UNLIMITED),
}


@dataclass(frozen=True)
class WindowUsage:
    """Jobs counted in one window, its limit (-1 = unlimited) and when it resets."""

    used: int
    limit: int
    resets_at: datetime

    @property
    def remaining(self) -> int | None:
        """Jobs still allowed in this window; None when unlimited."""
        return None if self.limit == UNLIMITED else max(self.limit - self.used, 0)


@dataclass(frozen=True)
class SecondsUsage:
    """Seconds of audio counted in one window, its limit (-1 = unlimited) and when it resets."""

    used: float
    limit: float
    resets_at: datetime

    @property
    def remaining(self) -> float | None:
        """Seconds still allowed in this window; None when unlimited."""
        return None if self.limit == UNLIMITED else max(self.limit - self.used, 0.0)


@dataclass(frozen=True)
class Window:
    """A half-open interval ``[start, end)`` in UTC; ``end`` is when the window resets."""

    start: datetime
    end: datetime

    def __contains__(self, instant: datetime) -> bool:
        return self.start <= instant < self.end


def resolve_zone(name: str) -> ZoneInfo:
    """Return the zone called ``name``; raise ``ValueError`` naming it when it is unknown."""
    try:
        return ZoneInfo(name)
    except (KeyError, ValueError, OSError) as e:  # ZoneInfoNotFoundError is a KeyError
        raise ValueError(f"unknown time zone {name!r}; use an IANA name like 'Europe/Paris'") from e


def _local_midnight(day: date, zone: ZoneInfo) -> datetime:
    # Where midnight does not exist (a DST jump at 00:00), zoneinfo reads it with the
    # pre-transition offset, which lands on the real first instant of the day.
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def _require_aware(now: datetime) -> None:
    # A naive clock would silently be read as the host's local time; refuse it instead.
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"expected a timezone-aware datetime, got naive {now.isoformat()}")


def day_window(now: datetime, zone: ZoneInfo) -> Window:
    """Return the local day in ``zone`` that holds ``now`` (aware), as UTC bounds."""
    _require_aware(now)
    today = now.astimezone(zone).date()
    return Window(_local_midnight(today, zone), _local_midnight(today + timedelta(days=1), zone))


def month_window(now: datetime, zone: ZoneInfo) -> Window:
    """Return the calendar month in ``zone`` that holds ``now`` (aware), as UTC bounds."""
    _require_aware(now)
    first = now.astimezone(zone).date().replace(day=1)
    following = (first + timedelta(days=32)).replace(day=1)
    return Window(_local_midnight(first, zone), _local_midnight(following, zone))
