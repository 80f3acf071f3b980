"""`musicgen-pipeline quota show|set`: one user's job quota, read from and written to the ledger DB.

Limits of -1 mean unlimited and are shown as ``unlimited`` (text and JSON alike), so nobody
reads "-1 jobs left". ``set`` with no ``--daily``/``--monthly`` puts the user back on the tier's
own limits.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer

from pipeline.cli.common import EnvOption, JsonOption, SetsOption, load_or_exit, parse_sets
from pipeline.cli.db_cmd import with_store
from pipeline.config.schema import Settings

if TYPE_CHECKING:
    from pipeline.quota import QuotaStore, SecondsUsage, UsageSummary, WindowUsage

quota_app = typer.Typer(help="Per-user job quotas: show usage, set a tier or limits.",
                        no_args_is_help=True)

UNLIMITED_TEXT = "unlimited"


def _window(w: WindowUsage | SecondsUsage) -> dict[str, Any]:
    unlimited = w.remaining is None
    return {"used": w.used, "limit": UNLIMITED_TEXT if unlimited else w.limit,
            "remaining": UNLIMITED_TEXT if unlimited else w.remaining,
            "resets_at": w.resets_at.isoformat()}


def usage_dict(summary: UsageSummary) -> dict[str, Any]:
    """The JSON form of ``quota show``."""
    data: dict[str, Any] = {"user_id": summary.user_id, "tier": summary.tier,
                            "daily": _window(summary.daily), "monthly": _window(summary.monthly)}
    for name in ("daily_seconds", "monthly_seconds"):
        seconds = getattr(summary, name)
        if seconds is not None:
            data[name] = _window(seconds)
    data["monthly_gpu_seconds"] = round(summary.monthly_gpu_seconds, 3)
    return data


def _print_usage(summary: UsageSummary, settings: Settings, as_json: bool) -> None:
    data = usage_dict(summary)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"user:    {data['user_id']}")
    typer.echo(f"tier:    {data['tier']}")
    for name in ("daily", "monthly"):
        w = data[name]
        left = "" if w["limit"] == UNLIMITED_TEXT else f" ({w['remaining']} left)"
        typer.echo(f"{name + ':':<8} {w['used']} / {w['limit']} jobs used{left}, "
                   f"resets at {w['resets_at']}")
    for name in ("daily", "monthly"):
        w = data.get(f"{name}_seconds")
        if w is not None and w["limit"] != UNLIMITED_TEXT:
            typer.echo(f"{name + ':':<8} {w['used']:g} / {w['limit']:g} s of audio used "
                       f"({w['remaining']:g} s left)")
    typer.echo(f"gpu:     {data['monthly_gpu_seconds']:g} GPU seconds this month")
    if not settings.quotas.enabled:
        typer.echo("note: quotas.enabled is false in these settings: every limit is unlimited")


@quota_app.command("show")
def show(
    user: str = typer.Argument(..., help="the user id jobs are charged to"),
    as_json: JsonOption = False,
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Tier, and jobs used of the limit today and this month, with when each resets."""
    settings = load_or_exit(env, parse_sets(sets))
    # Refused: unreachable, unmigrated, or a tier no longer configured.
    _print_usage(with_store(settings, lambda store: store.usage(user)), settings, as_json)


@quota_app.command("set")
def set_quota(
    user: str = typer.Argument(..., help="the user id jobs are charged to"),
    tier: str = typer.Option(..., "--tier", "-t", help="one of the configured quotas.tiers"),
    daily: int = typer.Option(None, "--daily", help="jobs per day; -1 = unlimited; "
                                                    "unset = the tier's limit"),
    monthly: int = typer.Option(None, "--monthly", help="jobs per month; -1 = unlimited; "
                                                        "unset = the tier's limit"),
    as_json: JsonOption = False,
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Put USER on a tier, optionally with their own daily/monthly limits; prints the result."""
    settings = load_or_exit(env, parse_sets(sets))

    def put(store: QuotaStore) -> UsageSummary:
        # Refused: an unknown tier (the message lists the tiers), a bad limit, the DB down.
        store.set_quota(user, tier=tier, daily=daily, monthly=monthly)
        return store.usage(user)

    _print_usage(with_store(settings, put), settings, as_json)
