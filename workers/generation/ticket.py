"""One job's place in a generation loop, and how it is answered.

A task thread submits a job to its process's loop (``workers.generation``) and gets a
:class:`Ticket`; it waits on the ticket's future, reads its ``fraction``, ``message`` and
``partial`` while it waits, and drops it on cancel or soft limit. Either side may answer first:
:func:`settle` keeps the first answer, so a drop racing the loop's result is harmless.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from workers.runtime.batch import GeneratedAudio, GenerationItem


@dataclass(eq=False)
class Ticket:
    """One job's place in a loop; its task thread waits on ``future``."""

    loaded: Any  # the LoadedModel the job runs on; batches never mix models
    item: GenerationItem
    key: Hashable  # its batch key on the HF path (``workers.runtime.frames.batch_key_for``)
    model: str = ""  # the preset's name, for metrics and logs
    submitted: float = field(default_factory=time.monotonic)
    future: Future[GeneratedAudio] = field(default_factory=Future)
    fraction: float = 0.0  # generation progress in [0, 1], written by the loop
    message: str = ""  # what the loop is doing for it ("window 3 of 7: ..."), written by the loop
    hard_limit_s: float | None = None  # this job's own hard limit (scaled with its duration)
    partial: Any = None  # a long job's PartialCodes after each window but the last (the loop)
    # A stream=True job's RowStream (workers.generation.streaming): the engine loop publishes
    # its chunks as the engine steps. Set by the task thread right after submit: a step that
    # runs before it only delays the first chunks (every chunk due since frame 0 goes then).
    stream: Any = None

    @property
    def dropped(self) -> bool:
        """Resolved before its audio arrived (cancelled, timed out) or already answered."""
        return self.future.done()

    def drop(self, reason: BaseException) -> None:
        """The job no longer wants its audio: leave the batch at the next step."""
        settle(self, error=reason)

    def finish(self, audio: GeneratedAudio) -> None:
        """The loop's answer: the job's audio, its progress complete."""
        self.fraction = 1.0
        settle(self, audio=audio)


def settle(ticket: Ticket, *, audio: GeneratedAudio | None = None,
           error: BaseException | None = None) -> None:
    """Answer ``ticket`` with ``audio`` or ``error``, unless it is answered already."""
    # The task thread may drop a ticket while the loop resolves it: the first answer wins.
    try:
        if error is not None:
            ticket.future.set_exception(error)
        else:
            ticket.future.set_result(audio)  # type: ignore[arg-type]
    except Exception:  # InvalidStateError: already answered
        pass


def fail_all(tickets: Iterable[Ticket], error: BaseException) -> None:
    """A whole call failed: every ticket in it gets ``error``.

    The caller re-raises an ``error`` that is not an ``Exception`` (KeyboardInterrupt,
    SystemExit) once its tickets are answered, so that no task thread waits for a dead loop.
    """
    for ticket in tickets:
        settle(ticket, error=error)
