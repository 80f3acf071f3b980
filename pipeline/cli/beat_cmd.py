"""`musicgen-pipeline beat`: Celery beat sending the periodic maintenance sweeps.

The command execs ``celery -A pipeline.ops.monitor_app beat`` (the light app: beat sends by name
and never imports torch) with its schedule file under ``app.data_dir``. Run exactly one beat
per deployment: two would send every sweep twice.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

import typer

from pipeline.cli.common import EnvOption, SetsOption
from pipeline.config import Settings


def schedule_path(settings: Settings) -> Path:
    """Beat's schedule file (when each entry last ran), created under ``app.data_dir``."""
    folder = Path(settings.app.data_dir).expanduser().resolve() / "beat"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / "celerybeat-schedule"


def beat_argv(settings: Settings, *, loglevel: str | None = None) -> list[str]:
    """The ``celery beat`` command line these settings call for.

    On Redis, beat answers ``celery inspect ping -d celerybeat@<host>`` (and stops answering
    when its scheduler stalls): that is its health check.
    """
    quiet = ["--quiet"] if settings.logging.format == "json" else []  # no banner: JSON lines only
    argv = [sys.executable, "-m", "celery", *quiet, "-A", "pipeline.ops.monitor_app", "beat",
            "--schedule", str(schedule_path(settings)),
            "--loglevel", (loglevel or settings.app.log_level).upper()]
    if settings.broker.url is not None:  # the embedded broker has no control fanout
        argv.append("--enable-remote-control")
    return argv


def beat(
    env: EnvOption = None,
    sets: SetsOption = None,
    loglevel: str = typer.Option(None, "--loglevel", "-l"),
) -> None:
    """Start Celery beat: it sends the maintenance sweeps to the musicgen.maintenance queue.

    Every 15 minutes: remove what lies under storage.temp_dir untouched for an hour, or for
    worker.hard_time_limit if longer (a crashed job's leftovers). Every hour: delete outputs
    and their .json sidecars older than storage.retention_days. A sweep beat has never sent
    runs at once. Every worker consumes the maintenance queue besides its model queue. Run
    one beat per deployment; its schedule file is under app.data_dir/beat.
    """
    from pipeline.cli.common import load_or_exit, parse_sets
    from pipeline.cli.worker_cmd import override_env

    overrides = parse_sets(sets)
    settings = load_or_exit(env, overrides)
    child_env = {**os.environ, **override_env(overrides)}
    if env:
        child_env["MUSICGEN_ENV"] = env
    argv = beat_argv(settings, loglevel=loglevel)
    os.execve(argv[0], argv, child_env)


# Typer's rich help keeps a docstring's line breaks after the first paragraph: unwrap each one.
beat.__doc__ = "\n\n".join(" ".join(p.split())
                           for p in inspect.cleandoc(beat.__doc__ or "").split("\n\n"))
