"""`musicgen-pipeline stats`: throughput, efficiency, errors, latency and backlog over a window.

The numbers come from the usage ledger (every job has a row there, quotas on or off) and the
broker's queues; the arithmetic and its definitions live in ``pipeline.ops.stats``. ``health``
reads through the same two functions, so the probe and the operator see the same numbers.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import TYPE_CHECKING

import typer

from pipeline.cli.common import EnvOption, JsonOption, SetsOption, fail, load_or_exit, parse_sets
from pipeline.cli.db_cmd import open_store
from pipeline.config.schema import Settings
from pipeline.errors import ServiceUnavailable
from pipeline.ops.stats import (
    GroupStats,
    Percentiles,
    StatsReport,
    VariantStats,
    compute_stats,
    compute_variant_stats,
    parse_since,
)

if TYPE_CHECKING:
    from pipeline.infra.brokers import BrokerState
    from pipeline.quota import LedgerRow


def queue_names(settings: Settings) -> list[str]:
    """The queue of every model preset this install knows (and the settings' own)."""
    from pipeline.config.layers import available
    from pipeline.contract.jobs import queue_for

    return sorted({queue_for(p) for p in available("models")} | {queue_for(settings.model.preset)})


def read_ledger(settings: Settings, since: datetime) -> list[LedgerRow]:
    """Ledger rows created at or after ``since``; ``ServiceUnavailable`` if the DB is not there."""
    with open_store(settings, must_exist=True) as store:
        return store.ledger(since=since)


def read_backlog(settings: Settings) -> dict[str, int | None]:
    """Jobs waiting in each queue; ``None`` where the broker cannot tell.

    Redis: kombu's lists (``queue_depth``); RabbitMQ: each queue's ready message count
    (pipeline/infra/brokers.py). The embedded file-system broker keeps one file per waiting message,
    named ``<ms>_<uuid>.<queue>.msg``, so its folder is counted. Raises ``ServiceUnavailable``
    when the broker cannot be reached.
    """
    state = read_broker(settings)
    if not state.reachable:
        raise ServiceUnavailable(f"broker unreachable at {state.where}: {state.error}")
    return state.depths


def read_broker(settings: Settings) -> BrokerState:
    """The broker's kind, server version, reachability and queue depths (one connection)."""
    from pipeline.infra.brokers import broker_state
    from pipeline.infra.celery_app import embedded_dirs

    queues = queue_names(settings)
    state = broker_state(settings, queues)
    if settings.broker.url is None:
        folder = embedded_dirs(settings)["queue"]
        names = [p.name for p in folder.iterdir()] if folder.is_dir() else None
        state.depths = (dict.fromkeys(queues) if names is None else
                        {q: sum(1 for n in names if n.partition(".")[2] == f"{q}.msg") for q in queues})
    return state


def window_or_exit(since: str) -> timedelta:
    """``--since`` parsed, or a usage error (exit 2) naming the accepted forms."""
    try:
        return parse_since(since)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--since") from exc


def _sec(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _pcts(p: Percentiles) -> str:
    return f"p50 {_sec(p.p50)}, p95 {_sec(p.p95)}"


def _table(title: str, key: str, groups: dict[str, GroupStats]) -> list[str]:
    head = (f"  {key:<24} {'jobs':>5} {'ok':>5} {'err':>5} {'error %':>8} {'audio/GPU s':>11} "
            f"{'batch':>6} {'wait p50':>9} {'lat p50':>9} {'lat p95':>9}")
    lines = [title, head]
    for name, g in groups.items():
        lines.append(f"  {name:<24} {g.jobs:>5} {g.succeeded:>5} {g.failed + g.timeout:>5} "
                     f"{_pct(g.error_rate_percent):>8} {_ratio(g.audio_per_gpu_second):>11} "
                     f"{_ratio(g.mean_batch_size):>6} {_sec(g.queue_wait.p50):>9} "
                     f"{_sec(g.latency.p50):>9} {_sec(g.latency.p95):>9}")
    if not groups:
        lines.append("  (no jobs)")
    return lines


def render_text(report: StatsReport, window: str) -> str:
    """The human-readable report."""
    o = report.overall
    lines = [
        (f"stats over the last {window} ({report.since.isoformat(timespec='seconds')} to "
         f"{report.until.isoformat(timespec='seconds')})"),
        (f"jobs:             {o.jobs} ({o.succeeded} succeeded, {o.failed} failed, {o.timeout} "
         f"timed out, {o.cancelled} cancelled, {o.open} open)"),
        (f"jobs per minute:  {report.jobs_per_minute:.3f} created, "
         f"{report.finished_per_minute:.3f} finished"),
        (f"audio per GPU s:  {_ratio(o.audio_per_gpu_second)} ({o.audio_seconds:.2f} s of audio "
         f"in {o.gpu_seconds:.2f} s of generation, succeeded jobs)"),
        # Weighted by job (see pipeline.ops.stats): what the average job shared its call with.
        (f"mean batch size:  {_ratio(o.mean_batch_size)} ({o.batch_size_jobs} succeeded jobs "
         "that recorded one, weighted by job)"),
        (f"error rate:       {_pct(o.error_rate_percent)} "
         f"({o.failed + o.timeout} of {o.finished} finished)"),
    ]
    lines += [f"  {code:<24} {n} ({100.0 * n / o.finished:.1f}%)"
              for code, n in o.errors_by_code.items()]
    backlog = ", ".join(f"{q} {'n/a' if d is None else d}" for q, d in report.backlog.items())
    lines += [
        f"queue wait:       {_pcts(o.queue_wait)} ({o.queue_wait.count} started jobs)",
        (f"latency:          {_pcts(o.latency)} ({o.latency.count} succeeded jobs, "
         "created -> finished)"),
        f"backlog:          {backlog or 'n/a'}",
        f"percentiles:      {report.percentile_method}",
        "",
        *_table("by model", "model", report.by_model),
        "",
        *_table("by worker", "worker", report.by_worker),
    ]
    return "\n".join(lines)


def render_variants(groups: list[VariantStats], window: str) -> str:
    """The model experiments' view: one row per (experiment, variant)."""
    head = (f"  {'experiment':<20} {'variant':<20} {'jobs':>5} {'ok':>5} {'err':>5} "
            f"{'error %':>8} {'lat p50':>9} {'lat p95':>9} {'audio/GPU s':>11}")
    lines = [f"by variant over the last {window} (jobs no experiment touched are left out)", head]
    for v in groups:
        g = v.stats
        lines.append(f"  {v.experiment:<20} {v.variant:<20} {g.jobs:>5} {g.succeeded:>5} "
                     f"{g.failed + g.timeout:>5} {_pct(g.error_rate_percent):>8} "
                     f"{_sec(g.latency.p50):>9} {_sec(g.latency.p95):>9} "
                     f"{_ratio(g.audio_per_gpu_second):>11}")
    if not groups:
        lines.append("  (no experiment jobs)")
    return "\n".join(lines)


class StatsView(str, Enum):
    """Another grouping than the default report's."""

    variant = "variant"


def stats(
    since: str = typer.Option("1h", "--since", help="window: 30m, 1h, 2d, 1w (s m h d w)"),
    as_json: JsonOption = False,
    by: StatsView = typer.Option(None, "--by",
                                 help="variant: compare model experiments' variants instead"),
    experiment: str = typer.Option(None, "--experiment",
                                   help="with --by variant: this experiment only"),
    env: EnvOption = None,
    sets: SetsOption = None,
) -> None:
    """Throughput, audio per GPU second, batching, errors, latency and backlog over a window.

    Jobs per minute, audio per GPU second and mean batch size, error rate overall and by code,
    queue wait and end-to-end latency p50/p95 (nearest-rank), backlog per queue, and the same
    per model and per worker. ``--by variant``: per model experiment and variant instead (jobs,
    error rate, latency p50/p95, audio per GPU second).
    """
    window = window_or_exit(since)
    if experiment is not None and by is not StatsView.variant:
        raise typer.BadParameter("only with --by variant", param_hint="--experiment")
    settings = load_or_exit(env, parse_sets(sets))
    until = datetime.now(UTC)
    try:
        rows = read_ledger(settings, until - window)
    except ServiceUnavailable as exc:
        fail(exc)
    if by is StatsView.variant:  # the ledger alone: no backlog to read
        groups = compute_variant_stats(rows, since=until - window, until=until,
                                       experiment=experiment)
        if as_json:
            typer.echo(json.dumps({"window": since, "since": (until - window).isoformat(),
                                   "until": until.isoformat(),
                                   "by_variant": [g.to_dict() for g in groups]}, indent=2))
        else:
            typer.echo(render_variants(groups, since))
        return
    try:
        backlog = read_backlog(settings)
    except ServiceUnavailable as exc:  # the ledger numbers are still worth showing
        typer.echo(f"warning: {exc}; backlog shown as n/a", err=True)
        backlog = dict.fromkeys(queue_names(settings))
    report = compute_stats(rows, since=until - window, until=until, backlog=backlog)
    if as_json:
        typer.echo(json.dumps({"window": since, **report.to_dict()}, indent=2))
    else:
        typer.echo(render_text(report, since))
