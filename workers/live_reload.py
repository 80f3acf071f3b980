"""Live settings in a worker: a file edit, SIGHUP, or ``musicgen-pipeline settings reload``.

Each process that runs jobs keeps a ``LiveSettings`` (pipeline/config/live.py): the main process
of the solo and threads pools, and every prefork child (each watches the files itself). An
applied change swaps ``app.settings`` and drops what was built from the old object (the rate
limiter, the breakers, the quota store's tiers) so the next job builds it again, and gives the
batcher its new size and wait; a running job finishes under the settings it started with.

SIGHUP normally makes Celery re-exec the whole worker (dropping its loaded model); here it means
"reload the settings", as it does for most daemons. A prefork main process that reloads on
SIGHUP or on the command tells its pool processes through a counter in shared memory (made
before the pool forks): a signal would end them, billiard takes SIGHUP for a termination signal.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from typing import Any

from celery.signals import worker_process_init, worker_ready
from celery.worker.control import control_command

from pipeline.config.live import RELOAD_COMMAND, FileWatcher, LiveSettings
from pipeline.config.schema import Settings
from pipeline.infra.celery_app import TASK_GENERATE, PipelineCelery
from workers import tasks
from workers.metrics import observe_settings_reload
from workers.typed_celery import receiver

log = logging.getLogger(__name__)

_live: LiveSettings | None = None
_reloadable = False  # set by connect(): only for settings this process loaded itself
# Raised by the main process after each reload it was asked for; pool processes watch it.
_pokes: Any = None


def apply_to_worker(app: PipelineCelery, new: Settings) -> None:
    """Make ``new`` the settings of every job that starts from now on in this process."""
    app.settings = new
    task = app.tasks.get(TASK_GENERATE)
    if task is not None:  # read by the prefork pool for each job it hands to a child
        task.soft_time_limit = new.worker.soft_time_limit
        task.time_limit = new.worker.hard_time_limit
    with tasks._STATE_LOCK:
        # Rebuilt from app.settings on next use. The old quota store is not closed: a job that
        # is recording its finish may hold it; its engine goes with the last reference.
        tasks.STATE.policies = None
        tasks.STATE.quota = None
        runner = tasks.STATE.runner
    if runner is not None:
        runner.apply_settings(new)


def live_settings(app: PipelineCelery) -> LiveSettings:
    """This process's live settings (made on first use, from the app's current settings)."""
    global _live
    if _live is None:
        _live = LiveSettings(current=app.settings,
                             on_result=lambda r: observe_settings_reload(r.outcome))
        _live.subscribe(lambda _old, new: apply_to_worker(app, new))
    return _live


def _tell_pool_processes() -> None:
    if _pokes is not None:
        with _pokes.get_lock():
            _pokes.value += 1


def _start_watching(app: PipelineCelery, *, main: bool) -> None:
    live = live_settings(app)
    poke = None if main or _pokes is None else (lambda: int(_pokes.value))
    FileWatcher(live, interval=lambda: live.current.app.settings_poll_interval, poke=poke).start()
    if not main:
        return  # billiard owns a pool process's signals
    if threading.current_thread() is not threading.main_thread():
        log.warning("not on the main thread: SIGHUP will not reload the settings")
        return

    def reload_and_tell() -> None:
        live.reload("SIGHUP")
        _tell_pool_processes()

    def on_hup(_signum: int, _frame: Any) -> None:
        # A signal handler must not take locks the interrupted code may hold: reload elsewhere.
        threading.Thread(target=reload_and_tell, name="settings-reload", daemon=True).start()

    signal.signal(signal.SIGHUP, on_hup)


def connect(app: PipelineCelery) -> None:
    """Called in the main process before the pool starts (so the counter is shared)."""
    global _reloadable, _pokes
    _reloadable = True
    _pokes = multiprocessing.Value("L", 0)  # a few bytes; used by the prefork pool only

    @receiver(worker_ready)
    def _in_main(**_: Any) -> None:
        _start_watching(app, main=True)

    @receiver(worker_process_init)
    def _in_child(**_: Any) -> None:  # prefork children: their own copy, their own watcher
        global _live
        _live = None
        _start_watching(app, main=False)


@control_command(name=RELOAD_COMMAND)  # type: ignore[untyped-decorator]
def _reload_command(state: Any, **_: Any) -> dict[str, Any]:
    """``app.control.broadcast(RELOAD_COMMAND, reply=True)``: reload and say what happened."""
    app = state.consumer.app
    if not _reloadable:
        return {"outcome": "failed", "changes": [], "errors": [],
                "message": "this worker runs with settings its embedding program gave it; "
                           "it does not reload them"}
    result = live_settings(app).reload("settings reload command")
    _tell_pool_processes()
    return result.as_dict()
