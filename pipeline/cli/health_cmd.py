"""`musicgen-pipeline health`: exit 0 when healthy, 1 with one line per reason otherwise.

Meant for a load-balancer probe, a Kubernetes exec probe or cron: it compares the error rate,
the deepest queue and the p95 end-to-end latency of the window with ``monitoring.*``, and fails
just as clearly when the broker or the database cannot be reached (a probe must not report a
service healthy because it could not look).

It also shows which engine serves each model on each live worker (``static``: our decode
engine, which checked itself against HF generate at start; ``hf``: HF generate), as the
workers' heartbeats record it (Redis brokers with ``recovery.enabled``). Serving with ``hf`` is
not unhealthy: it is slower, and the worker's log says why in one line.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import typer

from pipeline.cli.common import (
    EXIT_FAILED,
    EnvOption,
    JsonOption,
    SetsOption,
    load_or_exit,
    parse_sets,
)
from pipeline.cli.stats_cmd import read_broker, read_ledger, window_or_exit
from pipeline.config.schema import Settings
from pipeline.errors import ServiceUnavailable
from pipeline.ops.stats import Thresholds, compute_stats, health_problems
from pipeline.quota.tables import LedgerRow


def health(
    since: str = typer.Option("1h", "--since", help="window: 30m, 1h, 2d, 1w (s m h d w)"),
    as_json: JsonOption = False,
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Check error rate, backlog and p95 latency against monitoring.* thresholds (exit 0/1)."""
    window = window_or_exit(since)
    settings = load_or_exit(env, parse_sets(sets))
    m = settings.monitoring
    thresholds = Thresholds(error_rate_percent=m.error_rate_threshold_percent,
                            backlog=m.backlog_threshold, latency_seconds=m.latency_threshold)
    until = datetime.now(UTC)
    problems: list[str] = []
    rows: list[LedgerRow] | None = None
    try:
        rows = read_ledger(settings, until - window)
    except ServiceUnavailable as exc:
        problems.append(exc.message)
    # The broker's kind, version and queue depths, for both brokers (pipeline/infra/brokers.py).
    broker = read_broker(settings)
    if not broker.reachable:
        problems.append(f"broker unreachable at {broker.where}: {broker.error}")
    backlog = broker.depths if broker.reachable else dict.fromkeys(broker.depths)
    checks: dict[str, Any] = {"broker": broker.as_dict()}
    if rows is not None:  # without the ledger there is nothing to compare, only the outage
        report = compute_stats(rows, since=until - window, until=until, backlog=backlog)
        problems += health_problems(report, thresholds, since)
        deepest = report.max_backlog
        checks |= {
            "error_rate_percent": report.overall.error_rate_percent,
            "error_rate_threshold_percent": thresholds.error_rate_percent,
            "finished_jobs": report.overall.finished,
            "max_backlog": None if deepest is None else {"queue": deepest[0], "depth": deepest[1]},
            "backlog_threshold": thresholds.backlog,
            "latency_p95_seconds": report.overall.latency.p95,
            "latency_threshold_seconds": thresholds.latency_seconds,
        }
    checks["engines"] = read_engines(settings)
    if as_json:
        typer.echo(json.dumps({"healthy": not problems, "window": since, "problems": problems,
                               "checks": checks}, indent=2))
    elif problems:
        for line in problems:
            typer.echo(line)
    else:
        typer.echo(_healthy_line(checks, since))
        typer.echo(f"broker: {broker.line()}")
        if checks["engines"]:
            typer.echo("engines: " + "; ".join(
                f"{w['worker']}: " + ", ".join(f"{m} {e}" for m, e in sorted(w["engines"].items()))
                for w in checks["engines"]))
    if problems:
        raise typer.Exit(EXIT_FAILED)


def read_engines(settings: Settings) -> list[dict[str, Any]] | None:
    """Each live worker process's engine per model, from its heartbeat (``workers list``'s
    records); None where there are no heartbeats (RabbitMQ, recovery off) or Redis could not be
    read (the broker check says so)."""
    from pipeline.infra.celery_app import make_celery
    from workers.recovery import dead_after, enabled_for, store_for

    if not enabled_for(settings):
        return None
    try:
        now, records = store_for(make_celery(settings)).records()
    except Exception:  # noqa: BLE001 - unreachable Redis is the broker check's problem line
        return None
    limit = dead_after(settings)
    return [{"worker": r.hostname, "pid": r.pid, "engines": r.engines} for r in records
            if now - r.beat <= limit and r.engines]


def _healthy_line(checks: dict[str, Any], window: str) -> str:
    rate, p95 = checks["error_rate_percent"], checks["latency_p95_seconds"]
    deepest = checks["max_backlog"]
    return ("healthy: error rate "
            + ("n/a" if rate is None else f"{rate:.1f}%")
            + f" (<= {checks['error_rate_threshold_percent']:.1f}%), max backlog "
            + ("n/a" if deepest is None else f"{deepest['depth']}")
            + f" (threshold {checks['backlog_threshold']}), latency p95 "
            + ("n/a" if p95 is None else f"{p95:.1f} s")
            + f" (<= {checks['latency_threshold_seconds']:.1f} s) over the last {window}")
