"""The engine loop: continuous batching, one decode step at a time of an engine whose rows come
and go.

The task threads see the same contract as with ``hf_loop`` (``loop.GenerationLoop``): ``submit``
returns a :class:`~workers.generation.ticket.Ticket`, the thread waits on its future, reports its ``fraction`` and
``message``, and drops it on cancel or soft limit. What differs is the loop. Instead of one
``model.generate`` call per batch, it drives an engine (``workers.runtime.engine.StaticEngine``)
one decode step at a time, and between two steps it:

- releases the rows of dropped tickets (cancel, soft limit): their slots are free at once;
- admits waiting tickets into free rows, oldest first, whatever their duration or guidance
  scale (no batch key: each row has its own position and its own guidance);
- after the step, resolves each finished ticket at once, so its task thread renders while the
  loop keeps stepping, and writes every running ticket's progress.

A job that arrives alone starts at once: later jobs join the running batch, so waiting for
company buys nothing (``generation.batch_wait_ms`` applies to the HF path only).

What the engine cannot generate (melody, past the window, any model it cannot drive) goes to the
HF loop given as ``fallback``, which runs it exactly as ``HfLoop`` always has (batch key, OOM
split, partial windows) in its own loop thread; both loops share the device. A continuation
within the window is the engine's: its row replays the clip's codes first.

Fairness between models: one engine steps at a time (one per ``LoadedModel``, by identity). The
oldest waiting ticket picks the model; while a ticket of another model waits longer than any of
the current model's, the current engine admits nothing, drains, and the loop switches.

Failures stay per job: a step's out-of-memory releases the newest row and fails only its job
(``GpuOutOfMemory``, retryable: Celery runs it again later) while the others step on, and the
engine then admits no more rows than survived until it drains; a finished row whose EnCodec
decode failed fails only its own job (the engine hands that error back as the row's result);
any other step error fails the jobs of that step with a typed error (``ModelRuntimeError`` for
anything that is not a ``PipelineError`` already, an IndexError included); a step or admission
that runs past the hard limit ends the process (``workers.watchdog``), and so does one that fails
with an unrecoverable device error (``device_lost``: a CUDA device-side assert or illegal memory
access leaves the process's CUDA context dead, so every later job on it would fail too).

``max_batch_size`` caps the rows in use. An engine is built with that many rows; a reload that
lowers it caps admissions, one that raises it past the engine's ``max_rows`` lets that engine
drain (no new admissions) and builds a larger one for the next jobs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.errors import GpuOutOfMemory, ModelRuntimeError, PipelineError
from workers.generation.hf_loop import HfLoop
from workers.generation.loop import BatchStats, LoopThread
from workers.generation.scheduler import (
    admissions,
    check_batch_size,
    dropped_rows,
    engine_room,
    live,
    longest_limit,
    without,
)
from workers.generation.ticket import Ticket, fail_all, settle
from workers.health import IDLE_TICK_S, loop_tick
from workers.runtime.batch import GeneratedAudio, GenerationItem, seed_of
from workers.watchdog import device_lost

log = logging.getLogger(__name__)


def typed(error: Exception, during: str) -> PipelineError:
    """``error`` as the job's typed error: a ``PipelineError`` as it is, anything else (an
    IndexError, a RuntimeError the engine did not convert) a ``ModelRuntimeError`` caused by it."""
    if isinstance(error, PipelineError):
        return error
    converted = ModelRuntimeError(f"model failed during {during}: {type(error).__name__}: {error}",
                                  details={"device_lost": device_lost(error)})
    converted.__cause__ = error
    return converted


class Engine(Protocol):
    """What the loop needs of a decode engine (``workers.runtime.engine.StaticEngine``)."""

    @property
    def max_rows(self) -> int: ...
    def supports(self, item: GenerationItem) -> bool: ...
    def free_rows(self) -> int: ...
    def active(self) -> int: ...
    def admit(self, item: GenerationItem, seed: int) -> int: ...
    # The rows that finished, each with its audio or the error that ended it alone.
    def step(self) -> list[tuple[int, GeneratedAudio | PipelineError]]: ...
    def release(self, row: int) -> None: ...
    def progress(self, row: int) -> float: ...
    # Streaming (stream=True rows): the frames final so far, and a copy of a span of them.
    def final_frames(self, row: int) -> int: ...
    def codes_range(self, row: int, lo: int, hi: int) -> Any: ...


# (loaded model, rows) -> an engine for it. It raises ``unsupported`` for a model it cannot drive.
EngineFactory = Callable[[Any, int], Engine]


@dataclass(eq=False)
class _ModelEngine:
    """One loaded model's engine and the tickets in its rows (in admission order)."""

    loaded: Any
    engine: Engine | None  # None: this model cannot be driven; its jobs take the HF path
    rows: dict[int, Ticket] = field(default_factory=dict)
    oom_cap: int | None = None  # after an out-of-memory: the rows that fit, until it drains


