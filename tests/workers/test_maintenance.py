"""The periodic sweeps on real files (what is old enough goes, everything else stays), and the
ledger roll-up on a real SQLite ledger."""

from __future__ import annotations

import os
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from pipeline.config.schema import (
    AppSettings,
    DatabaseSettings,
    QuotaSettings,
    Settings,
    StorageSettings,
    WorkerSettings,
)
from pipeline.infra.celery_app import make_celery
from pipeline.ops.monitor_app import (
    MAINTENANCE_QUEUE,
    TASK_ROLLUP_LEDGER,
    TASK_SWEEP_OUTPUTS,
    TASK_SWEEP_TEMP,
    make_monitor_app,
)
from pipeline.quota import DEFAULT_TIERS, QuotaStore, daily_usage, make_engine, upgrade
from workers.maintenance import register, rollup_ledger, sweep_outputs, sweep_temp

# The sweep functions take ``now``: tests of them age files against this fixed instant. The
# registered tasks read the clock when they run, so their tests age files against the clock
# (``now=time.time()``): against NOW, a file would age by however long the suite ran before it.
NOW = time.time()
HOUR = 3600.0
DAY = 86400.0


def _write(path: Path, size: int, age: float, now: float = NOW) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    os.utime(path, (now - age, now - age))
    return path


def _age(path: Path, age: float, now: float = NOW) -> None:
    os.utime(path, (now - age, now - age), follow_symlinks=False)


