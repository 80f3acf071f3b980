"""The batching engine on its own: batches form, jobs keep their audio, failures stay per job.

The real tiny model runs where audio matters; a scripted generate function stands in where the
test is about what the loop does with a call's outcome (an out-of-memory, a hang), which the
tiny model cannot be made to do on demand.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from pipeline.errors import GpuOutOfMemory, JobTimeout, ModelRuntimeError
from workers.generation import BatchStats, HfLoop, Ticket
from workers.runtime.batch import GeneratedAudio, GenerationItem
from workers.runtime.frames import batch_key_for
from workers.runtime.loaded import LoadedModel
from workers.runtime.musicgen import generate

from ..test_sampling import ALONE_VS_BATCHED_MAX_DIFF

WAIT = 60.0  # generous bounds on waits for states; none of them is a measured duration
FOREVER = 3600.0  # a batch wait no test reaches: batches run because they are full


def _item(prompt: str, seed: int, duration: float = 0.5, **kw: Any) -> GenerationItem:
    return GenerationItem(prompt=prompt, duration_s=duration, seed=seed, **kw)


def _submit(batcher: HfLoop, loaded: LoadedModel, items: list[GenerationItem]) -> list[Ticket]:
    return [batcher.submit(loaded, item, batch_key_for(loaded, item), model="tiny") for item in items]


class Recorder:
    """A generate function that records each call's prompts and can be scripted to misbehave."""

    def __init__(self, behaviour: Callable[[list[GenerationItem], Any], None] | None = None) -> None:
        self.calls: list[list[str]] = []
        self.behaviour = behaviour

    def __call__(self, loaded: Any, items: list[GenerationItem], progress: Any,
                 on_window: Any = None) -> list[GeneratedAudio]:
        self.calls.append([i.prompt for i in items])
        if self.behaviour is not None:
            self.behaviour(items, progress)
        return [GeneratedAudio(samples=np.zeros((1, 10), np.float32), sample_rate=32000,
                               duration_s=i.duration_s, seed=i.seed or 0, generate_seconds=0.01,
                               batch_size=len(items)) for i in items]


def test_a_full_batch_runs_in_one_call_and_records_its_size(tiny_model: LoadedModel) -> None:
    stats: list[BatchStats] = []
    batcher = HfLoop(generate, max_batch_size=4, batch_wait_s=FOREVER, on_batch=stats.append)
    tickets = _submit(batcher, tiny_model, [_item(f"job {i}", seed=i, temperature=0.5 + i / 10)
                                            for i in range(4)])
    audio = [t.future.result(WAIT) for t in tickets]
    assert [a.batch_size for a in audio] == [4, 4, 4, 4]
    assert [a.seed for a in audio] == [0, 1, 2, 3]
    assert len(stats) == 1 and stats[0].size == 4 and stats[0].model == "tiny"
    assert 0.0 < stats[0].busy_fraction <= 1.0


def test_a_job_keeps_its_audio_whatever_its_batch_neighbours(tiny_model: LoadedModel) -> None:
    job = _item("the job", seed=1234, temperature=0.9, top_k=50)
    alone = HfLoop(generate, max_batch_size=1, batch_wait_s=0.0)
    solo = _submit(alone, tiny_model, [job])[0].future.result(WAIT)
    crowd = HfLoop(generate, max_batch_size=4, batch_wait_s=FOREVER)
    neighbours = [_item("a much longer prompt about strings and brass", seed=7, top_p=0.9),
                  _item("drums", seed=8, temperature=1.3), _item("x", seed=9, top_k=0)]
    tickets = _submit(crowd, tiny_model, [neighbours[0], job, *neighbours[1:]])
    batched = tickets[1].future.result(WAIT)
    assert batched.batch_size == 4 and solo.batch_size == 1
    # Same tokens; only float rounding of the batched decoder differs (see test_sampling).
    np.testing.assert_allclose(batched.samples, solo.samples, rtol=0, atol=ALONE_VS_BATCHED_MAX_DIFF)


def test_a_job_alone_waits_for_company_at_most_the_batch_wait(tiny_model: LoadedModel) -> None:
    batcher = HfLoop(generate, max_batch_size=8, batch_wait_s=0.05)
    audio = _submit(batcher, tiny_model, [_item("alone", seed=3)])[0].future.result(WAIT)
    assert audio.batch_size == 1