class EngineLoop(LoopThread):
    """The continuous-batching loop of one worker process (started on the first submission)."""

    thread_name = "continuous-loop"

    def __init__(self, make_engine: EngineFactory, fallback: HfLoop, *, max_batch_size: int,
                 hard_limit_s: float | None = None,
                 unsupported: tuple[type[BaseException], ...] = (),
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_hard_limit: Callable[[], None] | None = None) -> None:
        super().__init__(max_batch_size=max_batch_size, hard_limit_s=hard_limit_s,
                         on_batch=on_batch, on_hard_limit=on_hard_limit, what="an engine step")
        self._make_engine = make_engine
        self.fallback = fallback
        self._unsupported = unsupported  # EngineUnsupported: passed in, this module stays torch-free
        self._incoming: list[Ticket] = []  # submitted, not yet routed (engine or fallback)
        self._waiting: list[Ticket] = []  # routed to an engine, waiting for a row, oldest first
        self._engines: dict[int, _ModelEngine] = {}  # by id(loaded); the entry holds loaded
        self._current: _ModelEngine | None = None  # the engine stepping now
        self._build = threading.Lock()  # held while an engine is built

    # --- the task threads' side (the GenerationLoop contract) ------------------------------------
    def configure(self, *, max_batch_size: int, batch_wait_s: float,
                  hard_limit_s: float | None) -> None:
        """New limits from a settings reload: the next admissions use them; the batch wait and
        the rest go to the HF fallback (see the module's docstring for a larger size)."""
        check_batch_size(max_batch_size)
        self.fallback.configure(max_batch_size=max_batch_size, batch_wait_s=batch_wait_s,
                                hard_limit_s=hard_limit_s)
        with self._cond:
            self.max_batch_size = max_batch_size
            self.watchdog.configure(hard_limit_s)
            self._cond.notify_all()

    def submit(self, loaded: Any, item: GenerationItem, key: Hashable, *, model: str = "",
               hard_limit_s: float | None = None) -> Ticket:
        """Queue one job; ``key`` matters only if it takes the HF path (its batch key there)."""
        ticket = Ticket(loaded=loaded, item=item, key=key, model=model, hard_limit_s=hard_limit_s)
        with self._cond:
            self._start()
            self._incoming.append(ticket)
            self._cond.notify_all()
        return ticket

    def pending(self) -> int:
        """Tickets waiting for a row or a batch (not counting running rows and calls)."""
        with self._cond:
            mine = len(live((*self._incoming, *self._waiting)))
        return mine + self.fallback.pending()

    def active(self) -> int:
        """Rows in use in the engine stepping now."""
        with self._cond:
            return len(self._current.rows) if self._current is not None else 0

    def release_idle_engines(self) -> int:
        """Drop the engines that have no rows in use and no job waiting; how many went.

        An engine holds its model: called before a model load (which evicts one from the cache)
        so that the evicted model's memory is really freed. The next job of a model builds its
        engine again.
        """
        with self._cond:
            busy = {id(t.loaded) for t in (*self._incoming, *self._waiting)}
            idle = [key for key, me in self._engines.items()
                    if not me.rows and key not in busy and me is not self._current]
            for key in idle:
                del self._engines[key]
            return len(idle)

    # --- the loop ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            loop_tick("continuous")  # /livez: a step that never returns stops these ticks
            self._route()
            current = self._choose()
            if current is None:
                continue
            assert current.engine is not None
            self._release_dropped(current)
            started = time.monotonic()
            wait_s = self._admit(current)
            if not current.rows:
                self._busy(time.monotonic() - started)
                continue  # every admission failed or went elsewhere
            size, model = len(current.rows), next(iter(current.rows.values())).model
            self._step(current)
            elapsed = time.monotonic() - started
            self._busy(elapsed)
            self._record(model, size, wait_s, elapsed)

    def _route(self) -> None:
        """Send each new ticket to an engine's waiting line or to the HF fallback, and make sure
        the oldest waiting ticket has an engine of the current size once nothing is stepping."""
        with self._cond:
            incoming, self._incoming = self._incoming, []
        for ticket in incoming:
            if ticket.dropped:
                continue
            me = self._engine_for(ticket.loaded)
            if me is None or me.engine is None or not self._supports(me.engine, ticket.item):
                self.fallback.enqueue(ticket)
                continue
            with self._cond:
                self._waiting.append(ticket)
        with self._cond:
            head = next(iter(live(self._waiting)), None)
            if head is None or (self._current is not None and self._current.rows):
                return
        me = self._engine_for(head.loaded)
        if me is None or me.engine is None:  # its engine is gone and cannot be built again
            with self._cond:
                moved = [t for t in self._waiting if t.loaded is head.loaded]
                self._waiting = [t for t in self._waiting if t.loaded is not head.loaded]
            for ticket in moved:
                self.fallback.enqueue(ticket)

    @staticmethod
    def _supports(engine: Engine, item: GenerationItem) -> bool:
        try:
            return engine.supports(item)
        except Exception:  # e.g. its tokenizer choked on the prompt: HF says what is wrong
            log.warning("the static engine could not look at a job; it takes the HF path",
                        exc_info=True)
            return False

    def prepare(self, loaded: Any) -> bool:
        """Build ``loaded``'s engine now, in the calling thread (the worker's model preload), so
        that its cache allocation and compilation neither delay the first job nor, later, stall
        the rows of another model's engine while the loop builds it. True if it is ready."""
        me = self._engine_for(loaded)
        return me is not None and me.engine is not None

    def _engine_for(self, loaded: Any) -> _ModelEngine | None:
        """The engine of ``loaded``, built on first use, or rebuilt larger once it has drained
        after ``max_batch_size`` grew past it; None when building it failed this time."""
        with self._build:  # the preload and the loop may ask at once: one engine is built
            with self._cond:
                me = self._engines.get(id(loaded))
                rows = self.max_batch_size
            if me is not None and (me.engine is None or me.rows or me.engine.max_rows >= rows):
                return me
            started = time.monotonic()
            try:
                engine: Engine | None = self._make_engine(loaded, rows)
            except self._unsupported as exc:
                log.info("the static engine cannot drive this model (%s): its jobs take the HF "
                         "path", exc)
                engine = None
            except Exception:
                log.exception("could not build the static engine; this job takes the HF path")
                return None
            if engine is not None:
                log.info("built a static engine of %d rows in %.1f s", rows,
                         time.monotonic() - started)
            me = _ModelEngine(loaded, engine)
            with self._cond:
                self._engines[id(loaded)] = me
            return me

    def _choose(self) -> _ModelEngine | None:
        """The engine to step next: the current one while it has rows, else the one of the oldest
        waiting ticket; blocks while there is nothing to do."""
        with self._cond:
            while True:
                self._waiting = live(self._waiting)
                current = self._current
                if current is not None and current.rows:
                    return current
                if self._incoming:
                    return None  # route them first
                if self._waiting:
                    me = self._engines.get(id(self._waiting[0].loaded))
                    if me is None or me.engine is None or \
                            me.engine.max_rows < self.max_batch_size:
                        return None  # released or too small: _route builds it again
                    me.oom_cap = None  # it has drained: try its full size again
                    self._current = me
                    return me
                self._current = None
                self._cond.wait(IDLE_TICK_S)  # wake to tick: idle is not stuck
                loop_tick("continuous")

    def _admit(self, me: _ModelEngine) -> float | None:
        """Admit waiting tickets into ``me``'s free rows; the wait of the oldest admitted."""
        assert me.engine is not None
        with self._cond:
            room = engine_room(max_batch_size=self.max_batch_size, max_rows=me.engine.max_rows,
                               oom_cap=me.oom_cap, in_use=len(me.rows),
                               free_rows=me.engine.free_rows())
            taken = admissions(self._waiting, me.loaded, room)
            self._waiting = without(self._waiting, taken)
        waits: list[float] = []
        for position, ticket in enumerate(taken):
            try:
                with self.watchdog.timing(ticket.hard_limit_s):
                    row = me.engine.admit(ticket.item, seed_of(ticket.item))
            except self._unsupported:
                self.fallback.enqueue(ticket)
                continue
            except Exception as exc:  # this job's own failure (its prompt, memory for its row)
                if device_lost(exc):
                    self._device_lost(me, exc, taken[position:])
                    break
                log.warning("could not admit a job into the engine: %s", exc)
                settle(ticket, error=typed(exc, "admitting a job"))
                continue
            if ticket.dropped:  # dropped while it was being admitted
                self._release_quietly(me, row)
                continue
            me.rows[row] = ticket
            ticket.message = "generating"
            waits.append(time.monotonic() - ticket.submitted)
        return max(waits) if waits else None

    def _release_dropped(self, me: _ModelEngine) -> None:
        assert me.engine is not None
        for row in dropped_rows(me.rows):  # cancelled or past its soft limit: free at once
            del me.rows[row]
            self._release_quietly(me, row)

    def _step(self, me: _ModelEngine) -> None:
        assert me.engine is not None
        try:
            with self.watchdog.timing(longest_limit(me.rows.values())):
                finished = me.engine.step()
        except GpuOutOfMemory as exc:
            # Release the newest row and fail only its job (retryable); the others step on.
            row, ticket = list(me.rows.items())[-1]
            del me.rows[row]
            self._release_quietly(me, row)
            me.oom_cap = max(1, len(me.rows))
            log.warning("out of GPU memory with %d rows; released the newest, %d step on",
                        len(me.rows) + 1, len(me.rows))
            settle(ticket, error=exc)
            return
        except Exception as exc:  # the model failed for every row of this step
            if device_lost(exc):
                self._device_lost(me, exc, [])
                return
            error = typed(exc, "an engine step")
            log.warning("an engine step failed; its %d job(s) fail: %s", len(me.rows), error)
            self._fail_rows(me, error)
            return
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: fail the rows, go on up
            self._fail_rows(me, exc)
            raise
        lost = next((o for _, o in finished if isinstance(o, PipelineError) and device_lost(o)),
                    None)
        if lost is not None:  # a decode on a dead device: the rows still running are lost too
            ended = [me.rows.pop(row) for row, _ in finished if row in me.rows]
            self._device_lost(me, lost, ended)
            return
        for row, outcome in finished:  # the engine freed these rows itself
            done = me.rows.pop(row, None)
            if done is None:
                continue
            if isinstance(outcome, PipelineError):  # its decode failed: its job, no other
                log.warning("a finished job failed in its decode: %s", outcome)
                settle(done, error=outcome)
            else:
                done.finish(outcome)
        message = f"generating ({len(me.rows) + len(finished)} jobs in the batch)"
        for row, ticket in me.rows.items():
            ticket.fraction = me.engine.progress(row)
            ticket.message = message
        self._stream_chunks(me)

    @staticmethod
    def _stream_chunks(me: _ModelEngine) -> None:
        """Hand the chunks of streaming rows that fell due in this step to their publisher, all
        of them in one call (it decodes them together, off this thread); the loop pays only
        for copying their codes. A failure here is logged: it never fails a job."""
        assert me.engine is not None
        due: dict[int, tuple[Any, list[tuple[Any, int, int, int, Any]]]] = {}
        for row, ticket in me.rows.items():
            stream = ticket.stream
            if stream is None:
                continue
            try:
                for lo, start, end, hi in stream.due(me.engine.final_frames(row)):
                    codes = me.engine.codes_range(row, lo, hi)
                    due.setdefault(id(stream.publisher), (stream.publisher, []))[1].append(
                        (stream, lo, start, end, codes))
            except Exception:
                log.exception("could not schedule a streaming row's chunk")
        for publisher, chunks in due.values():
            publisher.chunks(me.loaded, chunks)

    def _fail_rows(self, me: _ModelEngine, error: BaseException) -> None:
        """Every row of ``me`` fails with ``error`` and is released."""
        fail_all(me.rows.values(), error)
        for row in list(me.rows):
            self._release_quietly(me, row)
        me.rows.clear()

    def _device_lost(self, me: _ModelEngine, exc: Exception, others: list[Ticket]) -> None:
        """End the process after an unrecoverable device error: serving on a dead CUDA context
        would fail every later job. Its jobs' messages are redelivered (and counted by the
        poison cap, should a job itself be the cause). Only where ending the process is a test's
        callback does it return: the jobs of its rows and ``others`` (out of its rows already)
        then fail with a typed error and the engine is dropped: the next job builds a new one."""
        log.critical("unrecoverable device error in the static engine (%s: %s): ending the "
                     "process so that its process manager starts a fresh one",
                     type(exc).__name__, exc)
        self._end_process()
        error = typed(exc, "an engine step")
        fail_all(others, error)
        self._fail_rows(me, error)
        with self._cond:
            if self._engines.get(id(me.loaded)) is me:
                del self._engines[id(me.loaded)]

    @staticmethod
    def _release_quietly(me: _ModelEngine, row: int) -> None:
        assert me.engine is not None
        try:
            me.engine.release(row)
        except Exception:  # the row's job has its answer; a broken engine shows on the next step
            log.exception("could not release row %d", row)
