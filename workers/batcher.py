"""The batching engine: one generation loop per worker process, fed by the task threads.

Each Celery task thread that has a job ready to generate (decoded, admitted, its melody read)
submits it here and gets a :class:`Ticket`; one loop thread takes up to ``max_batch_size`` tickets
that may share a ``model.generate`` call (same model, same batch key: see
``workers.runtime.batch``) and generates them together. A ticket that arrives alone waits at
most ``batch_wait_s`` (from its own submission) for company, then runs; the oldest ticket always
leads the next batch, so no key starves another.

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
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import GpuOutOfMemory
from workers.health import IDLE_TICK_S, loop_tick
from workers.partials import PartialCodes
from workers.runtime.batch import GeneratedAudio, GenerationItem, window_sink
from workers.watchdog import HardLimitWatchdog, device_lost, exit_process

log = logging.getLogger(__name__)

GenerateFn = Callable[[Any, list[GenerationItem], Callable[[float, str], None]], list[GeneratedAudio]]


class BatchAbandoned(Exception):
    """Raised inside a generate call whose every row was dropped: nobody waits for its audio."""


@dataclass(frozen=True)
class BatchStats:
    """One finished ``model.generate`` call, for metrics."""

    model: str
    size: int
    # How long the batch's oldest job waited between submission and the call; for a step of
    # the continuous loop, the oldest job admitted just before it (None: nobody was admitted).
    wait_s: float | None
    generate_s: float
    busy_fraction: float  # the loop's generating time over its wall time since it started


@dataclass(eq=False)
class Ticket:
    """One job's place in the engine; its task thread waits on ``future``."""

    loaded: Any  # the LoadedModel the job runs on; batches never mix models
    item: GenerationItem
    key: Hashable
    model: str = ""  # the preset's name, for metrics and logs
    submitted: float = field(default_factory=time.monotonic)
    future: Future[GeneratedAudio] = field(default_factory=Future)
    fraction: float = 0.0  # generation progress in [0, 1], written by the loop
    message: str = ""  # what the loop is doing for it ("window 3 of 7: ..."), written by the loop
    hard_limit_s: float | None = None  # this job's own hard limit (scaled with its duration)
    partial: Any = None  # a long job's PartialCodes after each window but the last (the loop)

    @property
    def dropped(self) -> bool:
        """Resolved before its audio arrived (cancelled, timed out) or already answered."""
        return self.future.done()

    def drop(self, reason: BaseException) -> None:
        """The job no longer wants its audio: leave the batch at the next step."""
        _settle(self.future, error=reason)


def _settle(future: Future[GeneratedAudio], *, audio: GeneratedAudio | None = None,
            error: BaseException | None = None) -> None:
    # The task thread may drop a ticket while the loop resolves it: the first answer wins.
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(audio)  # type: ignore[arg-type]
    except Exception:  # InvalidStateError: already answered
        pass


