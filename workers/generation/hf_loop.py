"""The HF loop: one ``model.generate`` call per batch of tickets that may share it.

Each task thread with a job ready to generate (decoded, admitted, its melody read) submits it
and gets a :class:`~workers.generation.ticket.Ticket`; the loop thread runs the batches
``scheduler.next_hf_batch`` forms (same model, same batch key: see ``workers.runtime.batch``).
A ticket that arrives alone waits at most ``batch_wait_s`` for company, then runs.

The loop only generates. The task thread that submitted a ticket waits on it, reports its
progress, watches its cancel flag and soft time limit, and renders the audio itself once the
ticket resolves, so the loop is generating the next batch while the last one is encoded (the
worker's concurrency, twice the batch size, bounds how many renders can be waiting).

Per-job failure semantics live here:

- a ticket dropped by its task (cancel, soft limit) leaves its batch at the next decoding step:
  it resolves at once and its row is discarded; when every row of a call is dropped the call is
  abandoned (``transformers``' generate cannot remove a row mid-call, so the dropped row's
  compute goes on until the call ends or is abandoned);
- a transient error of a whole call (GPU out of memory) splits the batch and runs the halves;
  only a single job's out-of-memory reaches that job (as a retryable error);
- any other error of a call fails the jobs of that call (the model failed for all of them);
  one that says the device's context is dead (``workers.watchdog.device_lost``: a device-side
  assert, an illegal memory access) ends the process first, as a hard limit does;
- a call that runs past ``hard_limit_s`` (a hung kernel, a stuck driver) ends the process, as
  Celery's hard time limit would: the unacked messages are redelivered and the poison cap
  counts them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from typing import Any

from pipeline.errors import GpuOutOfMemory
from workers.generation.loop import BatchStats, LoopThread
from workers.generation.scheduler import check_batch_size, live, longest_limit, next_hf_batch
from workers.generation.ticket import Ticket, fail_all, settle
from workers.health import IDLE_TICK_S, loop_tick
from workers.partials import PartialCodes
from workers.runtime.batch import GeneratedAudio, GenerationItem
from workers.watchdog import device_lost

log = logging.getLogger(__name__)

# (loaded model, items, progress, window hook) -> their audio, in order: the runtime's
# ``workers.runtime.musicgen.generate``. The hook hears of each finished window of a long clip.
GenerateFn = Callable[[Any, list[GenerationItem], Callable[[float, str], None],
                       Callable[[Any], None] | None], list[GeneratedAudio]]


class BatchAbandoned(Exception):
    """Raised inside a generate call whose every row was dropped: nobody waits for its audio."""


class HfLoop(LoopThread):
    """The HF generation loop of one worker process (started on the first submission)."""

    thread_name = "generation-loop"

    def __init__(self, generate: GenerateFn, *, max_batch_size: int, batch_wait_s: float,
                 hard_limit_s: float | None = None,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_hard_limit: Callable[[], None] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, hard_limit_s=hard_limit_s,
                         on_batch=on_batch, on_hard_limit=on_hard_limit, what="a generate call")
        self._generate = generate
        self.batch_wait_s = max(0.0, batch_wait_s)
        self._pending: list[Ticket] = []

    def configure(self, *, max_batch_size: int, batch_wait_s: float,
                  hard_limit_s: float | None) -> None:
        """New limits from a settings reload: the next batch formed uses them (a running call
        keeps the hard limit it started under only until the watchdog's next look)."""
        check_batch_size(max_batch_size)
        with self._cond:
            self.max_batch_size = max_batch_size
            self.batch_wait_s = max(0.0, batch_wait_s)
            self.watchdog.configure(hard_limit_s)
            self._cond.notify_all()  # a batch waiting for company may be due now

    def submit(self, loaded: Any, item: GenerationItem, key: Hashable, *, model: str = "",
               hard_limit_s: float | None = None) -> Ticket:
        """Queue one job; the loop generates it with others of the same model and ``key``.

        ``hard_limit_s`` replaces the loop's hard limit for calls this job is in (the
        longest of a call's jobs applies): a long clip's call runs longer than a short one's.
        """
        ticket = Ticket(loaded=loaded, item=item, key=key, model=model, hard_limit_s=hard_limit_s)
        self.enqueue(ticket)
        return ticket

    def enqueue(self, ticket: Ticket) -> None:
        """Queue a ticket made elsewhere (the engine loop hands over what its engine cannot
        generate); it keeps its submission time, so its age still counts."""
        with self._cond:
            self._start()
            self._pending.append(ticket)
            self._cond.notify_all()

    def pending(self) -> int:
        """Tickets waiting for a batch (not counting the running call)."""
        with self._cond:
            return len(live(self._pending))

    def prepare(self, loaded: Any) -> bool:
        """Nothing to build ahead for HF generate: a loaded model is ready."""
        return True

    def release_idle_engines(self) -> int:
        """The HF loop holds no engine (the ``GenerationLoop`` contract)."""
        return 0

    # --- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            loop_tick("hf")  # /livez
            batch = self._next_batch()
            wait_s = time.monotonic() - batch[0].submitted
            started = time.monotonic()
            self._run(batch)
            elapsed = time.monotonic() - started
            self._busy(elapsed)
            self._record(batch[0].model, len(batch), wait_s, elapsed)

    def _next_batch(self) -> list[Ticket]:
        """Block until the scheduler has a batch due."""
        with self._cond:
            while True:
                decision = next_hf_batch(self._pending, max_batch_size=self.max_batch_size,
                                         batch_wait_s=self.batch_wait_s, now=time.monotonic())
                self._pending = decision.pending
                if decision.batch:
                    return decision.batch
                self._cond.wait(IDLE_TICK_S if decision.wait_s is None else decision.wait_s)
                if decision.wait_s is None:
                    loop_tick("hf")  # idle is not stuck

    def _run(self, batch: list[Ticket]) -> None:
        rows = live(batch)
        if not rows:
            return
        try:
            with self.watchdog.timing(longest_limit(rows)):
                audio = self._generate(rows[0].loaded, [t.item for t in rows],
                                       self._progress(rows), self._partials(rows))
        except BatchAbandoned:
            log.info("abandoned a batch of %d: every job in it was dropped", len(rows))
            return
        except GpuOutOfMemory as exc:
            if len(rows) == 1:
                settle(rows[0], error=exc)
                return
            half = len(rows) // 2
            log.warning("out of GPU memory with a batch of %d; running it as %d + %d",
                        len(rows), half, len(rows) - half)
            self._run(rows[:half])
            self._run(rows[half:])
            return
        except BaseException as exc:  # the model failed for every job of this call
            if isinstance(exc, Exception) and device_lost(exc):
                # A dead CUDA context fails every later call of this process: end it (as a hard
                # limit does) so the jobs are redelivered to a fresh one. Only a test's callback
                # returns here; the jobs then fail with the error below.
                log.critical("unrecoverable device error in generate (%s: %s): ending the "
                             "process so that its process manager starts a fresh one",
                             type(exc).__name__, exc)
                self._end_process()
            fail_all(rows, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for ticket, clip in zip(rows, audio, strict=True):
            ticket.finish(clip)

    @staticmethod
    def _progress(batch: list[Ticket]) -> Callable[[float, str], None]:
        def report(fraction: float, message: str) -> None:
            loop_tick("hf")  # each generation step: a long generate call is not a stuck one
            if all(t.dropped for t in batch):
                raise BatchAbandoned()
            for ticket in batch:
                ticket.fraction = fraction
                ticket.message = message

        return report

    @staticmethod
    def _partials(batch: list[Ticket]) -> Callable[[Any], None]:
        def finished(window: Any) -> None:  # a longform.WindowCodes: the loop stays torch-free
            if window.window.index + 1 >= window.count:
                return  # the last window's audio is the result itself
            for row, ticket in enumerate(batch):
                if not ticket.dropped:
                    ticket.partial = PartialCodes(window.clip[row].clone(), window.window.index + 1,
                                                  window.count)

        return finished
