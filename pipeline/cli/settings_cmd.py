"""``musicgen-pipeline settings``: validate, show, diff, export and check the layered settings.

Every command loads the layers the way a service does (``pipeline.config.load_layered``) and
takes the same options: ``--env``, ``--file`` (repeatable), ``--set section.key=value``
(repeatable, the value parsed as TOML like an environment variable). Exit codes: 0 ok, 1 invalid
settings or a failed check, 2 a usage error. Secret values show as ``**********``; only
``export --reveal-secrets`` prints them.
"""

from __future__ import annotations

import difflib
import inspect
import json
import os
import re
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pipeline.cli.common import JsonOption, SetsOption, parse_sets
from pipeline.config import layers
from pipeline.config.export import leaves, to_env, to_k8s
from pipeline.config.loader import LayeredSettings, load_layered
from pipeline.config.problem import MASK
from pipeline.config.report import SECRET_PATHS, Report
from pipeline.config.schema import Environment, Settings
from pipeline.errors import SettingsError

settings_app = typer.Typer(
    help="Validate, inspect, export and health-check the layered settings.",
    no_args_is_help=True,
)

Command = TypeVar("Command", bound=Callable[..., None])


def _command(name: str | None = None) -> Callable[[Command], Command]:
    """Register a command with its docstring as help, each paragraph unwrapped to one line
    (Typer's rich help keeps the docstring's line breaks after the first paragraph)."""
    def register(fn: Command) -> Command:
        paragraphs = inspect.cleandoc(fn.__doc__ or "").split("\n\n")
        settings_app.command(name, help="\n\n".join(" ".join(p.split()) for p in paragraphs))(fn)
        return fn
    return register


# --- common options -------------------------------------------------------------------------

EnvOption = Annotated[Environment | None, typer.Option(
    "--env", "-e", show_default=False,
    help="Environment section to load (default: $MUSICGEN_ENV, else development).")]
FileOption = Annotated[list[Path] | None, typer.Option(
    "--file", "-f", exists=True, dir_okay=False, show_default=False, metavar="PATH",
    help="Extra settings file above the others (repeatable; last one wins).")]


def _load(env: Environment | str | None, files: list[Path] | None, sets: list[str] | None) -> LayeredSettings:
    overrides = parse_sets(sets)
    name = env.value if isinstance(env, Environment) else env
    try:
        return load_layered(name, files=files or (), overrides=overrides)
    except SettingsError as exc:
        _fail(exc.message)


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(message, err=True)
    raise typer.Exit(code)


# --- output -----------------------------------------------------------------------------------

def _table(columns: list[str], rows: list[list[str]], title: str | None = None,
           styles: dict[str, str] | None = None) -> None:
    """A rich table on a terminal; plain aligned columns (never wrapped) when piped or captured."""
    console = Console()
    if console.is_terminal:
        table = Table(title=title, title_justify="left")
        for column in columns:
            table.add_column(column, overflow="fold")
        for row in rows:
            style = (styles or {}).get(row[0], "")
            table.add_row(*(Text(cell, style=style) for cell in row))  # Text: no markup parsing
        console.print(table)
        return
    if title:
        typer.echo(title)
    widths = [max(len(r[i]) for r in [columns, *rows]) for i in range(len(columns))]
    for row in [columns, *rows]:
        # The last column is not padded, so the pairs stop one short of the widths.
        padded = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)]
        typer.echo("  ".join([*padded, row[-1]]))


def _shown(path: str, value: Any) -> Any:
    """The value as the CLI may print it: secrets masked, enums as their value."""
    if path in SECRET_PATHS and value not in (None, ""):
        return MASK
    return value.value if isinstance(value, Enum) else value


def _cell(value: Any) -> str:
    if value is None:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))


def _effective(layered: LayeredSettings) -> dict[str, Any]:
    """Every leaf with its effective value; schema defaults filled in even when invalid."""
    if layered.settings is not None:
        return dict(leaves(layered.settings.model_dump()))
    merged = dict(leaves(Settings().model_dump()))
    merged.update(leaves(layered.raw))
    return merged


def _print_report(report: Report, *, to_stderr: bool) -> None:
    typer.echo(report.text(), err=to_stderr)


def _layers_line(layered: LayeredSettings) -> str:
    return f"environment: {layered.env}; layers: " + ", ".join(label for label, _ in layered.files)


# --- commands ---------------------------------------------------------------------------------

@_command()
def validate(env: EnvOption = None, file: FileOption = None, set_: SetsOption = None,
             as_json: JsonOption = False) -> None:
    """Load and validate every layer; list every error (path, value, rule, fix) and warning.

    Exit 0 when valid (warnings allowed), 1 when any error is found.
    """
    layered = _load(env, file, set_)
    if as_json:
        _json({"valid": layered.report.ok, "environment": layered.env,
               "layers": [label for label, _ in layered.files], **layered.report.as_dicts()})
    else:
        typer.echo(_layers_line(layered), err=not layered.report.ok)
        _print_report(layered.report, to_stderr=not layered.report.ok)
    if not layered.report.ok:
        raise typer.Exit(1)


