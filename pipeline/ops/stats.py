"""Service statistics and health checks, computed from ledger rows and backlog numbers.

Everything here is a pure function over plain data (``LedgerRow`` dicts from
``QuotaStore.ledger`` and ``{queue: depth}``), so it is tested without a database or a broker;
``pipeline/cli/stats_cmd.py`` does the reading.

Definitions (the CLI prints them too, so an operator reads the same numbers as the code):

- A job is *in the window* when its ledger row was created at or after ``since``.
- *Finished* = succeeded, failed or timed out. Cancelled jobs are the user's choice and open
  (reserved or started) jobs have no outcome yet: neither counts towards the error rate.
- *Error rate* = (failed + timeout) / finished, in percent; ``None`` when nothing finished.
- *Audio per GPU second* = sum of ``produced_seconds`` / sum of ``gpu_seconds`` over succeeded
  jobs that recorded both. A job's ``gpu_seconds`` is its share of the generate call it shared
  with ``batch_size - 1`` others, so batching shows here as more audio per GPU second.
- *Mean batch size* = mean of ``batch_size`` over succeeded jobs that recorded one (rows from
  before batching did not; they are left out, not counted as 1). It is weighted by job: a batch
  of 4 counts four times, a batch of 2 twice (4, 4, 4, 4, 2, 2 -> 3.33), so it reads "the
  average job shared its generate call with this many", and is above the mean per call
  (Prometheus's ``musicgen_batch_size`` histogram counts calls: 3.0 for the same two calls).
- *Latency* is end to end, ``created_at`` -> ``finished_at``, over succeeded jobs: how long a
  caller waited for a file. Failures are often fast and would flatter it; they show in the
  error rate instead.
- Percentiles use the **nearest-rank** method: the smallest observed value with at least q% of
  the values at or below it, so a reported p95 is always a time some job really took.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from pipeline.quota.tables import LedgerRow, LedgerStatus

__all__ = ["GroupStats", "Percentiles", "StatsReport", "Thresholds", "VariantStats",
           "compute_stats", "compute_variant_stats", "health_problems", "parse_since",
           "percentile", "summarise"]

PERCENTILE_METHOD = "nearest-rank"
_ERRORS = frozenset({LedgerStatus.FAILED.value, LedgerStatus.TIMEOUT.value})
_FINISHED = _ERRORS | {LedgerStatus.SUCCEEDED.value}
_OPEN = frozenset({LedgerStatus.RESERVED.value, LedgerStatus.STARTED.value})
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
NO_WORKER = "(not started)"  # rows no worker picked up yet have no worker name


def parse_since(text: str) -> timedelta:
    """``"30m"``, ``"1h"``, ``"2d"``, ``"1w"`` (and ``"90s"``) -> a positive ``timedelta``."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", text.lower())
    if match is None or int(match.group(1)) == 0:
        raise ValueError(f"{text!r}: expected a positive number and a unit, "
                         "e.g. 30m, 1h, 2d or 1w (s, m, h, d, w)")
    return timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})


def percentile(values: Iterable[float], q: float) -> float | None:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``values``; None when empty."""
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {q}")
    ordered = sorted(values)
    if not ordered:
        return None
    rank = math.ceil(q / 100 * len(ordered))  # 1-based: at least q% of the values are <= it
    return ordered[max(rank, 1) - 1]


@dataclass(frozen=True)
class Percentiles:
    """p50 and p95 of some durations in seconds (None when there were none) and how many."""

    p50: float | None
    p95: float | None
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles:
        return cls(percentile(values, 50), percentile(values, 95), len(values))


@dataclass(frozen=True)
class GroupStats:
    """The numbers for one set of jobs: all of them, one model's, or one worker's."""

    jobs: int
    succeeded: int
    failed: int
    timeout: int
    cancelled: int
    open: int
    error_rate_percent: float | None
    errors_by_code: dict[str, int]
    audio_seconds: float
    gpu_seconds: float
    audio_per_gpu_second: float | None
    mean_batch_size: float | None  # None: no succeeded job recorded one
    batch_size_jobs: int  # the succeeded jobs that recorded a batch size (the mean's count)
    queue_wait: Percentiles
    latency: Percentiles

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed + self.timeout


def summarise(rows: Sequence[LedgerRow]) -> GroupStats:
    """Counts, error rate by code, audio per GPU second, mean batch size and the percentiles
    of ``rows``."""
    by_status: dict[str, int] = {}
    errors_by_code: dict[str, int] = {}
    for row in rows:
        by_status[row["status"]] = by_status.get(row["status"], 0) + 1
        if row["status"] in _ERRORS:
            # A row without a code (written by an older worker) is filed under how it ended.
            code = row["error_code"] or row["status"]
            errors_by_code[code] = errors_by_code.get(code, 0) + 1
    ok = [r for r in rows if r["status"] == LedgerStatus.SUCCEEDED.value]
    # Both numbers of one job or neither: a job missing one would skew the ratio.
    measured = [r for r in ok if r["produced_seconds"] is not None and r["gpu_seconds"] is not None]
    audio = sum(float(r["produced_seconds"] or 0.0) for r in measured)
    gpu = sum(float(r["gpu_seconds"] or 0.0) for r in measured)
    sizes = [r["batch_size"] for r in ok if r["batch_size"] is not None]
    finished = sum(by_status.get(s, 0) for s in _FINISHED)
    errors = sum(by_status.get(s, 0) for s in _ERRORS)
    return GroupStats(
        jobs=len(rows),
        succeeded=by_status.get(LedgerStatus.SUCCEEDED.value, 0),
        failed=by_status.get(LedgerStatus.FAILED.value, 0),
        timeout=by_status.get(LedgerStatus.TIMEOUT.value, 0),
        cancelled=by_status.get(LedgerStatus.CANCELLED.value, 0),
        open=sum(by_status.get(s, 0) for s in _OPEN),
        error_rate_percent=100.0 * errors / finished if finished else None,
        errors_by_code=dict(sorted(errors_by_code.items(), key=lambda kv: (-kv[1], kv[0]))),
        audio_seconds=audio, gpu_seconds=gpu,
        audio_per_gpu_second=audio / gpu if gpu > 0 else None,
        mean_batch_size=sum(sizes) / len(sizes) if sizes else None, batch_size_jobs=len(sizes),
        queue_wait=Percentiles.of([float(r["queue_wait_seconds"]) for r in rows
                                   if r["queue_wait_seconds"] is not None]),
        latency=Percentiles.of([(r["finished_at"] - r["created_at"]).total_seconds() for r in ok
                                if r["finished_at"] is not None]),
    )


@dataclass(frozen=True)
class StatsReport:
    """Everything ``musicgen-pipeline stats`` shows for one window."""

    since: datetime
    until: datetime
    overall: GroupStats
    jobs_per_minute: float
    finished_per_minute: float
    by_model: dict[str, GroupStats]
    by_worker: dict[str, GroupStats]
    backlog: dict[str, int | None]  # None: this broker cannot tell (n/a)
    percentile_method: str = field(default=PERCENTILE_METHOD)

    @property
    def max_backlog(self) -> tuple[str, int] | None:
        """The deepest queue and its depth; None when no depth is known."""
        known = [(q, d) for q, d in self.backlog.items() if d is not None]
        return max(known, key=lambda qd: (qd[1], qd[0])) if known else None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (datetimes as ISO 8601)."""
        out = asdict(self)
        out["since"], out["until"] = self.since.isoformat(), self.until.isoformat()
        out["window_seconds"] = (self.until - self.since).total_seconds()
        return out


