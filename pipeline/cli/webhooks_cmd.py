"""`musicgen-pipeline webhooks JOB_ID`: how a job's end webhook went (status, attempts, error)."""

from __future__ import annotations

import dataclasses
import json

import typer

from pipeline.cli.common import EnvOption, JsonOption, SetsOption, fail, load_or_exit, parse_sets
from pipeline.errors import PipelineError


def webhooks(
    job_id: str = typer.Argument(..., help="the job whose webhook to show"),
    as_json: JsonOption = False,
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """One line per delivery: status, attempts, the receiver's last answer, the URL."""
    from pipeline.client.handle import JobHandle
    from pipeline.client.registry import registry_for
    from pipeline.infra.celery_app import make_celery

    settings = load_or_exit(env, parse_sets(sets))
    app = make_celery(settings)
    try:
        rows = JobHandle(job_id, app, registry_for(app)).webhook_deliveries()
    except PipelineError as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps([dataclasses.asdict(r) for r in rows], indent=2))
        return
    if not rows:
        typer.echo(f"job {job_id}: no webhook recorded (none asked for, not ended yet, or "
                   "expired after broker.result_expires)")
    for row in rows:
        answer = f"HTTP {row.last_status}" if row.last_status else (row.last_error or "-")
        typer.echo(f"job {job_id}: {row.event} {row.status} after {row.attempts} attempt(s), "
                   f"last answer {answer}, to {row.url}")
