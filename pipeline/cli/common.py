"""What every command shares: the --env/--set/--json options, loading settings or exiting
with the report, parsing --set."""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, NoReturn

import typer

from pipeline.config import Settings, load_layered
from pipeline.errors import PipelineError

EXIT_FAILED = 1

# The options of every command that loads settings (``settings`` has its own --env, typed by
# the Environment enum, and --file).
EnvOption = Annotated[str | None, typer.Option("--env", "-e", show_default=False,
                                               help="development | staging | production")]
SetsOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="SECTION.KEY=VALUE", show_default=False,
    help="Override one key, highest precedence (repeatable); VALUE is parsed as TOML.")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]


def parse_sets(items: Sequence[str] | None) -> dict[str, str]:
    """``["model.preset=tiny"]`` -> ``{"model.preset": "tiny"}``; values are parsed as TOML later."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", key):
            raise typer.BadParameter(f"{item!r}: expected SECTION.KEY=VALUE, e.g. model.device=cpu",
                                     param_hint="--set")
        out[key.lower()] = value
    return out


def load_or_exit(env: str | None, overrides: Mapping[str, Any], files: Sequence[str] = ()) -> Settings:
    """The validated settings, or the full report on stderr and exit code 1."""
    try:
        layered = load_layered(env, files=files, overrides=overrides)
    except PipelineError as exc:
        fail(exc)
    if layered.settings is None:
        typer.echo(layered.report.text(), err=True)
        raise typer.Exit(EXIT_FAILED)
    return layered.settings


def fail(exc: PipelineError) -> NoReturn:
    """Print a pipeline error as one clear line (code first, for scripts) and exit 1."""
    typer.echo(f"error: {exc}", err=True)
    sys.stderr.flush()
    raise typer.Exit(EXIT_FAILED)