def _group(rows: Sequence[LedgerRow], key: Literal["model", "worker"]) -> dict[str, GroupStats]:
    groups: dict[str, list[LedgerRow]] = {}
    for row in rows:
        groups.setdefault(row[key] or NO_WORKER, []).append(row)
    return {name: summarise(group) for name, group in sorted(groups.items())}


def compute_stats(rows: Sequence[LedgerRow], *, since: datetime, until: datetime,
                  backlog: Mapping[str, int | None]) -> StatsReport:
    """The report for the jobs in ``rows`` created in ``[since, until]`` (aware datetimes)."""
    if until <= since:
        raise ValueError("the window must end after it starts")
    in_window = [r for r in rows if since <= r["created_at"] <= until]
    minutes = (until - since).total_seconds() / 60
    overall = summarise(in_window)
    return StatsReport(
        since=since, until=until, overall=overall,
        jobs_per_minute=overall.jobs / minutes,
        finished_per_minute=overall.finished / minutes,
        by_model=_group(in_window, "model"), by_worker=_group(in_window, "worker"),
        backlog=dict(sorted(backlog.items())))


@dataclass(frozen=True)
class VariantStats:
    """One variant of one model experiment: the numbers of the jobs it was given."""

    experiment: str
    variant: str
    stats: GroupStats

    def to_dict(self) -> dict[str, Any]:
        return {"experiment": self.experiment, "variant": self.variant, **asdict(self.stats)}


def compute_variant_stats(rows: Sequence[LedgerRow], *, since: datetime, until: datetime,
                          experiment: str | None = None) -> list[VariantStats]:
    """Per (experiment, variant), sorted, over the rows created in ``[since, until]``: the same
    numbers as every other group. Rows no experiment touched are left out; with ``experiment``
    only that experiment's rows count."""
    if until <= since:
        raise ValueError("the window must end after it starts")
    groups: dict[tuple[str, str], list[LedgerRow]] = {}
    for row in rows:
        # .get: rows written before revision 0004 (or by a test's hand) may lack the keys.
        name, variant = row.get("experiment"), row.get("variant")
        if name is None or variant is None or not since <= row["created_at"] <= until:
            continue
        if experiment is None or name == experiment:
            groups.setdefault((name, variant), []).append(row)
    return [VariantStats(name, variant, summarise(group))
            for (name, variant), group in sorted(groups.items())]


@dataclass(frozen=True)
class Thresholds:
    """What ``health`` compares against (``monitoring.*`` in the settings)."""

    error_rate_percent: float
    backlog: int  # 0 = backpressure is off, and so is this check
    latency_seconds: float


def health_problems(report: StatsReport, thresholds: Thresholds, window: str) -> list[str]:
    """One line per threshold the report is past; empty when healthy.

    Comparisons are strict (a value equal to its threshold is healthy) and a number that cannot
    be measured (no finished job, no backlog figure) is not a problem: an idle service is well.
    ``window`` is how the lines name the window, e.g. ``"1h"``.
    """
    problems = []
    rate = report.overall.error_rate_percent
    if rate is not None and rate > thresholds.error_rate_percent:
        problems.append(f"error rate {rate:.1f}% > {thresholds.error_rate_percent:.1f}% "
                        f"over the last {window}")
    deepest = report.max_backlog
    if thresholds.backlog > 0 and deepest is not None and deepest[1] > thresholds.backlog:
        problems.append(f"backlog {deepest[1]} jobs in {deepest[0]} > {thresholds.backlog}")
    p95 = report.overall.latency.p95
    if p95 is not None and p95 > thresholds.latency_seconds:
        problems.append(f"latency p95 {p95:.1f} s > {thresholds.latency_seconds:.1f} s "
                        f"over the last {window}")
    return problems
