"""`musicgen-pipeline workers list|recover`: worker heartbeats and the jobs each one holds.

With a Redis broker every worker beats and records its held messages (workers/heartbeat.py);
live workers give a silent worker's jobs back by themselves (workers/recovery.py). These
commands show that record and let an operator recover a worker they know is dead at once.
"""

from __future__ import annotations

import json
from typing import Any

import typer

from pipeline.cli.common import EXIT_FAILED, EnvOption, JsonOption, SetsOption

workers_app = typer.Typer(help="Worker heartbeats, the jobs they hold, and recovering a dead "
                               "worker's jobs (Redis brokers).", no_args_is_help=True)


def _app(env: str | None, sets: list[str] | None) -> Any:
    from pipeline.cli.common import load_or_exit, parse_sets
    from pipeline.infra.celery_app import make_celery
    from workers.recovery import enabled_for

    settings = load_or_exit(env, parse_sets(sets))
    if not enabled_for(settings):
        typer.echo("heartbeat recovery is off: it needs a Redis broker (RabbitMQ requeues a lost "
                   "worker's jobs itself) and recovery.enabled = true", err=True)
        raise typer.Exit(EXIT_FAILED)
    return make_celery(settings)


@workers_app.command("list")
def list_workers(
    as_json: JsonOption = False,
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Each worker process: its last beat, alive or dead, the jobs it holds and the engine
    serving each of its models (static, or hf where the engine failed its self-check)."""
    from workers.recovery import dead_after, store_for

    app = _app(env, sets)
    now, records = store_for(app).records()
    limit = dead_after(app.settings)
    rows: list[dict[str, Any]] = [{"worker_id": r.worker_id, "hostname": r.hostname, "pid": r.pid,
             "silent_for": round(max(0.0, now - r.beat), 1),
             "state": "dead" if now - r.beat > limit else "alive",
             "jobs": sorted(r.held.values()), "engines": r.engines} for r in records]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        typer.echo("no worker is beating")
    for row in rows:
        jobs = ", ".join(row["jobs"]) or "no job"
        serves = "".join(f", serves {model} with {engine}"
                         for model, engine in sorted(row["engines"].items()))
        typer.echo(f"{row['worker_id']}  {row['state']}, last beat {row['silent_for']} s ago, "
                   f"holds {jobs}{serves}")


@workers_app.command("recover")
def recover(
    worker_id: str = typer.Argument(..., help="a worker id from `workers list`"),
    force: bool = typer.Option(False, "--force",
                               help="recover even if it beat recently (you know it is dead)"),
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Put a dead worker's unacked jobs back on their queues now."""
    from workers.recovery import dead_after, recover_worker, store_for

    app = _app(env, sets)
    done = recover_worker(app, store_for(app), worker_id, -1.0 if force else dead_after(app.settings))
    if done is None:
        typer.echo(f"{worker_id}: not recovered (unknown, already recovered, or it beat within "
                   f"{dead_after(app.settings):g} s: --force if you know it is dead)", err=True)
        raise typer.Exit(EXIT_FAILED)
    typer.echo(f"{worker_id}: silent for {done.silent_for:.1f} s; re-published "
               f"{len(done.restored)} job(s): {', '.join(sorted(done.restored.values())) or '-'}"
               f"; {len(done.gone)} already acked or redelivered")
