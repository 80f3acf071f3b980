"""The light Celery app for Flower and beat: the shared factory's app without task code.

``celery -A workers ...`` builds the worker app, which imports the model runtime (torch,
transformers) to register the generation task. Flower only reads events and beat only sends
messages by name, so both load this module instead (``celery -A pipeline.ops.monitor_app``) and
never import torch. The maintenance task names and beat's schedule live here so that beat and
the workers (``workers/maintenance.py`` registers the tasks) agree without beat importing
worker code.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pipeline.config import Settings, load_settings
from pipeline.infra.celery_app import PipelineCelery, make_celery

MAINTENANCE_QUEUE = "musicgen.maintenance"
TASK_SWEEP_TEMP = "musicgen.maintenance.sweep_temp"
TASK_SWEEP_OUTPUTS = "musicgen.maintenance.sweep_outputs"
TASK_ROLLUP_LEDGER = "musicgen.maintenance.rollup_ledger"

SWEEP_TEMP_EVERY = timedelta(minutes=15)
SWEEP_OUTPUTS_EVERY = timedelta(hours=1)
ROLLUP_LEDGER_EVERY = timedelta(hours=1)
# An entry beat has never run (a fresh schedule file) is due at once: a node that comes back
# after a long outage sweeps on start instead of waiting a full interval. Beat keeps the last
# run of an entry it already knows in its schedule file; this only seeds new ones.
_NEVER = datetime(1970, 1, 1, tzinfo=UTC)

__all__ = ["MAINTENANCE_QUEUE", "TASK_ROLLUP_LEDGER", "TASK_SWEEP_OUTPUTS", "TASK_SWEEP_TEMP",
           "app", "maintenance_schedule", "make_monitor_app"]


def maintenance_schedule() -> dict[str, dict[str, Any]]:
    """Beat's entries: each sweep and the ledger roll-up on the maintenance queue, run once per
    interval.

    A message no worker takes within its interval expires: the next one does the same work,
    so a stopped worker pool does not come back to a pile of identical sweeps. (The roll-up
    redoes yesterday and today each time, so a skipped hour loses nothing either.)
    """
    entries = {TASK_SWEEP_TEMP: SWEEP_TEMP_EVERY, TASK_SWEEP_OUTPUTS: SWEEP_OUTPUTS_EVERY,
               TASK_ROLLUP_LEDGER: ROLLUP_LEDGER_EVERY}
    return {task: {"task": task, "schedule": every, "last_run_at": _NEVER,
                   "options": {"queue": MAINTENANCE_QUEUE, "expires": every.total_seconds()}}
            for task, every in entries.items()}


def make_monitor_app(settings: Settings) -> PipelineCelery:
    """The factory's app with beat's schedule; it registers no task (it sends by name)."""
    app = make_celery(settings, name="musicgen-monitor")
    app.conf.beat_schedule = maintenance_schedule()
    from pipeline.infra.log_format import connect_celery

    connect_celery(app)
    return app


app: PipelineCelery  # built on first access (below); ``celery -A pipeline.ops.monitor_app`` finds it


def __getattr__(name: str) -> Any:
    # Built on first access from the process's settings, as ``workers.app`` is: importing the
    # module (for its names) builds nothing.
    if name in ("app", "celery"):
        built = make_monitor_app(load_settings())
        globals()["app"] = globals()["celery"] = built
        return built
    raise AttributeError(name)
