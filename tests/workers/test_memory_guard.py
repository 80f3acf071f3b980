"""worker.cleanup_threshold_percent and worker.max_memory_percent, acted on after each job.

The decision runs with fake readings and a real ModelCache; the way out of the pool runs in a
real billiard pool, the same pool class a prefork Celery worker uses.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import billiard
import pytest
from celery.exceptions import WorkerShutdown
from celery.signals import task_postrun
from celery.worker import state

from pipeline.celery_app import TASK_GENERATE, make_celery
from pipeline.config.schema import Settings, WorkerSettings
from workers import memory_guard, tasks
from workers.memory_guard import SWITCH, Action, MemoryGuard, host_memory_percent
from workers.runtime.model_cache import ModelCache


def readings(*values: float) -> Any:
    """A reader that returns ``values`` in turn, then fails: each test says how many it expects."""
    it: Iterator[float] = iter(values)
    return lambda: next(it)


def loaded_cache() -> ModelCache[object]:
    cache: ModelCache[object] = ModelCache(2, lambda source: object())
    cache.get("tiny")
    cache.get("tiny-melody")
    return cache


@pytest.fixture
def switch_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    """The switch and Celery's warm-shutdown flag are process-wide: put them back afterwards."""
    monkeypatch.setattr(SWITCH, "requested", False)
    monkeypatch.setattr(SWITCH, "in_pool_child", False)
    monkeypatch.setattr(state, "should_stop", None)


# --- the decision -----------------------------------------------------------------------------

def test_below_the_cleanup_threshold_keeps_the_models() -> None:
    cache = loaded_cache()
    assert MemoryGuard(75.0, 85.0, readings(75.0)).after_job(cache) is Action.none
    assert cache.sources() == ["tiny", "tiny-melody"]


def test_above_the_cleanup_threshold_empties_the_model_cache() -> None:
    cache = loaded_cache()
    assert MemoryGuard(75.0, 85.0, readings(80.0, 60.0)).after_job(cache) is Action.cleaned
    assert len(cache) == 0


def test_above_max_but_relieved_by_the_cleanup_keeps_taking_jobs() -> None:
    cache = loaded_cache()
    assert MemoryGuard(75.0, 85.0, readings(92.0, 84.0)).after_job(cache) is Action.cleaned
    assert len(cache) == 0


def test_still_above_max_after_the_cleanup_stops_taking_jobs() -> None:
    cache = loaded_cache()
    assert MemoryGuard(75.0, 85.0, readings(92.0, 90.0)).after_job(cache) is Action.stop
    assert len(cache) == 0


def test_host_memory_percent_reads_meminfo(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:  1000 kB\nMemFree:  100 kB\nMemAvailable:  250 kB\n")
    assert host_memory_percent(str(meminfo)) == 75.0
    assert 0.0 < host_memory_percent() < 100.0  # this host's, from /proc or sysconf


# --- wired to Celery --------------------------------------------------------------------------

def test_task_postrun_of_a_generation_job_runs_the_guard(
        isolated_settings_env: Path, monkeypatch: pytest.MonkeyPatch, switch_reset: None) -> None:
    settings = Settings(worker=WorkerSettings(cleanup_threshold_percent=50.0, max_memory_percent=60.0))
    app = make_celery(settings, name="memory-guard-test")
    # The sender the guard sees; registering the real task would share it with every later app.
    generate_task = type("Task", (), {"name": TASK_GENERATE, "app": app})()
    guard = memory_guard.connect(app, read=readings(70.0, 65.0))
    assert (guard.cleanup_percent, guard.max_percent) == (50.0, 60.0)
    cache = loaded_cache()
    monkeypatch.setattr(tasks.STATE, "runner", type("Runner", (), {"cache": cache})())

    task_postrun.send(sender=generate_task, task_id="job-1", args=(), kwargs={},
                      retval=None, state="SUCCESS")

    assert len(cache) == 0
    assert SWITCH.requested
    # Not a pool child (solo/threads): Celery's warm shutdown, the flag SIGTERM sets.
    assert state.should_stop == 0
    with pytest.raises(WorkerShutdown):
        state.maybe_shutdown()


# --- leaving a real billiard pool -------------------------------------------------------------

def _install_in_child() -> None:
    SWITCH.install_in_pool_child()


def _job(stop: bool) -> tuple[int, bool]:
    if stop:
        SWITCH.request()
    return os.getpid(), SWITCH.in_pool_child


def test_a_stopped_pool_child_delivers_its_result_and_is_replaced() -> None:
    pool = billiard.Pool(1, initializer=_install_in_child)
    try:
        first_pid, in_child = pool.apply(_job, (True,))
        assert in_child  # the receiver was wrapped before the work loop bound it
        # apply() blocks until a result comes: the next job can only run in a fresh child.
        second_pid, _ = pool.apply(_job, (False,))
        third_pid, _ = pool.apply(_job, (False,))
    finally:
        pool.terminate()
        pool.join()
    assert second_pid != first_pid
    assert third_pid == second_pid  # without a stop request the child keeps serving