def test_temp_sweep_removes_a_crashed_jobs_folder_and_counts_it(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    crashed = temp / "job-crashed"
    _write(crashed / "melody-1.wav", 1000, 2 * HOUR)
    _write(crashed / "render-x" / "float.wav", 500, 2 * HOUR)
    _age(crashed / "render-x", 2 * HOUR)
    _age(crashed, 2 * HOUR)
    stray = _write(temp / "stray.bin", 7, 3 * HOUR)

    result = sweep_temp(temp, now=NOW)

    assert not crashed.exists() and not stray.exists()
    assert result.as_dict() == {"removed_files": 3, "removed_bytes": 1507, "removed_dirs": 2, "errors": 0}
    assert temp.is_dir()  # the folder itself stays


def test_temp_sweep_keeps_a_folder_a_job_still_writes_into(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    running = temp / "job-running"
    _write(running / "old-melody.wav", 10, 2 * HOUR)
    fresh = _write(running / "render-y" / "float.wav", 10, 60)  # written a minute ago
    _age(running, 2 * HOUR)  # the folder's own mtime is old: its content decides
    young = temp / "job-young"
    young.mkdir()

    result = sweep_temp(temp, now=NOW)

    assert fresh.is_file() and young.is_dir()
    assert result.removed_files == 0 and result.removed_dirs == 0


def test_temp_sweep_age_threshold_is_respected(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    job = temp / "job"
    _write(job / "a.wav", 10, 2 * HOUR)
    _age(job, 2 * HOUR)
    assert sweep_temp(temp, older_than=3 * HOUR, now=NOW).removed_files == 0
    assert job.is_dir()
    assert sweep_temp(temp, older_than=HOUR, now=NOW).removed_files == 1
    assert not job.exists()


def test_temp_sweep_removes_a_link_but_not_what_it_points_to(tmp_path: Path) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    precious = _write(tmp_path / "elsewhere" / "keep.wav", 10, 5 * HOUR)
    link = temp / "job-link"
    link.symlink_to(precious.parent, target_is_directory=True)
    _age(link, 5 * HOUR)

    result = sweep_temp(temp, now=NOW)

    assert not link.is_symlink()
    assert precious.read_bytes() == b"x" * 10
    assert result.removed_dirs == 0


def test_temp_sweep_of_a_missing_folder_removes_nothing(tmp_path: Path) -> None:
    assert sweep_temp(tmp_path / "never-created", now=NOW).as_dict() == {
        "removed_files": 0, "removed_bytes": 0, "removed_dirs": 0, "errors": 0}


@pytest.mark.parametrize("output_rel", ["tmp", "tmp/outputs"])
def test_temp_sweep_refuses_a_temp_dir_that_holds_the_outputs(tmp_path: Path, output_rel: str) -> None:
    out = _write(tmp_path / output_rel / "song.wav", 10, 5 * HOUR)
    with pytest.raises(ValueError, match="refusing to sweep"):
        sweep_temp(tmp_path / "tmp", output_dir=tmp_path / output_rel, now=NOW)
    assert out.is_file()


def test_output_sweep_deletes_expired_outputs_with_their_sidecars(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    expired = _write(out / "old.mp3", 300, 8 * DAY)
    expired_sidecar = _write(out / "old.mp3.json", 20, 8 * DAY)
    kept = _write(out / "new.flac", 400, 6 * DAY)
    kept_sidecar = _write(out / "new.flac.json", 30, 8 * DAY)  # its output is kept, so it is too
    orphan = _write(out / "gone.wav.json", 5, 9 * DAY)
    young_orphan = _write(out / "gone2.wav.json", 5, DAY)
    not_ours = _write(out / "README.txt", 9, 100 * DAY)
    dead_part = _write(out / ".x.wav.0123456789ab.part", 50, 2 * HOUR)
    live_part = _write(out / ".y.wav.0123456789ab.part", 50, 60)

    result = sweep_outputs(out, retention_days=7, now=NOW)

    for path in (expired, expired_sidecar, orphan, dead_part):
        assert not path.exists(), path
    for path in (kept, kept_sidecar, young_orphan, not_ours, live_part):
        assert path.is_file(), path
    assert result.as_dict() == {"removed_files": 4, "removed_bytes": 375, "removed_dirs": 0, "errors": 0}


def test_output_sweep_leaves_folders_alone(tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    nested = _write(out / "archive" / "old.wav", 10, 30 * DAY)
    _age(out / "archive", 30 * DAY)
    assert sweep_outputs(out, retention_days=1, now=NOW).removed_files == 0
    assert nested.is_file()


def _settings(tmp_path: Path, hard_limit: int = 360, timezone: str = "UTC") -> Settings:
    # The quota database too is the test's own: the default is a file under the working directory.
    return Settings(app=AppSettings(data_dir=str(tmp_path / "data")),
                    storage=StorageSettings(output_dir=str(tmp_path / "outputs"),
                                            temp_dir=str(tmp_path / "tmp"), retention_days=2),
                    worker=WorkerSettings(soft_time_limit=hard_limit - 10, hard_time_limit=hard_limit),
                    database=DatabaseSettings(url=f"sqlite:///{tmp_path / 'quota.db'}"),
                    quotas=QuotaSettings(timezone=timezone))


def test_register_adds_the_sweeps_and_roll_up_on_the_maintenance_queue_with_the_schedule(
        tmp_path: Path) -> None:
    app = make_celery(_settings(tmp_path))
    register(app)
    for name in (TASK_SWEEP_TEMP, TASK_SWEEP_OUTPUTS, TASK_ROLLUP_LEDGER):
        assert app.tasks[name].queue == MAINTENANCE_QUEUE
        entry = app.conf.beat_schedule[name]
        assert entry["task"] == name and entry["options"]["queue"] == MAINTENANCE_QUEUE
    assert app.conf.beat_schedule[TASK_SWEEP_TEMP]["schedule"].total_seconds() == 900


def test_registered_tasks_sweep_the_settings_folders(tmp_path: Path) -> None:
    app = make_celery(_settings(tmp_path))
    register(app)
    crashed = tmp_path / "tmp" / "job-1"
    now = time.time()
    _write(crashed / "a.wav", 11, 2 * HOUR, now)
    _age(crashed, 2 * HOUR, now)
    _write(tmp_path / "outputs" / "old.wav", 13, 3 * DAY, now)
    _write(tmp_path / "outputs" / "old.wav.json", 2, 3 * DAY, now)

    assert app.tasks[TASK_SWEEP_TEMP].run() == {"removed_files": 1, "removed_bytes": 11,
                                                "removed_dirs": 1, "errors": 0}
    assert app.tasks[TASK_SWEEP_OUTPUTS].run() == {"removed_files": 2, "removed_bytes": 15,
                                                   "removed_dirs": 0, "errors": 0}
    assert list((tmp_path / "outputs").iterdir()) == []


def test_a_long_hard_time_limit_raises_the_temp_age(tmp_path: Path) -> None:
    # A job may legitimately run for two hours: its folder must survive the one-hour sweep.
    app = make_celery(_settings(tmp_path, hard_limit=7200))
    register(app)
    job = tmp_path / "tmp" / "job-long"
    now = time.time()
    _write(job / "a.wav", 11, 1.5 * HOUR, now)
    _age(job, 1.5 * HOUR, now)
    assert app.tasks[TASK_SWEEP_TEMP].run()["removed_files"] == 0
    assert job.is_dir()


# --- the ledger roll-up ------------------------------------------------------------------------
TOKYO = ZoneInfo("Asia/Tokyo")  # no daylight saving: 24 hours back is always the day before


def _ledger_jobs(url: str, jobs: list[tuple[str, datetime, str]]) -> None:
    """Reserve and end ``(job_id, created, status)`` jobs in the ledger at ``url``."""
    upgrade(url)
    engine = make_engine(url)
    clock = {"now": datetime.now(UTC)}
    store = QuotaStore(engine, tiers=DEFAULT_TIERS, default_tier="enterprise",
                       clock=lambda: clock["now"])
    try:
        for job_id, created, status in jobs:
            clock["now"] = created
            store.reserve(job_id=job_id, user_id="alice", model="small", requested_seconds=8.0)
            store.mark_started(job_id, worker="gpu-0")
            store.mark_finished(job_id, status=status, produced_seconds=8.0, gpu_seconds=2.0)
    finally:
        store.close()


def _rolled(url: str, since: date, until: date) -> list[tuple[date, int, int, int, int, float]]:
    engine = make_engine(url)
    try:
        return [(r["day"], r["jobs"], r["succeeded"], r["failed"], r["cancelled"], r["gpu_seconds"])
                for r in daily_usage(engine, since=since, until=until)]
    finally:
        engine.dispose()


def test_rollup_task_rolls_up_yesterday_and_today_in_the_quota_zone(tmp_path: Path) -> None:
    settings = _settings(tmp_path, timezone="Asia/Tokyo")
    # The task reads the real clock: keep Tokyo's midnight from falling inside the test.
    local = datetime.now(TOKYO)
    to_midnight = (datetime.combine(local.date() + timedelta(days=1), datetime.min.time(), TOKYO)
                   - local).total_seconds()
    if to_midnight < 30:
        time.sleep(to_midnight + 1)
    now = datetime.now(UTC)
    _ledger_jobs(settings.database.url, [
        ("today", now, "succeeded"),
        ("yesterday-1", now - timedelta(days=1), "succeeded"),
        ("yesterday-2", now - timedelta(days=1), "failed"),
        ("long-ago", now - timedelta(days=3), "succeeded"),  # outside the two days: left alone
    ])
    app = make_celery(settings)
    register(app)

    result = app.tasks[TASK_ROLLUP_LEDGER].run()

    today = now.astimezone(TOKYO).date()
    yesterday = today - timedelta(days=1)
    assert result == {"days": [yesterday.isoformat(), today.isoformat()], "rows": 2}
    assert _rolled(settings.database.url, today - timedelta(days=5), today) == [
        (yesterday, 2, 1, 1, 0, 2.0), (today, 1, 1, 0, 0, 2.0)]


def test_rollup_uses_the_zone_to_pick_the_two_days(tmp_path: Path) -> None:
    # 16:30 UTC is already the next day in Tokyo: its "yesterday" is the UTC day itself.
    settings = _settings(tmp_path, timezone="Asia/Tokyo")
    late_utc = datetime(2026, 11, 21, 16, 30, tzinfo=UTC)
    _ledger_jobs(settings.database.url, [("j", late_utc, "cancelled")])
    result = rollup_ledger(settings, now=late_utc)
    assert result == {"days": ["2026-11-21", "2026-11-22"], "rows": 1}
    assert _rolled(settings.database.url, date(2026, 11, 20), date(2026, 11, 22)) == [
        (date(2026, 11, 22), 1, 0, 0, 1, 0.0)]  # a cancelled job's GPU time is not delivery


def test_beat_sends_the_roll_up_hourly_and_at_once_on_a_fresh_schedule(tmp_path: Path) -> None:
    # Beat loads pipeline.ops.monitor_app, not the workers: its schedule must name the task itself.
    app = make_monitor_app(_settings(tmp_path))
    entry = app.conf.beat_schedule[TASK_ROLLUP_LEDGER]
    assert entry["task"] == TASK_ROLLUP_LEDGER == "musicgen.maintenance.rollup_ledger"
    assert entry["schedule"] == timedelta(hours=1)
    assert entry["options"] == {"queue": MAINTENANCE_QUEUE, "expires": 3600.0}
    # Never run: due as soon as beat starts with a fresh schedule file, like the sweeps.
    assert entry["last_run_at"] == app.conf.beat_schedule[TASK_SWEEP_TEMP]["last_run_at"]
    assert entry["last_run_at"] < datetime.now(UTC) - timedelta(days=365)
