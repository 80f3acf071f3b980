"""What both generation loops share: the contract ``workers.job_runner`` depends on
(:class:`GenerationLoop`), and the loop thread's upkeep (:class:`LoopThread`): its start, its
hard-limit watchdog, its busy fraction and the ``BatchStats`` it reports for metrics."""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from workers.generation.scheduler import check_batch_size
from workers.generation.ticket import Ticket
from workers.runtime.batch import GenerationItem
from workers.watchdog import HardLimitWatchdog, exit_process

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchStats:
    """One finished ``model.generate`` call (or engine step), for metrics."""

    model: str
    size: int
    # How long the batch's oldest job waited between submission and the call; for a step of
    # the engine loop, the oldest job admitted just before it (None: nobody was admitted).
    wait_s: float | None
    generate_s: float
    busy_fraction: float  # the loop's generating time over its wall time since it started


class GenerationLoop(Protocol):
    """One worker process's generation loop, as the task threads see it."""

    def submit(self, loaded: Any, item: GenerationItem, key: Hashable, *, model: str = "",
               hard_limit_s: float | None = None) -> Ticket: ...
    def configure(self, *, max_batch_size: int, batch_wait_s: float,
                  hard_limit_s: float | None) -> None: ...
    def pending(self) -> int: ...
    def prepare(self, loaded: Any) -> bool: ...
    def release_idle_engines(self) -> int: ...


class LoopThread(ABC):
    """The thread of one loop (started on the first submission) and what it keeps up."""

    thread_name = "generation-loop"

    def __init__(self, *, max_batch_size: int, hard_limit_s: float | None,
                 on_batch: Callable[[BatchStats], None] | None,
                 on_hard_limit: Callable[[], None] | None, what: str) -> None:
        check_batch_size(max_batch_size)
        self.max_batch_size = max_batch_size
        self._on_batch = on_batch
        self.watchdog = HardLimitWatchdog(hard_limit_s, on_hard_limit, what=what)
        # The hard limit's way out serves a dead device too: the process ends, its unacked
        # messages are redelivered and the process manager starts a fresh one.
        self._end_process = on_hard_limit or exit_process
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop_started = 0.0
        self._busy_s = 0.0

    def _start(self) -> None:
        """Start the loop thread unless it runs (the caller holds ``_cond``)."""
        if self._thread is not None and self._thread.is_alive():
            return
        # A restarted loop's fraction covers its own life only: busy time of a dead thread's
        # over a new thread's wall time could read above 1.
        self._loop_started, self._busy_s = time.monotonic(), 0.0
        self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
        self._thread.start()
        self.watchdog.start()

    @abstractmethod
    def _loop(self) -> None:
        """The loop thread's body: form or admit, run, record; it never returns."""

    def _busy(self, seconds: float) -> None:
        """Count ``seconds`` of the loop's time as generating."""
        self._busy_s += seconds

    def _record(self, model: str, size: int, wait_s: float | None, elapsed: float) -> None:
        """Report one call or step (already counted by ``_busy``) to ``on_batch``."""
        if self._on_batch is None:
            return
        wall = max(time.monotonic() - self._loop_started, 1e-9)
        try:
            self._on_batch(BatchStats(model, size, wait_s, elapsed, self._busy_s / wall))
        except Exception:  # metrics must never stop the loop
            log.exception("could not record batch metrics")
