"""The worker class: Celery's, with a soft shutdown that ends when the running jobs do.

Celery's soft shutdown (``worker_soft_shutdown_timeout``) sleeps the whole timeout, whether
the running job ends after one second or there is no job at all (with
``worker_enable_soft_shutdown_on_idle``): every deploy, scale-down and SIGTERM cost
``worker.shutdown_grace`` seconds (30 by default) for nothing. Here the wait ends as soon as no
job is active, and never lasts longer than the grace. The wait still runs inside the signal
handler, as Celery's does, so no new job is fetched meanwhile.

Where a job's end is reported by the main thread itself (the prefork pool's result handler
and the solo pool both run there), the main thread is the one waiting: the wait then lasts the
grace, as Celery's would. The early end is for the threads pool (the default) and for an idle
worker of any pool.
"""

from __future__ import annotations

import logging
import time

from celery.apps.worker import Worker as CeleryWorker
from celery.worker import state

log = logging.getLogger(__name__)

POLL_S = 0.1


class Worker(CeleryWorker):  # type: ignore[misc]
    def wait_for_soft_shutdown(self) -> None:
        grace = float(self.app.conf.worker_soft_shutdown_timeout or 0)
        if grace <= 0 or not state.active_requests:
            return
        # Celery's own wording first: operators' alerts and our tests look for it.
        log.warning("Initiating Soft Shutdown, terminating in %s seconds, or when the %d running "
                    "job(s) end", grace, len(state.active_requests))
        deadline = time.monotonic() + grace
        while state.active_requests and time.monotonic() < deadline:
            time.sleep(POLL_S)
        if state.active_requests:
            log.warning("soft shutdown: %d job(s) still running after %g s; they go back to the "
                        "queue", len(state.active_requests), grace)