def test_out_of_memory_splits_the_batch_and_only_a_lone_job_sees_it(tiny_model: LoadedModel) -> None:
    def oom_above_one(items: list[GenerationItem], _: Any) -> None:
        if len(items) > 1 or items[0].prompt == "too big alone":
            raise GpuOutOfMemory("CUDA out of memory (scripted)")

    recorder = Recorder(oom_above_one)
    batcher = HfLoop(recorder, max_batch_size=4, batch_wait_s=FOREVER)
    tickets = _submit(batcher, tiny_model, [_item(p, seed=1) for p in ("a", "b", "too big alone", "d")])
    assert [t.future.result(WAIT).batch_size for t in (tickets[0], tickets[1], tickets[3])] == [1, 1, 1]
    with pytest.raises(GpuOutOfMemory):
        tickets[2].future.result(WAIT)
    assert recorder.calls == [["a", "b", "too big alone", "d"], ["a", "b"], ["a"], ["b"],
                              ["too big alone", "d"], ["too big alone"], ["d"]]


def test_a_model_failure_fails_every_job_of_its_call_and_the_loop_goes_on(tiny_model: LoadedModel) -> None:
    def fail_first(items: list[GenerationItem], _: Any) -> None:
        if items[0].prompt.startswith("sick"):
            raise ModelRuntimeError("NaNs (scripted)")

    batcher = HfLoop(Recorder(fail_first), max_batch_size=2, batch_wait_s=FOREVER)
    sick = _submit(batcher, tiny_model, [_item("sick 1", seed=1), _item("sick 2", seed=2)])
    for ticket in sick:
        with pytest.raises(ModelRuntimeError):
            ticket.future.result(WAIT)
    healthy = _submit(batcher, tiny_model, [_item("well 1", seed=1), _item("well 2", seed=2)])
    assert [t.future.result(WAIT).batch_size for t in healthy] == [2, 2]


def test_a_dropped_job_leaves_its_batch_and_its_neighbours_go_on(tiny_model: LoadedModel) -> None:
    stepping, go_on = threading.Event(), threading.Event()

    def step_until_told(_: list[GenerationItem], progress: Any) -> None:
        progress(0.1, "step")
        stepping.set()
        assert go_on.wait(WAIT)
        progress(0.2, "step")

    batcher = HfLoop(Recorder(step_until_told), max_batch_size=2, batch_wait_s=FOREVER)
    cancelled, neighbour = _submit(batcher, tiny_model, [_item("cancel me", seed=1), _item("keep", seed=2)])
    assert stepping.wait(WAIT)
    assert neighbour.fraction == 0.1  # the loop reports each ticket's progress
    cancelled.drop(JobTimeout("soft limit (scripted)", "duration"))
    with pytest.raises(JobTimeout):
        cancelled.future.result(0)  # resolved at once, without waiting for the call
    go_on.set()
    assert neighbour.future.result(WAIT).batch_size == 2


def test_a_call_whose_every_job_was_dropped_is_abandoned_at_the_next_step(tiny_model: LoadedModel) -> None:
    stepping = threading.Event()
    steps_after_drop: list[int] = []

    def step_forever(_: list[GenerationItem], progress: Any) -> None:
        while True:  # only the engine's abandonment ends this call
            progress(0.5, "step")
            stepping.set()
            if all(t.dropped for t in tickets):
                steps_after_drop.append(1)
            threading.Event().wait(0.01)

    recorder = Recorder(step_forever)
    batcher = HfLoop(recorder, max_batch_size=2, batch_wait_s=FOREVER)
    tickets = _submit(batcher, tiny_model, [_item("a", seed=1), _item("b", seed=2)])
    assert stepping.wait(WAIT)
    for ticket in tickets:
        ticket.drop(JobTimeout("gone", "duration"))
    recorder.behaviour = None  # the next call generates normally
    after = _submit(batcher, tiny_model, [_item("next 1", seed=1), _item("next 2", seed=2)])
    assert [t.future.result(WAIT).batch_size for t in after] == [2, 2]
    # the hanging call stepped at most once more after both its jobs had gone
    assert len(steps_after_drop) <= 1


