"""worker.cleanup_threshold_percent and worker.max_memory_percent, acted on after each job.

The decision runs with fake readings and a real ModelCache; the way out of the pool runs in a
real billiard pool, the same pool class a prefork Celery worker uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.exceptions import WorkerShutdown
from celery.signals import task_postrun
from celery.worker import state

from pipeline.config.schema import Settings, WorkerSettings
from pipeline.infra.celery_app import TASK_GENERATE, make_celery
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

# Run in a fresh interpreter: forked from the test process, which by then holds other tests'
# threads (torch's pool, batcher loops), a pool child could inherit a lock held mid-fork and
# hang (seen once in CI). A worker's pool is forked from a process without those threads.
REPO = Path(__file__).resolve().parents[2]
POOL_SCRIPT = """
import json, os
import billiard
from workers.memory_guard import SWITCH

def install():
    SWITCH.install_in_pool_child()

def job(stop):
    if stop:
        SWITCH.request()
    return os.getpid(), SWITCH.in_pool_child

if __name__ == "__main__":
    pool = billiard.Pool(1, initializer=install)
    try:
        # apply() blocks until a result comes: the next job can only run in a fresh child.
        runs = [pool.apply_async(job, (stop,)).get(timeout=120) for stop in (True, False, False)]
    finally:
        pool.terminate()
        pool.join()
    print(json.dumps(runs))
"""


def test_a_stopped_pool_child_delivers_its_result_and_is_replaced(tmp_path: Path) -> None:
    script = tmp_path / "pool_run.py"
    script.write_text(POOL_SCRIPT, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=240, check=False, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (first_pid, in_child), (second_pid, _), (third_pid, _) = json.loads(proc.stdout.splitlines()[-1])
    assert in_child  # the receiver was wrapped before the work loop bound it
    assert second_pid != first_pid
    assert third_pid == second_pid  # without a stop request the child keeps serving