@_command()
def show(env: EnvOption = None, file: FileOption = None, set_: SetsOption = None,
         key: Annotated[str | None, typer.Option(
             "--key", "-k", help="One dotted key, or a section (e.g. model).")] = None,
         as_json: JsonOption = False) -> None:
    """Print each effective value (secrets masked) and the layer it came from.

    Invalid settings are still shown, with the error report on stderr and exit code 1.
    """
    layered = _load(env, file, set_)
    values = _effective(layered)
    if key is not None:
        wanted = {k: v for k, v in values.items() if k == key or k.startswith(key + ".")}
        if not wanted:
            names = sorted(set(values) | {k.split(".")[0] for k in values})
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise typer.BadParameter(f"no key {key!r}{hint}", param_hint="--key")
        values = wanted
    rows = {k: {"value": _shown(k, v), "source": layered.source_of(k)} for k, v in values.items()}
    if as_json:
        _json({"environment": layered.env, "valid": layered.report.ok, "settings": rows})
    else:
        _table(["KEY", "VALUE", "SOURCE"], [[k, _cell(r["value"]), r["source"]] for k, r in rows.items()],
               title=_layers_line(layered))
    if not layered.report.ok:
        _print_report(layered.report, to_stderr=True)
        raise typer.Exit(1)


def file_schema() -> dict[str, Any]:
    """JSON Schema of a settings *file*: Dynaconf sections, each a partial settings tree."""
    model = Settings.model_json_schema()
    defs = model.pop("$defs", {})
    defs["Settings"] = model

    def partial(node: Any) -> None:  # a layer sets some keys, never all: nothing is required
        if isinstance(node, dict):
            node.pop("required", None)
            for value in node.values():
                partial(value)
        elif isinstance(node, list):
            for value in node:
                partial(value)

    partial(defs)
    sections = {"default": "applies in every environment"}
    sections.update({env: f"applies only when MUSICGEN_ENV={env}" for env in layers.ENVIRONMENTS})
    sections["global"] = "applies everywhere, above the environment section"
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "musicgen-pipeline settings file",
        "description": "settings.toml, presets, profiles, settings.local.toml, .secrets.toml, --file",
        "type": "object",
        "properties": {name: {"$ref": "#/$defs/Settings", "description": text}
                       for name, text in sections.items()},
        "additionalProperties": False,
        "$defs": defs,
    }