def test_a_call_past_the_hard_limit_ends_the_process(tiny_model: LoadedModel) -> None:
    hung, ended = threading.Event(), threading.Event()

    def hang(_: list[GenerationItem], __: Any) -> None:
        hung.set()
        ended.wait(WAIT)  # a kernel that never returns (until the test is over)

    batcher = HfLoop(Recorder(hang), max_batch_size=1, batch_wait_s=0.0, hard_limit_s=0.2,
                      on_hard_limit=ended.set)
    _submit(batcher, tiny_model, [_item("hangs", seed=1)])
    assert hung.wait(WAIT)
    assert ended.wait(WAIT), "the watchdog never acted on the hung call"


def test_a_lost_device_ends_the_process_and_a_plain_model_error_does_not(
        tiny_model: LoadedModel) -> None:
    ended = threading.Event()

    def fail(items: list[GenerationItem], _: Any) -> None:
        if items[0].prompt == "lost":  # what torch raises after a device-side assert
            raise RuntimeError("CUDA error: device-side assert triggered")
        raise ModelRuntimeError("NaNs (scripted)")

    batcher = HfLoop(Recorder(fail), max_batch_size=1, batch_wait_s=0.0, on_hard_limit=ended.set)
    [plain] = _submit(batcher, tiny_model, [_item("plain", seed=1)])
    with pytest.raises(ModelRuntimeError):
        plain.future.result(WAIT)
    assert not ended.is_set()  # a model error is the job's; the process serves on
    [lost] = _submit(batcher, tiny_model, [_item("lost", seed=2)])
    with pytest.raises(RuntimeError, match="device-side assert"):
        lost.future.result(WAIT)
    assert ended.is_set()  # set before the job was answered: the context is dead, end it


def test_batch_size_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size"):
        HfLoop(generate, max_batch_size=0, batch_wait_s=0.0)


def test_new_limits_from_a_settings_reload_release_a_waiting_batch() -> None:
    """Lowering the batch size live: two jobs waiting for company that will not come (size 4,
    an endless wait) run at once, and the next batch forms at the new size."""
    recorder = Recorder()
    batcher = HfLoop(recorder, max_batch_size=4, batch_wait_s=FOREVER)
    loaded = object()
    first = [batcher.submit(loaded, _item(f"job {i}", seed=i), "k", model="m") for i in range(2)]
    with pytest.raises(ValueError, match="at least 1"):
        batcher.configure(max_batch_size=0, batch_wait_s=0.0, hard_limit_s=None)
    batcher.configure(max_batch_size=2, batch_wait_s=FOREVER, hard_limit_s=None)
    assert [t.future.result(WAIT).batch_size for t in first] == [2, 2]
    later = [batcher.submit(loaded, _item(f"later {i}", seed=i), "k", model="m") for i in range(3)]
    batcher.configure(max_batch_size=2, batch_wait_s=0.0, hard_limit_s=None)
    assert sorted(t.future.result(WAIT).batch_size for t in later) == [1, 2, 2]


def test_a_call_runs_under_the_longest_hard_limit_of_its_jobs(tiny_model: LoadedModel) -> None:
    # A long clip's call takes longer: its job's scaled limit (pipeline/contract/time_limits.py) applies,
    # not the batcher's base one; the loop's message ("window 2 of 3") reaches every ticket.
    seen: list[float | None] = []

    def record(_: list[GenerationItem], progress: Any) -> None:
        seen.append(batcher.watchdog.call_limit)
        progress(0.5, "window 2 of 3: generating")

    batcher = HfLoop(Recorder(record), max_batch_size=2, batch_wait_s=FOREVER, hard_limit_s=360.0)
    items = [_item("long", seed=1), _item("longer", seed=2)]
    tickets = [batcher.submit(tiny_model, item, batch_key_for(tiny_model, item), hard_limit_s=limit)
               for item, limit in zip(items, (500.0, 620.0), strict=True)]
    for ticket in tickets:
        ticket.future.result(WAIT)
    assert seen == [620.0]
    assert [t.message for t in tickets] == ["window 2 of 3: generating"] * 2
    lone = batcher.submit(tiny_model, items[0], batch_key_for(tiny_model, items[0]))
    batcher.configure(max_batch_size=1, batch_wait_s=0.0, hard_limit_s=360.0)
    lone.future.result(WAIT)
    assert seen[-1] == 360.0  # a job without its own limit runs under the batcher's
