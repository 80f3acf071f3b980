"""pipeline.ops.stats: the arithmetic of `stats` and `health` on hand-built ledger rows, and the
batching figures on a real ledger (SQLite and PostgreSQL), through the `stats` command too."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.cli.stats_cmd import render_text
from pipeline.ops.stats import (
    NO_WORKER,
    Thresholds,
    compute_stats,
    health_problems,
    parse_since,
    percentile,
    summarise,
)
from pipeline.quota import LedgerRow, QuotaStore

if TYPE_CHECKING:  # only the types: the module itself is loaded as a plugin, below
    from tests.pipeline.quota_conftest import FakeClock

# The quota fixtures (quota_db_url, quota_store, ...): the ledger tests run on both backends.
pytest_plugins = ["tests.pipeline.quota_conftest"]

T0 = datetime(2026, 11, 21, 12, 0, tzinfo=UTC)
SINCE, UNTIL = T0 - timedelta(hours=1), T0


def row(status: str = "succeeded", *, minute: float = -30.0, model: str = "tiny",
        worker: str | None = "w1@test", produced: float | None = 10.0, gpu: float | None = 4.0,
        wait: float | None = 1.0, latency: float | None = 5.0, code: str | None = None,
        job: str | None = None, batch: int | None = None) -> LedgerRow:
    """A ledger row created ``minute`` minutes from T0 and finished ``latency`` s later."""
    created = T0 + timedelta(minutes=minute)
    finished = None if latency is None else created + timedelta(seconds=latency)
    data: dict[str, Any] = {
        "job_id": job or f"j{minute}{status}{model}{worker}{latency}", "user_id": "u",
        "model": model, "requested_seconds": 10.0,
        "produced_seconds": produced if status == "succeeded" else None,
        "gpu_seconds": gpu if status == "succeeded" else None, "queue_wait_seconds": wait,
        "status": status, "error_code": code, "created_at": created,
        "started_at": None if wait is None else created + timedelta(seconds=wait),
        "finished_at": finished, "worker": worker, "attempts": 1 if worker else 0,
        "batch_size": batch}
    return data  # type: ignore[return-value]


# --- parse_since and percentile ---------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("30m", timedelta(minutes=30)), ("1h", timedelta(hours=1)), ("2d", timedelta(days=2)),
    ("1w", timedelta(weeks=1)), ("90s", timedelta(seconds=90)), (" 12H ", timedelta(hours=12)),
])
def test_parse_since_accepts_the_documented_units(text: str, expected: timedelta) -> None:
    assert parse_since(text) == expected


@pytest.mark.parametrize("text", ["", "1", "h", "0h", "-1h", "1.5h", "1y", "1 hour"])
def test_parse_since_refuses_anything_else_naming_the_forms(text: str) -> None:
    with pytest.raises(ValueError, match="30m, 1h, 2d or 1w"):
        parse_since(text)


def test_percentile_is_nearest_rank() -> None:
    values = [15.0, 20.0, 35.0, 40.0, 50.0]  # the textbook example
    assert percentile(values, 30) == 20.0
    assert percentile(values, 40) == 20.0
    assert percentile(values, 50) == 35.0
    assert percentile(values, 100) == 50.0
    # 1..100: p95 is the 95th value exactly; no interpolation ever invents a value.
    hundred = [float(v) for v in range(100, 0, -1)]
    assert percentile(hundred, 95) == 95.0
    assert percentile(hundred, 50) == 50.0
    assert percentile([7.0], 95) == 7.0
    assert percentile([], 50) is None


@pytest.mark.parametrize("q", [0, -5, 101])
def test_percentile_refuses_impossible_ranks(q: float) -> None:
    with pytest.raises(ValueError):
        percentile([1.0], q)


# --- one group ----------------------------------------------------------------------------------

def test_rates_ratios_and_percentiles_of_a_mixed_window() -> None:
    rows = [
        row(produced=10.0, gpu=4.0, wait=1.0, latency=5.0),
        row(produced=20.0, gpu=4.0, wait=2.0, latency=7.0),
        row(produced=30.0, gpu=12.0, wait=3.0, latency=20.0),
        row("failed", code="invalid_request", wait=0.5, latency=1.0),
        row("failed", code="gpu_oom", wait=9.0, latency=2.0),
        row("failed", code="gpu_oom", wait=4.0, latency=2.0),
        row("timeout", code="timeout", wait=8.0, latency=400.0),
        row("cancelled", code="cancelled", wait=None, latency=0.5, worker=None),
        row("started", latency=None),
        row("reserved", wait=None, latency=None, worker=None),
    ]
    g = summarise(rows)
    assert (g.jobs, g.succeeded, g.failed, g.timeout, g.cancelled, g.open) == (10, 3, 3, 1, 1, 2)
    assert g.finished == 7
    # 4 errors of 7 finished; cancelled and open jobs have no say.
    assert g.error_rate_percent == pytest.approx(400 / 7)
    assert g.errors_by_code == {"gpu_oom": 2, "invalid_request": 1, "timeout": 1}
    assert list(g.errors_by_code) == ["gpu_oom", "invalid_request", "timeout"]  # most first
    assert (g.audio_seconds, g.gpu_seconds) == (60.0, 20.0)
    assert g.audio_per_gpu_second == pytest.approx(3.0)
    # Latency is succeeded jobs only: the 400 s timeout shows in the error rate instead.
    assert (g.latency.p50, g.latency.p95, g.latency.count) == (7.0, 20.0, 3)
    # Queue wait is every job that started: 0.5 1 1 2 3 4 8 9 -> p50 is the 4th, p95 the 8th.
    assert (g.queue_wait.p50, g.queue_wait.p95, g.queue_wait.count) == (2.0, 9.0, 8)


def test_audio_per_gpu_second_ignores_jobs_missing_one_of_the_two() -> None:
    g = summarise([row(produced=10.0, gpu=5.0), row(produced=30.0, gpu=None),
                   row(produced=None, gpu=20.0)])
    assert (g.audio_seconds, g.gpu_seconds, g.audio_per_gpu_second) == (10.0, 5.0, 2.0)


def test_mean_batch_size_is_over_succeeded_jobs_that_recorded_one() -> None:
    g = summarise([row(batch=4), row(batch=4), row(batch=2),
                   row(batch=None),  # written before batching: left out, not counted as 1
                   row("failed", code="gpu_oom", batch=8)])  # no audio: not a batching figure
    assert g.mean_batch_size == pytest.approx(10 / 3)
    assert g.batch_size_jobs == 3
    none = summarise([row(batch=None), row("failed", batch=None)])
    assert (none.mean_batch_size, none.batch_size_jobs) == (None, 0)


def test_a_failed_row_without_a_code_is_counted_under_its_status() -> None:
    assert summarise([row("failed"), row("timeout")]).errors_by_code == {"failed": 1, "timeout": 1}


def test_empty_window_has_zero_counts_and_no_rates() -> None:
    report = compute_stats([], since=SINCE, until=UNTIL, backlog={"musicgen.tiny": 0})
    o = report.overall
    assert (o.jobs, o.finished, o.errors_by_code) == (0, 0, {})
    assert o.error_rate_percent is None and o.audio_per_gpu_second is None
    assert (o.mean_batch_size, o.batch_size_jobs) == (None, 0)
    assert (o.latency.p50, o.latency.p95, o.queue_wait.p95) == (None, None, None)
    assert report.jobs_per_minute == 0.0 and report.by_model == {} and report.by_worker == {}
    assert health_problems(report, Thresholds(0.0, 1, 0.001), "1h") == []  # idle is healthy


# --- the report ---------------------------------------------------------------------------------

def test_window_rates_and_breakdowns_per_model_and_worker() -> None:
    rows = [
        row(minute=-50, model="tiny", worker="w1", latency=4.0, produced=10.0, gpu=2.0),
        row(minute=-40, model="tiny", worker="w2", latency=6.0, produced=10.0, gpu=5.0),
        row("failed", minute=-20, model="tiny", worker="w1", code="model_runtime_error"),
        row(minute=-10, model="small", worker="w2", latency=30.0, produced=8.0, gpu=16.0),
        row("reserved", minute=-1, model="small", worker=None, wait=None, latency=None),
        row(minute=-61, model="tiny", worker="w1"),  # before the window
    ]
    report = compute_stats(rows, since=SINCE, until=UNTIL, backlog={"musicgen.tiny": 3,
                                                                    "musicgen.small": None})
    assert report.overall.jobs == 5
    assert report.jobs_per_minute == pytest.approx(5 / 60)
    assert report.finished_per_minute == pytest.approx(4 / 60)
    assert report.overall.error_rate_percent == 25.0
    assert set(report.by_model) == {"small", "tiny"}
    tiny, small = report.by_model["tiny"], report.by_model["small"]
    assert (tiny.jobs, tiny.succeeded, tiny.failed) == (3, 2, 1)
    assert tiny.error_rate_percent == pytest.approx(100 / 3)
    assert tiny.audio_per_gpu_second == pytest.approx(20 / 7)
    assert (small.jobs, small.open, small.error_rate_percent) == (2, 1, 0.0)
    assert small.audio_per_gpu_second == 0.5
    assert list(report.by_worker) == [NO_WORKER, "w1", "w2"]
    assert report.by_worker["w1"].errors_by_code == {"model_runtime_error": 1}
    assert report.by_worker["w2"].latency.p95 == 30.0
    assert report.by_worker[NO_WORKER].open == 1
    assert report.max_backlog == ("musicgen.tiny", 3)
    data = report.to_dict()
    assert data["window_seconds"] == 3600.0 and data["since"] == SINCE.isoformat()
    assert data["percentile_method"] == "nearest-rank"
    assert data["by_model"]["tiny"]["errors_by_code"] == {"model_runtime_error": 1}
    assert data["backlog"] == {"musicgen.small": None, "musicgen.tiny": 3}


def test_window_must_be_forward() -> None:
    with pytest.raises(ValueError):
        compute_stats([], since=UNTIL, until=SINCE, backlog={})


# --- health -------------------------------------------------------------------------------------

def _report(error_rows: int, ok_rows: int, *, backlog: int | None = 0,
            latency: float = 5.0) -> Any:
    rows = [row(latency=latency, job=f"ok{i}") for i in range(ok_rows)]
    rows += [row("failed", code="gpu_oom", job=f"bad{i}") for i in range(error_rows)]
    return compute_stats(rows, since=SINCE, until=UNTIL, backlog={"musicgen.tiny": backlog,
                                                                  "musicgen.small": 2})


def test_health_names_each_threshold_passed_in_one_line() -> None:
    report = _report(7, 13, backlog=73, latency=200.0)
    problems = health_problems(report, Thresholds(20.0, 50, 180.0), "1h")
    assert problems == ["error rate 35.0% > 20.0% over the last 1h",
                        "backlog 73 jobs in musicgen.tiny > 50",
                        "latency p95 200.0 s > 180.0 s over the last 1h"]


def test_health_is_strict_at_the_threshold_and_skips_a_disabled_backlog_check() -> None:
    report = _report(1, 4, backlog=50, latency=180.0)  # exactly 20%, 50 and 180 s
    assert health_problems(report, Thresholds(20.0, 50, 180.0), "30m") == []
    assert health_problems(_report(0, 1, backlog=10_000), Thresholds(20.0, 0, 180.0), "1h") == []
    assert health_problems(report, Thresholds(19.9, 50, 180.0), "30m") == [
        "error rate 20.0% > 19.9% over the last 30m"]


def test_health_ignores_unknown_backlogs() -> None:
    report = compute_stats([], since=SINCE, until=UNTIL, backlog={"musicgen.tiny": None})
    assert report.max_backlog is None
    assert health_problems(report, Thresholds(20.0, 1, 180.0), "1h") == []


# --- batching on a real ledger ------------------------------------------------------------------

def _finish_batched_jobs(store: QuotaStore) -> None:
    """What workers write: two calls of 4 and 2 jobs (3 of them here) and one job from before
    batching (no batch size), each job's gpu_seconds its share of its call, and one failure."""
    jobs = [("b4-1", 4, 10.0, 1.0), ("b4-2", 4, 10.0, 1.0), ("b2-1", 2, 8.0, 2.0),
            ("old", None, 8.0, 4.0)]
    for job_id, size, produced, gpu in jobs:
        store.reserve(job_id=job_id, user_id="alice", model="tiny", requested_seconds=10.0)
        store.mark_started(job_id, worker="w1@test", queue_wait_seconds=0.5)
        assert store.mark_finished(job_id, status="succeeded", produced_seconds=produced,
                                   gpu_seconds=gpu, batch_size=size)
    store.reserve(job_id="bad", user_id="alice", model="tiny", requested_seconds=10.0)
    store.mark_started("bad", worker="w1@test")
    assert store.mark_finished("bad", status="failed", error_code="gpu_oom")