class Batcher:
    """The generation loop of one worker process (started on the first submission)."""

    def __init__(self, generate: GenerateFn, *, max_batch_size: int, batch_wait_s: float,
                 hard_limit_s: float | None = None,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_hard_limit: Callable[[], None] | None = None) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._generate = generate
        self.max_batch_size = max_batch_size
        self.batch_wait_s = max(0.0, batch_wait_s)
        self._on_batch = on_batch
        self.watchdog = HardLimitWatchdog(hard_limit_s, on_hard_limit)
        self._end_process = on_hard_limit or exit_process
        self._pending: list[Ticket] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._loop_started = 0.0
        self._busy_s = 0.0

    def configure(self, *, max_batch_size: int, batch_wait_s: float,
                  hard_limit_s: float | None) -> None:
        """New limits from a settings reload: the next batch formed uses them (a running call
        keeps the hard limit it started under only until the watchdog's next look)."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        with self._cond:
            self.max_batch_size = max_batch_size
            self.batch_wait_s = max(0.0, batch_wait_s)
            self.watchdog.configure(hard_limit_s)
            self._cond.notify_all()  # a batch waiting for company may be due now

    def submit(self, loaded: Any, item: GenerationItem, key: Hashable, *, model: str = "",
               hard_limit_s: float | None = None) -> Ticket:
        """Queue one job; the loop generates it with others of the same model and ``key``.

        ``hard_limit_s`` replaces the batcher's hard limit for calls this job is in (the
        longest of a call's jobs applies): a long clip's call runs longer than a short one's.
        """
        ticket = Ticket(loaded=loaded, item=item, key=key, model=model, hard_limit_s=hard_limit_s)
        self.enqueue(ticket)
        return ticket

    def enqueue(self, ticket: Ticket) -> None:
        """Queue a ticket made elsewhere (the continuous loop hands over what its engine cannot
        generate); it keeps its submission time, so its age still counts."""
        with self._cond:
            self._start()
            self._pending.append(ticket)
            self._cond.notify_all()

    def pending(self) -> int:
        """Tickets waiting for a batch (not counting the running call)."""
        with self._cond:
            return sum(1 for t in self._pending if not t.dropped)

    def _start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        # A restarted loop's fraction covers its own life only: busy time of a dead thread's
        # over a new thread's wall time could read above 1.
        self._loop_started, self._busy_s = time.monotonic(), 0.0
        self._thread = threading.Thread(target=self._loop, name="generation-loop", daemon=True)
        self._thread.start()
        self.watchdog.start()

    # --- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            loop_tick("hf")  # /livez
            batch = self._next_batch()
            wait_s = time.monotonic() - batch[0].submitted
            started = time.monotonic()
            self._run(batch)
            elapsed = time.monotonic() - started
            self._busy_s += elapsed
            if self._on_batch is not None:
                wall = max(time.monotonic() - self._loop_started, 1e-9)
                try:
                    self._on_batch(BatchStats(batch[0].model, len(batch), wait_s, elapsed, self._busy_s / wall))
                except Exception:  # metrics must never stop the loop
                    log.exception("could not record batch metrics")

    def _next_batch(self) -> list[Ticket]:
        """Block until a batch is due: full, or its oldest job has waited ``batch_wait_s``."""
        with self._cond:
            while True:
                self._pending = [t for t in self._pending if not t.dropped]
                if not self._pending:
                    self._cond.wait(IDLE_TICK_S)  # wake to tick: idle is not stuck
                    loop_tick("hf")
                    continue
                head = self._pending[0]
                mates = [t for t in self._pending
                         if t.loaded is head.loaded and t.key == head.key][:self.max_batch_size]
                remaining = head.submitted + self.batch_wait_s - time.monotonic()
                if len(mates) >= self.max_batch_size or remaining <= 0:
                    taken = set(map(id, mates))
                    self._pending = [t for t in self._pending if id(t) not in taken]
                    return mates
                self._cond.wait(remaining)

    def _run(self, batch: list[Ticket]) -> None:
        live = [t for t in batch if not t.dropped]
        if not live:
            return
        limits = [t.hard_limit_s for t in live if t.hard_limit_s is not None]
        sink = window_sink.set(self._partials(live))
        try:
            with self.watchdog.timing(max(limits) if limits else None):
                audio = self._generate(live[0].loaded, [t.item for t in live], self._progress(live))
        except BatchAbandoned:
            log.info("abandoned a batch of %d: every job in it was dropped", len(live))
            return
        except GpuOutOfMemory as exc:
            if len(live) == 1:
                _settle(live[0].future, error=exc)
                return
            half = len(live) // 2
            log.warning("out of GPU memory with a batch of %d; running it as %d + %d",
                        len(live), half, len(live) - half)
            self._run(live[:half])
            self._run(live[half:])
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
            for ticket in live:
                _settle(ticket.future, error=exc)
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            window_sink.reset(sink)
        for ticket, clip in zip(live, audio, strict=True):
            ticket.fraction = 1.0
            _settle(ticket.future, audio=clip)

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
