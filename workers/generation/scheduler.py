"""What the generation loops decide, as plain functions of the waiting and running tickets.

A scheduler decides, an engine executes (vLLM's split): the loop threads of ``hf_loop`` and
``engine_loop`` hold the locks, the clock and the device, and call these to know what to run
next. Nothing here waits, reads a clock (``now`` is passed in) or touches a model, so every
rule is tested as a function call.

- The HF path forms batches: the oldest waiting ticket leads the next batch and takes up to
  ``max_batch_size`` tickets of its model and batch key; the batch is due when full or when its
  leader has waited ``batch_wait_s`` (from its own submission), so no key starves another.
- The engine path admits tickets into free rows, oldest first, while they are of the model
  stepping now: an older ticket of another model stops admissions, so the engine drains and
  the loop switches to that model (fairness between models).
- Both release what was dropped (cancel, soft limit) before they run, and time a call by the
  longest hard limit of the tickets in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workers.generation.ticket import Ticket


def check_batch_size(max_batch_size: int) -> None:
    """Refuse a batch size no loop can run (a settings reload as much as a start)."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")


def live(tickets: Iterable[Ticket]) -> list[Ticket]:
    """The tickets still wanted, in their order (a dropped one is answered already)."""
    return [t for t in tickets if not t.dropped]


def longest_limit(tickets: Iterable[Ticket]) -> float | None:
    """The hard limit a call of ``tickets`` runs under: the longest of its jobs' own (a long
    clip's call runs longer than a short one's); None when no job has one (the loop's applies)."""
    limits = [t.hard_limit_s for t in tickets if t.hard_limit_s is not None]
    return max(limits) if limits else None


@dataclass(frozen=True)
class HfDecision:
    """The HF loop's next move: run ``batch`` now, or wait ``wait_s`` (None: until a ticket
    comes) for the leader's batch to fill; ``pending`` is what stays waiting either way."""

    batch: list[Ticket]
    wait_s: float | None
    pending: list[Ticket]


def next_hf_batch(pending: Sequence[Ticket], *, max_batch_size: int, batch_wait_s: float,
                  now: float) -> HfDecision:
    """The batch due at ``now`` among ``pending`` (oldest first), if any (see the module)."""
    waiting = live(pending)
    if not waiting:
        return HfDecision([], None, [])
    head = waiting[0]
    mates = [t for t in waiting if t.loaded is head.loaded and t.key == head.key][:max_batch_size]
    remaining = head.submitted + max(0.0, batch_wait_s) - now
    if len(mates) < max_batch_size and remaining > 0:
        return HfDecision([], remaining, waiting)
    taken = set(map(id, mates))
    return HfDecision(mates, None, [t for t in waiting if id(t) not in taken])


def engine_room(*, max_batch_size: int, max_rows: int, oom_cap: int | None, in_use: int,
                free_rows: int) -> int:
    """How many tickets an engine of ``max_rows`` rows may admit now.

    ``max_batch_size`` caps the rows in use (a reload may lower it); an engine smaller than it
    admits nothing, so that it drains and a larger one is built; after an out-of-memory,
    ``oom_cap`` rows at most until it drains.
    """
    if max_rows < max_batch_size:
        return 0
    cap = min(max_batch_size, max_rows, oom_cap or max_rows)
    return max(0, min(cap - in_use, free_rows))


def admissions(waiting: Sequence[Ticket], loaded: Any, room: int) -> list[Ticket]:
    """The tickets of ``waiting`` (oldest first) that take ``room`` free rows of ``loaded``'s
    engine: the oldest ones, up to the first ticket of another model (it waits longer than the
    rest, so the engine drains for it)."""
    taken: list[Ticket] = []
    for ticket in waiting:
        if len(taken) >= room or ticket.loaded is not loaded:
            break
        taken.append(ticket)
    return taken


def dropped_rows(rows: Mapping[int, Ticket]) -> list[int]:
    """The engine rows whose ticket was dropped (cancel, soft limit): free them before a step."""
    return [row for row, ticket in rows.items() if ticket.dropped]


def without(tickets: Sequence[Ticket], taken: Iterable[Ticket]) -> list[Ticket]:
    """``tickets`` less ``taken`` (by identity), in order."""
    ids = set(map(id, taken))
    return [t for t in tickets if id(t) not in ids]