def test_mean_batch_size_from_the_ledger_leaves_older_rows_out(quota_store: QuotaStore,
                                                               quota_clock: FakeClock) -> None:
    _finish_batched_jobs(quota_store)
    now = quota_clock()
    report = compute_stats(quota_store.ledger(), since=now - timedelta(hours=1),
                           until=now + timedelta(minutes=1), backlog={})
    o = report.overall
    assert o.mean_batch_size == pytest.approx(10 / 3)  # 4, 4, 2; the older row left out
    assert o.batch_size_jobs == 3
    # Audio per GPU second over every succeeded job: 36 s of audio in 8 GPU-seconds of shares.
    assert o.audio_per_gpu_second == pytest.approx(36 / 8)
    assert report.by_model["tiny"].mean_batch_size == pytest.approx(10 / 3)
    text = render_text(report, "1h")
    assert "audio per GPU s:  4.50 (36.00 s of audio in 8.00 s of generation" in text
    assert "mean batch size:  3.33 (3 succeeded jobs that recorded one" in text
    data = report.to_dict()
    assert data["overall"]["mean_batch_size"] == pytest.approx(10 / 3)
    assert data["by_worker"]["w1@test"]["batch_size_jobs"] == 3


@pytest.mark.usefixtures("isolated_settings_env")
def test_stats_command_shows_audio_per_gpu_second_and_mean_batch_size(
        quota_db_url: str, quota_store: QuotaStore, quota_clock: FakeClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The command's window ends at the real now: write the rows a minute before it.
    quota_clock.now = datetime.now(UTC) - timedelta(minutes=1)
    _finish_batched_jobs(quota_store)
    monkeypatch.setenv("MUSICGEN_DATABASE__URL", quota_db_url)
    runner = CliRunner()
    as_json = runner.invoke(app, ["stats", "--since", "1h", "--json"])
    assert as_json.exit_code == 0, as_json.output
    overall = json.loads(as_json.stdout)["overall"]
    assert overall["mean_batch_size"] == pytest.approx(10 / 3)
    assert overall["audio_per_gpu_second"] == pytest.approx(4.5)
    text = runner.invoke(app, ["stats", "--since", "1h"])
    assert text.exit_code == 0, text.output
    assert "audio per GPU s:  4.50" in text.stdout
    assert "mean batch size:  3.33 (3 succeeded jobs" in text.stdout
    [tiny_line] = [line for line in text.stdout.splitlines() if line.startswith("  tiny ")]
    assert tiny_line.split()[5:7] == ["4.50", "3.33"]  # the table's audio/GPU s and batch
