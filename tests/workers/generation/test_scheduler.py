"""The generation scheduler's decisions, as plain function calls: no thread, no clock."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.contract.jobs import MAX_SEED
from workers.generation import scheduler
from workers.generation.ticket import Ticket
from workers.runtime import batch
from workers.runtime.batch import GenerationItem, seed_of
from workers.runtime.frames import batch_key_for
from workers.runtime.loaded import LoadedModel

FOREVER = 3600.0


def _ticket(loaded: Any, prompt: str, *, key: Any = "k", submitted: float = 0.0,
            hard_limit_s: float | None = None, **item: Any) -> Ticket:
    return Ticket(loaded=loaded, item=GenerationItem(prompt, item.pop("duration", 0.5), **item),
                  key=key, submitted=submitted, hard_limit_s=hard_limit_s)


def _keyed(loaded: LoadedModel, prompt: str, submitted: float, **item: Any) -> Ticket:
    ticket = _ticket(loaded, prompt, submitted=submitted, **item)
    ticket.key = batch_key_for(loaded, ticket.item)
    return ticket


def _prompts(tickets: list[Ticket]) -> list[str]:
    return [t.item.prompt for t in tickets]


def _batches(pending: list[Ticket], size: int) -> list[list[str]]:
    """Every batch the HF loop forms from ``pending``, all due."""
    out = []
    while pending:
        decision = scheduler.next_hf_batch(pending, max_batch_size=size, batch_wait_s=0.0, now=FOREVER)
        out.append(_prompts(decision.batch))
        pending = decision.pending
    return out


def test_the_oldest_job_leads_the_next_batch_and_takes_only_its_mates(tiny_model: LoadedModel) -> None:
    pending = [_keyed(tiny_model, "long", 1, duration=2.0), _keyed(tiny_model, "short a", 2),
               _keyed(tiny_model, "short b", 3), _keyed(tiny_model, "long b", 4, duration=2.0)]
    # 2 s and 0.5 s jobs are in different duration buckets: the oldest ("long") leads and takes
    # its mate from the back of the queue; the short ones follow together.
    assert _batches(pending, 2) == [["long", "long b"], ["short a", "short b"]]


def test_jobs_that_cannot_share_a_call_run_in_separate_batches(tiny_model: LoadedModel) -> None:
    short = [_keyed(tiny_model, f"short {i}", i, seed=i) for i in range(2)]
    guided = [_keyed(tiny_model, f"guided {i}", i, seed=i, guidance_scale=5.0) for i in range(2)]
    assert _batches([short[0], guided[0], short[1], guided[1]], 2) == [
        ["short 0", "short 1"], ["guided 0", "guided 1"]]


def test_batches_never_mix_models_even_with_one_key() -> None:
    a, b = object(), object()
    assert _batches([_ticket(a, "a1"), _ticket(b, "b1"), _ticket(a, "a2")], 4) == [
        ["a1", "a2"], ["b1"]]


def test_a_batch_waits_for_company_until_its_leader_has_waited_the_batch_wait() -> None:
    model = object()
    pending = [_ticket(model, "first", submitted=10.0), _ticket(model, "second", submitted=10.5)]
    early = scheduler.next_hf_batch(pending, max_batch_size=4, batch_wait_s=2.0, now=11.0)
    assert early.batch == [] and early.wait_s == pytest.approx(1.0)  # from the leader's submission
    assert _prompts(early.pending) == ["first", "second"]
    due = scheduler.next_hf_batch(pending, max_batch_size=4, batch_wait_s=2.0, now=12.0)
    assert _prompts(due.batch) == ["first", "second"] and due.pending == []


def test_a_full_batch_is_due_at_once_and_the_rest_waits() -> None:
    model = object()
    pending = [_ticket(model, f"job {i}", submitted=float(i)) for i in range(3)]
    decision = scheduler.next_hf_batch(pending, max_batch_size=2, batch_wait_s=FOREVER, now=0.0)
    assert _prompts(decision.batch) == ["job 0", "job 1"] and _prompts(decision.pending) == ["job 2"]


def test_nothing_pending_means_waiting_for_a_ticket() -> None:
    decision = scheduler.next_hf_batch([], max_batch_size=2, batch_wait_s=0.0, now=0.0)
    assert decision.batch == [] and decision.wait_s is None and decision.pending == []


def test_dropped_tickets_leave_the_line_and_never_lead() -> None:
    model = object()
    gone, kept = _ticket(model, "gone"), _ticket(model, "kept", submitted=5.0)
    gone.drop(TimeoutError("soft limit"))
    decision = scheduler.next_hf_batch([gone, kept], max_batch_size=1, batch_wait_s=0.0, now=5.0)
    assert _prompts(decision.batch) == ["kept"] and decision.pending == []
    assert scheduler.live([gone, kept]) == [kept]


@pytest.mark.parametrize("size", [0, -1])
def test_batch_size_below_one_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        scheduler.check_batch_size(size)


def test_a_call_runs_under_the_longest_hard_limit_of_its_jobs() -> None:
    model = object()
    tickets = [_ticket(model, "a", hard_limit_s=500.0), _ticket(model, "b"),
               _ticket(model, "c", hard_limit_s=620.0)]
    assert scheduler.longest_limit(tickets) == 620.0
    assert scheduler.longest_limit(tickets[1:2]) is None  # the loop's own limit applies


def test_engine_room_follows_the_batch_size_the_free_rows_and_an_oom_cap() -> None:
    assert scheduler.engine_room(max_batch_size=4, max_rows=4, oom_cap=None, in_use=1, free_rows=3) == 3
    assert scheduler.engine_room(max_batch_size=2, max_rows=4, oom_cap=None, in_use=1, free_rows=3) == 1
    assert scheduler.engine_room(max_batch_size=4, max_rows=4, oom_cap=2, in_use=2, free_rows=2) == 0
    assert scheduler.engine_room(max_batch_size=4, max_rows=4, oom_cap=None, in_use=3, free_rows=0) == 0
    # Smaller than the batch size now asked for: it admits nothing and drains.
    assert scheduler.engine_room(max_batch_size=8, max_rows=4, oom_cap=None, in_use=0, free_rows=4) == 0


def test_admissions_take_the_oldest_and_stop_at_an_older_job_of_another_model() -> None:
    a, b = object(), object()
    waiting = [_ticket(a, "a1"), _ticket(a, "a2"), _ticket(b, "b1"), _ticket(a, "a3")]
    assert _prompts(scheduler.admissions(waiting, a, 4)) == ["a1", "a2"]  # b1 waits longer than a3
    assert _prompts(scheduler.admissions(waiting, a, 1)) == ["a1"]
    assert scheduler.admissions(waiting, b, 4) == []  # a's jobs are older: b waits for its turn
    assert _prompts(scheduler.without(waiting, waiting[:2])) == ["b1", "a3"]


def test_dropped_rows_are_released_before_a_step() -> None:
    model = object()
    rows = {0: _ticket(model, "stays"), 3: _ticket(model, "cancelled")}
    rows[3].drop(RuntimeError("cancelled"))
    assert scheduler.dropped_rows(rows) == [3]


def test_a_ticket_answers_once_the_first_answer_wins() -> None:
    ticket = _ticket(object(), "job")
    ticket.drop(TimeoutError("soft limit"))
    ticket.drop(RuntimeError("later"))
    with pytest.raises(TimeoutError):
        ticket.future.result(0)


def test_a_missing_seed_is_drawn_over_the_whole_request_range(monkeypatch: pytest.MonkeyPatch) -> None:
    assert seed_of(GenerationItem("x", 1.0, seed=7)) == 7
    monkeypatch.setattr(batch, "draw_seed", lambda: MAX_SEED)  # the producer's one draw
    assert seed_of(GenerationItem("x", 1.0)) == MAX_SEED
