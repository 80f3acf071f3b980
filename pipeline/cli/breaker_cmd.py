"""`musicgen-pipeline breaker status|reset`: the shared circuit breakers, one per model preset."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli.common import EnvOption, JsonOption, SetsOption, load_or_exit, parse_sets
from pipeline.config.layers import available
from pipeline.errors import PipelineError

breaker_app = typer.Typer(help="Inspect or reset the circuit breakers shared by all workers.",
                          no_args_is_help=True)


def _policies(env: str | None, sets: list[str] | None):  # type: ignore[no-untyped-def]
    from pipeline.infra.celery_app import make_celery
    from pipeline.policies.configured import Policies

    settings = load_or_exit(env, parse_sets(sets))
    if settings.broker.url is None:
        typer.echo("note: embedded broker: breakers live inside the one worker process", err=True)
    return Policies.for_app(make_celery(settings))


@breaker_app.command("status")
def status(
    model: list[str] = typer.Option([], "--model", "-m", help="presets to show (default: all)"),
    as_json: JsonOption = False,
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """State, consecutive failures and time to the next probe of each model's breaker."""
    policies = _policies(env, sets)
    rows = []
    try:
        for preset in model or list(available("models")):
            breaker = policies.breaker(preset)
            rows.append(breaker.status() if breaker else {"breaker": preset, "state": "disabled"})
    except PipelineError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("model", "state", "failures", "retry after (s)", "probe running")
    for row in rows:
        table.add_row(row["breaker"], row["state"], str(row.get("failures", "")),
                      f"{row.get('retry_after') or 0:.1f}", str(row.get("probe_running", "")))
    Console().print(table)


@breaker_app.command("reset")
def reset(
    model: str = typer.Argument(..., help="the preset whose breaker to close"),
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Close a breaker by hand (after fixing the cause) so jobs flow again at once."""
    breaker = _policies(env, sets).breaker(model)
    if breaker is None:
        typer.echo("circuit breakers are disabled in these settings", err=True)
        raise typer.Exit(1)
    breaker.reset()
    typer.echo(f"{model}: closed")