@_command()
def schema(output: Annotated[Path | None, typer.Option(
        "--output", "-o", dir_okay=False, help="Write to this file instead of stdout.")] = None) -> None:
    """JSON Schema of the settings files, for editor completion.

    With Even Better TOML (taplo), start a file with: #:schema ./musicgen-settings.schema.json
    """
    text = json.dumps(file_schema(), indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
        return
    output.write_text(text, encoding="utf-8")
    typer.echo(f"wrote {output}")


def _environment_descriptions() -> dict[str, str]:
    # settings.toml introduces each environment section with "# --- name: what it is ---".
    text = (layers.settings_dir() / "settings.toml").read_text(encoding="utf-8")
    found = dict(re.findall(r"^# -+ (\w+): (.*?)\s*-*$", text, flags=re.MULTILINE))
    return {env: found.get(env, "") for env in layers.ENVIRONMENTS}


@_command("list")
def list_(as_json: JsonOption = False) -> None:
    """The environments, model presets and deployment profiles, one line each."""
    groups = {"environments": _environment_descriptions(), "presets": layers.available("models"),
              "profiles": layers.available("profiles")}
    if as_json:
        _json(groups)
        return
    rows = [[kind[:-1], name, text] for kind, items in groups.items() for name, text in items.items()]
    _table(["KIND", "NAME", "DESCRIPTION"], rows)
    typer.echo("choose with MUSICGEN_ENV / --env, model.preset, app.profile")


@_command()
def diff(env_a: Annotated[Environment, typer.Argument(metavar="ENV_A")],
         env_b: Annotated[Environment, typer.Argument(metavar="ENV_B")],
         file: FileOption = None, set_: SetsOption = None, as_json: JsonOption = False) -> None:
    """The keys whose effective values differ between two environments (secrets masked).

    Exit 1 if either side is invalid (the differences are still printed).
    """
    a, b = _load(env_a, file, set_), _load(env_b, file, set_)
    va, vb = _effective(a), _effective(b)
    keys = [k for k in dict.fromkeys([*va, *vb]) if va.get(k) != vb.get(k)]
    if as_json:
        _json({"a": a.env, "b": b.env, "differences": {
            k: {"a": _shown(k, va.get(k)), "b": _shown(k, vb.get(k)),
                "source_a": a.source_of(k), "source_b": b.source_of(k)} for k in keys}})
    elif keys:
        _table(["KEY", a.env, b.env], [[k, _cell(_shown(k, va.get(k))), _cell(_shown(k, vb.get(k)))]
                                       for k in keys])
    else:
        typer.echo(f"no differences between {a.env} and {b.env}")
    invalid = [side for side in (a, b) if not side.report.ok]
    for side in invalid:
        typer.echo(f"{side.env}: ", err=True, nl=False)
        _print_report(side.report, to_stderr=True)
    if invalid:
        raise typer.Exit(1)


class ExportFormat(str, Enum):
    env = "env"
    k8s = "k8s"


@_command()
def export(fmt: Annotated[ExportFormat, typer.Option("--format", help="env lines or Kubernetes YAML.")],
           env: EnvOption = None, file: FileOption = None, set_: SetsOption = None,
           name: Annotated[str, typer.Option(help="k8s: ConfigMap name; the Secret is NAME-secrets.")]
           = "musicgen-pipeline",
           reveal_secrets: Annotated[bool, typer.Option(
               "--reveal-secrets", help="Print real secret values (default: **********).")] = False,
           output: Annotated[Path | None, typer.Option(
               "--output", "-o", dir_okay=False, help="Write here (mode 600) instead of stdout.")] = None,
           ) -> None:
    """The effective settings as MUSICGEN_* variables (env) or a ConfigMap plus Secret (k8s).

    Values are TOML-encoded, as the loader reads MUSICGEN_SECTION__KEY variables back. Secret
    values (passwords) are masked as ********** unless --reveal-secrets is given: in the env
    form their lines are masked; in the k8s form the Secret holds only the secret keys, with
    ********** placeholders to fill in. Invalid settings are not exported (exit 1).
    """
    layered = _load(env, file, set_)
    if layered.settings is None:
        _print_report(layered.report, to_stderr=True)
        raise typer.Exit(1)
    if fmt is ExportFormat.env:
        text = "\n".join(to_env(layered.settings, reveal_secrets=reveal_secrets)) + "\n"
    else:
        text = to_k8s(layered.settings, name=name, reveal_secrets=reveal_secrets)
    if output is None:
        typer.echo(text, nl=False)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    typer.echo(f"wrote {output}")


_STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


@_command()
def check(env: EnvOption = None, file: FileOption = None, set_: SetsOption = None,
          as_json: JsonOption = False) -> None:
    """Health of what the settings describe: dirs, broker, database, ffmpeg, model, device.

    Creates the data, output and temp directories if missing. Exit 1 if any line fails.
    """
    from pipeline.config.checks import CheckResult, Status, run_checks

    layered = _load(env, file, set_)
    if layered.settings is None:
        _print_report(layered.report, to_stderr=True)
        raise typer.Exit(1)
    results = [CheckResult("settings", Status.ok, _layers_line(layered))]
    results += [CheckResult(p.path, Status.warn, f"{p.rule}; {p.fix}") for p in layered.report.warnings]
    results += run_checks(layered.settings)
    if as_json:
        _json([r.as_dict() for r in results])
    else:
        _table(["STATUS", "CHECK", "DETAIL"], [[r.status.value, r.name, r.detail] for r in results],
               styles=_STATUS_STYLE)
    if any(r.status is Status.fail for r in results):
        raise typer.Exit(1)


@_command()
def reload(env: EnvOption = None, file: FileOption = None, set_: SetsOption = None,
           timeout: Annotated[float, typer.Option(
               "--timeout", min=0.1, max=120, help="Seconds to wait for the workers' answers.")] = 5.0,
           as_json: JsonOption = False) -> None:
    """Tell every running worker to reload its settings now, and print each answer.

    Each worker loads its own layers again (the files and environment it was started with),
    validates them in full, and applies the change whole, or refuses it whole (invalid, or a key
    that needs a restart: broker, database, model preset, device) and keeps the settings it
    has. These options only say where the broker is. Exit 1 when a worker refused or failed,
    or when no worker answered.
    """
    from pipeline.config.live import RELOAD_COMMAND
    from pipeline.infra.celery_app import make_celery

    layered = _load(env, file, set_)
    if layered.settings is None:
        _print_report(layered.report, to_stderr=True)
        raise typer.Exit(1)
    app = make_celery(layered.settings)
    if app.embedded:
        _fail("the embedded development broker has no remote control: send SIGHUP to the "
              "worker process, or let it see the file change (app.settings_poll_interval)")
    try:
        replies = app.control.broadcast(RELOAD_COMMAND, reply=True, timeout=timeout)
    except Exception as exc:  # kombu/redis connection errors
        _fail(f"the broker is unreachable: {type(exc).__name__}")
    answers = {node: answer for reply in replies or [] for node, answer in reply.items()}
    if as_json:
        _json(answers)
    else:
        rows = [[node, str(a.get("outcome")), str(a.get("message", "")).splitlines()[0]]
                for node, a in sorted(answers.items())]
        _table(["WORKER", "OUTCOME", "DETAIL"], rows)
        for node, a in sorted(answers.items()):
            if a.get("errors"):
                typer.echo(f"{node}:\n" + "\n".join(f"  {line}" for line in a["errors"]), err=True)
    if not answers:
        _fail(f"no worker answered within {timeout:g} s")
    if any(a.get("outcome") not in ("applied", "unchanged") for a in answers.values()):
        raise typer.Exit(1)
