"""The hard time limit of a generation loop: a call on the device that never returns ends the
process, as Celery's hard time limit would.

A hung CUDA kernel or a stuck driver cannot be interrupted from Python, so a loop thread that is
inside one cannot notice its own hang: a second thread looks at the running call's start every
``WATCHDOG_INTERVAL_S`` and ends the process once it has run past its limit. The unacked
messages are then redelivered (and counted by the poison cap) and the process manager restarts
the worker. Both loops use it: ``workers.generation.hf_loop`` times each ``model.generate`` call,
``workers.generation.engine_loop`` each engine step and admission.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# How often the watchdog looks at the running call; the hard limit is enforced to this precision.
WATCHDOG_INTERVAL_S = 0.5
HARD_LIMIT_EXIT_CODE = 70  # EX_SOFTWARE: the supervisor sees a crash, not a clean stop


class HardLimitWatchdog:
    """Times one call at a time of its loop; ``on_hard_limit`` runs when one passes its limit.

    ``limit_s`` None turns it off for good: the thread exists only when a limit is set at the
    start (a reload can change the limit, not switch the watchdog on).
    """

    def __init__(self, limit_s: float | None, on_hard_limit: Callable[[], None] | None = None,
                 *, what: str = "a generate call") -> None:
        self.limit_s = limit_s
        self._on_hard_limit = on_hard_limit or exit_process
        self._what = what
        self.call_started: float | None = None  # monotonic start of the running call
        self.call_limit: float | None = None  # the running call's own limit, if it has one
        self._thread: threading.Thread | None = None

    def configure(self, limit_s: float | None) -> None:
        """A new base limit from a settings reload (only while the watchdog is on)."""
        if self.limit_s is not None and limit_s is not None:
            self.limit_s = limit_s

    def start(self) -> None:
        if self.limit_s is None or (self._thread is not None and self._thread.is_alive()):
            return
        self._thread = threading.Thread(target=self._watch, name="generation-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def timing(self, limit_s: float | None = None) -> Iterator[None]:
        """Time the call inside the block, under ``limit_s`` (the base limit when None)."""
        self.call_limit = limit_s if limit_s is not None else self.limit_s
        self.call_started = time.monotonic()
        try:
            yield
        finally:
            self.call_started = None

    def _watch(self) -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL_S)
            started, limit = self.call_started, self.call_limit or self.limit_s
            if started is not None and limit is not None and time.monotonic() - started > limit:
                log.critical("hard time limit (%g s) passed by %s: ending the process so its "
                             "jobs are redelivered", limit, self._what)
                self._on_hard_limit()
                return


def exit_process() -> None:
    # A hung CUDA kernel cannot be interrupted from Python; only the process's end frees the GPU.
    logging.shutdown()
    os._exit(HARD_LIMIT_EXIT_CODE)


# What torch says when the device's context is gone for good: after a device-side assert (an
# index out of range in a kernel), an illegal memory access or a launch failure, every later CUDA
# call in the process fails the same way. Out of memory is not among them: it passes.
DEVICE_LOST_MARKERS = ("device-side assert", "cuda error", "illegal memory access",
                       "unspecified launch failure", "illegal instruction", "misaligned address",
                       "cublas_status_execution_failed")


def device_lost(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) says the device's context is dead."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        message = str(current).lower()
        if "out of memory" not in message and any(m in message for m in DEVICE_LOST_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False
