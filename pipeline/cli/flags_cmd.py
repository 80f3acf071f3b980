"""`musicgen-pipeline flags list|check`: the per-user feature flags and one user's decision.

``list`` shows each flag of ``pipeline.contract.flags.FLAGS`` with its value (a boolean or a rule's
summary), the settings layer it came from, what it switches and who reads it. ``check`` decides
one flag for one user with the reason; the user's tier is ``--tier``, else the quota database's
(the default tier, with a note, when that database cannot be read). Exit codes: 0 ok, 1 invalid
settings, 2 a usage error (an unknown flag name, with a did-you-mean).
"""

from __future__ import annotations

import difflib
import json
from typing import Any

import typer

from pipeline.cli.common import EXIT_FAILED, EnvOption, JsonOption, SetsOption, fail, parse_sets
from pipeline.config.loader import LayeredSettings, load_layered
from pipeline.config.schema import Settings
from pipeline.contract.flags import FLAGS, FlagRule, decide, summary
from pipeline.contract.user_context import UserContext
from pipeline.errors import PipelineError

EXIT_USAGE = 2  # Click's code for a usage error

flags_app = typer.Typer(help="Per-user feature flags: list them, or decide one for a user.",
                        no_args_is_help=True)


def _load(env: str | None, sets: list[str] | None) -> tuple[LayeredSettings, Settings]:
    """The settings and their layers (for sources), or the report on stderr and exit 1."""
    try:
        layered = load_layered(env, overrides=parse_sets(sets))
    except PipelineError as exc:
        fail(exc)
    if layered.settings is None:
        typer.echo(layered.report.text(), err=True)
        raise typer.Exit(EXIT_FAILED)
    return layered, layered.settings


def _source(layered: LayeredSettings, name: str, value: bool | FlagRule) -> str:
    """The layers that set the flag: a rule's keys may come from several (merged tables)."""
    keys = [f"features.{name}"]
    if isinstance(value, FlagRule):
        keys += [f"features.{name}.{key}" for key in FlagRule.model_fields]
    sources = list(dict.fromkeys(layered.source_of(key) for key in keys))
    set_by_layers = [s for s in sources if s != "default (schema)"]
    return ", ".join(set_by_layers or sources)


@flags_app.command("list")
def list_flags(
    as_json: JsonOption = False,
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Each per-user flag: its value or rule, where it was set, what it does, who reads it."""
    layered, settings = _load(env, sets)
    rows: list[dict[str, Any]] = []
    for name, info in FLAGS.items():
        value = getattr(settings.features, name)
        rows.append({"flag": name, "value": summary(value),
                     "rule": value.model_dump() if isinstance(value, FlagRule) else value,
                     "source": _source(layered, name, value), "description": info.description,
                     "reader": info.reader})
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    width = max(len(row["flag"]) for row in rows)
    for row in rows:
        typer.echo(f"{row['flag']:<{width}}  {row['value']}  (from {row['source']})")
        typer.echo(f"{'':<{width}}  {row['description']}; read by {row['reader']}")


def _tier(settings: Settings, user: str) -> tuple[str, str | None]:
    """The user's quota tier and, when the database could not say, a note why the default."""
    from sqlalchemy.exc import SQLAlchemyError

    from pipeline.cli.db_cmd import describe_error
    from pipeline.quota.configured import store_for

    try:
        store = store_for(settings)
        try:
            return store.tier_of(user), None
        finally:
            store.close()
    except (PipelineError, SQLAlchemyError, OSError) as exc:
        default = settings.quotas.default_tier
        reason = exc.message if isinstance(exc, PipelineError) else describe_error(exc, settings)
        return default, (f"note: the quota database could not be read ({reason}); "
                         f"using the default tier {default}")


@flags_app.command("check")
def check(
    name: str = typer.Argument(..., metavar="NAME", help="the flag, e.g. melody_conditioning"),
    user: str = typer.Option(..., "--user", "-u", help="the user id to decide for"),
    tier: str = typer.Option(None, "--tier", "-t",
                             help="the user's quota tier (default: read from the quota database)"),
    as_json: JsonOption = False,
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Is flag NAME on for --user, and why (kill switch, deny/allow list, tier, bucket)."""
    if name not in FLAGS:  # checked before loading anything: a typo is a usage error
        close = difflib.get_close_matches(name, list(FLAGS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known flags: {', '.join(FLAGS)}"
        # One plain line (not Click's boxed usage error, which wraps the hint at the width).
        typer.echo(f"error: no flag {name!r}; {hint}", err=True)
        raise typer.Exit(EXIT_USAGE)
    _, settings = _load(env, sets)
    note = None
    if tier is None:
        tier, note = _tier(settings, user)
    decision = decide(settings.features, name, UserContext(user, tier))
    if note is not None:
        typer.echo(note, err=True)
    if as_json:
        typer.echo(json.dumps({"flag": name, "user": user, "tier": tier, "enabled": decision.enabled,
                               "reason": decision.reason, "tier_note": note}, indent=2))
        return
    typer.echo(f"{name}: {'on' if decision.enabled else 'off'} for {user} (tier {tier}): "
               f"{decision.reason}")
