"""After each job, look at memory use and act before the node runs out of it.

Above ``worker.cleanup_threshold_percent`` the process empties its model cache (the next job
reloads its model). If use is still above ``worker.max_memory_percent`` after that, the process
stops taking jobs: a prefork child leaves the pool between jobs and the pool forks a fresh one;
a solo or threads worker (jobs run in its main process) shuts down warmly and its process
manager restarts it. Use is the host's RAM and, where this process has initialised CUDA, the
GPU's memory, whichever is higher.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

from celery.signals import task_postrun, worker_process_init

from pipeline.infra.celery_app import TASK_GENERATE
from workers.typed_celery import receiver

log = logging.getLogger(__name__)

MemoryReader = Callable[[], float]
"""Returns memory use in percent (0-100); injected so tests can drive the thresholds."""


class Clearable(Protocol):
    def clear(self) -> None: ...


class Action(str, Enum):
    """What the guard did after a job."""

    none = "none"
    cleaned = "cleaned"  # the model cache was emptied
    stop = "stop"  # still above max_memory_percent: this process must take no further job


def host_memory_percent(meminfo: str = "/proc/meminfo") -> float:
    """The host's RAM in use, in percent: what the kernel could not hand out without swapping."""
    try:
        fields: dict[str, int] = {}
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                name, _, rest = line.partition(":")
                fields[name] = int(rest.split()[0])
        total, available = fields["MemTotal"], fields["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        # No /proc (not Linux): free pages understate what is available (page cache counts as
        # used), so this errs towards cleaning up early, never towards running out.
        total, available = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_AVPHYS_PAGES")
    return 100.0 * (total - available) / total if total > 0 else 0.0


def gpu_memory_percent() -> float | None:
    """The current GPU's memory in use by all processes, in percent; None without CUDA here.

    Blocks that torch's caching allocator holds but no tensor uses are not counted: they are this
    process's to reuse, and counting them would empty the model cache after every large job.
    """
    torch: Any = sys.modules.get("torch")  # never import torch just to look: no torch, no GPU use
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    free, total = torch.cuda.mem_get_info()
    idle_cached = torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    return 100.0 * max(0, total - free - idle_cached) / total if total > 0 else None


def memory_percent() -> float:
    """The reading the guard acts on: host RAM or GPU memory, whichever is fuller."""
    gpu = gpu_memory_percent()
    host = host_memory_percent()
    return host if gpu is None else max(host, gpu)


@dataclass(frozen=True)
class MemoryGuard:
    """The decision, free of Celery: thresholds from ``worker.*`` and a memory reader."""

    cleanup_percent: float
    max_percent: float
    read: MemoryReader = memory_percent

    def after_job(self, cache: Clearable | None) -> Action:
        used = self.read()
        if used <= self.cleanup_percent:
            return Action.none
        if cache is not None:
            log.warning("memory use %.1f%% is above worker.cleanup_threshold_percent=%g: "
                        "emptying the model cache", used, self.cleanup_percent)
            cache.clear()
            # Exiting costs a fork and a model load: only when emptying the cache was not enough.
            used = self.read()
        if used > self.max_percent:
            log.warning("memory use %.1f%% is above worker.max_memory_percent=%g: "
                        "this process takes no further job", used, self.max_percent)
            return Action.stop
        return Action.cleaned


class StopSwitch:
    """How this process stops taking jobs once the guard says so.

    In a prefork child the switch wraps the pool's job receiver (``wait_for_job``) so that the
    next time the child asks for a job it raises ``SystemExit(0)``, exactly what billiard's own
    shutdown sentinel does at that point. Why there and nothing else:
    - the job's result has already gone to the parent, and no next job has been acknowledged,
      so nothing is lost and the parent simply forks a replacement (as after
      ``worker_max_memory_per_child``, whose limit is fixed at fork and measures the child's
      RSS, not the host's or the GPU's use);
    - ``SystemExit`` raised from ``task_postrun`` would reach the parent as a lost worker, and with
      ``reject_on_worker_lost`` a job that had failed or scheduled a retry would run again;
    - SIGTERM to the child races the result write and counts as a lost worker as well.
    Outside a pool child (solo, threads) the job ran in the worker's main process, so Celery's
    warm shutdown (``state.should_stop``, what SIGTERM sets) is what stops it taking jobs.
    """

    def __init__(self) -> None:
        self.requested = False
        self.in_pool_child = False

    def install_in_pool_child(self) -> bool:
        """Wrap this pool child's job receiver; False when this is not a billiard pool child."""
        from billiard.process import current_process

        self.requested = False  # a fresh child: nothing inherited from its parent
        worker: Any = getattr(current_process(), "_target", None)
        receive = getattr(worker, "wait_for_job", None)
        if receive is None:
            self.in_pool_child = False
            return False

        def wait_for_job(*args: Any, **kwargs: Any) -> Any:
            if self.requested:
                log.warning("leaving the pool after a job over worker.max_memory_percent; "
                            "the pool starts a fresh process")
                raise SystemExit(0)
            return receive(*args, **kwargs)

        worker.wait_for_job = wait_for_job
        self.in_pool_child = True
        return True

    def request(self) -> None:
        self.requested = True
        if not self.in_pool_child:
            from celery.worker import state

            state.should_stop = 0  # EX_OK: warm shutdown, the running job (this one) finishes


SWITCH = StopSwitch()


def connect(app: Any, read: MemoryReader = memory_percent) -> MemoryGuard:
    """Check memory after every generation job of this worker (called by ``build_app``)."""
    w = app.settings.worker
    guard = MemoryGuard(w.cleanup_threshold_percent, w.max_memory_percent, read)

    @receiver(worker_process_init)
    def _in_child(**_: Any) -> None:
        # Before billiard's work loop binds the receiver (the initializer runs first).
        if not SWITCH.install_in_pool_child():
            log.warning("not a billiard pool child: worker.max_memory_percent cannot recycle it")

    @receiver(task_postrun)
    def _after_job(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "name", None) != TASK_GENERATE or sender.app is not app:
            return
        from workers.tasks import STATE

        cache = STATE.runner.cache if STATE.runner is not None else None
        if guard.after_job(cache) is Action.stop:
            SWITCH.request()

    return guard
