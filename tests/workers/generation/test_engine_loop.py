"""The continuous-batching loop: rows come and go between steps, failures stay per job.

A scripted engine that follows ``StaticEngine``'s API (rows with a step count each, steps let
through one at a time by the test) stands in where the test is about what the loop does: who is
admitted when, which row is released, what an out-of-memory takes down. The real engine with
the tiny model runs where audio matters (the tests at the end).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from pipeline.errors import GpuOutOfMemory, JobTimeout, ModelRuntimeError, PipelineError
from workers.generation import BatchStats, EngineLoop, HfLoop, Ticket
from workers.job_runner import JobCancelledByUser
from workers.runtime.batch import GeneratedAudio, GenerationItem
from workers.runtime.engine import StaticEngine
from workers.runtime.loaded import LoadedModel
from workers.runtime.musicgen import generate

from ..test_sampling import ALONE_VS_BATCHED_MAX_DIFF

WAIT = 60.0  # generous bounds on waits for states; none of them is a measured duration
FOREVER = 3600.0
STEPS_PER_SECOND = 10  # the scripted engine's frame rate: a 1 s job takes 10 steps


class EngineUnsupported(Exception):
    """The scripted engine's refusal (the real one has its own)."""


class ScriptedEngine:
    """Follows StaticEngine's API; each row needs duration x STEPS_PER_SECOND steps.

    With ``gated`` each step waits for the test to let it through (``go``), so the test decides
    how far the engine runs between two looks at its state.
    """

    def __init__(self, loaded: Any, max_rows: int, *, gated: bool, journal: list[str]) -> None:
        self.loaded, self.max_rows = loaded, max_rows
        self.rows: dict[int, list[Any]] = {}  # row -> [prompt, seed, steps done, steps needed]
        self.journal = journal  # "admit <prompt>" / "release <prompt>", shared by all engines
        self.active_per_step: list[int] = []
        self.fail_next: BaseException | None = None
        self.fail_decode: dict[str, PipelineError] = {}  # prompt -> its row's result when it ends
        self.hang = threading.Event()  # set: the next step never returns until cleared
        self._gate = threading.Semaphore(0) if gated else None
        self.entered = 0  # steps the loop has begun (a gated one waits in it for the test)
        self.passed = 0  # steps let through

    # --- the API -----------------------------------------------------------------------------
    def supports(self, item: GenerationItem) -> bool:
        return item.melody is None and item.duration_s <= 30

    def free_rows(self) -> int:
        return self.max_rows - len(self.rows)

    def active(self) -> int:
        return len(self.rows)

    def admit(self, item: GenerationItem, seed: int) -> int:
        if not self.supports(item):
            raise EngineUnsupported(item.prompt)
        if not self.free_rows():
            raise RuntimeError("no free row")
        row = min(set(range(self.max_rows)) - set(self.rows))
        self.rows[row] = [item.prompt, seed, 0, round(item.duration_s * STEPS_PER_SECOND)]
        self.journal.append(f"admit {item.prompt}")
        return row

    def step(self) -> list[tuple[int, GeneratedAudio | PipelineError]]:
        self.entered += 1
        if self._gate is not None:
            assert self._gate.acquire(timeout=WAIT), "the test never let this step through"
        self.passed += 1
        while self.hang.is_set():
            time.sleep(0.01)  # a kernel that does not return (until the test is over)
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        size = len(self.rows)
        self.active_per_step.append(size)
        finished: list[tuple[int, GeneratedAudio | PipelineError]] = []
        for row, state in list(self.rows.items()):
            state[2] += 1
            if state[2] >= state[3]:
                del self.rows[row]
                if state[0] in self.fail_decode:
                    finished.append((row, self.fail_decode[state[0]]))
                    continue
                finished.append((row, GeneratedAudio(
                    samples=np.full((1, state[3]), state[1], np.float32), sample_rate=STEPS_PER_SECOND,
                    duration_s=state[3] / STEPS_PER_SECOND, seed=state[1], generate_seconds=0.01,
                    batch_size=size)))
        return finished

    def release(self, row: int) -> None:
        self.journal.append(f"release {self.rows.pop(row)[0]}")

    def progress(self, row: int) -> float:
        done, needed = self.rows[row][2:]
        return float(done / needed)

    # --- the test's handles ------------------------------------------------------------------
    def go(self, steps: int = 1) -> None:
        assert self._gate is not None
        for _ in range(steps):
            self._gate.release()

    def advance(self, steps: int = 1) -> None:
        """Let ``steps`` steps through, then wait until the loop has dealt with their outcome
        (it is back in the next step, or has no row left to step)."""
        target = self.passed + steps
        self.go(steps)
        wait_until(lambda: self.passed >= target and (self.entered > target or not self.rows),
                   f"step {target} to be done with")

    def run_free(self) -> None:
        """Let every step from now on through."""
        self.go(100_000)


class Rig:
    """A EngineLoop over scripted engines and an HF fallback that records its calls."""

    def __init__(self, *, max_batch_size: int = 4, gated: bool = True,
                 make: Callable[[Any, int], Any] | None = None, **kw: Any) -> None:
        self.engines: list[ScriptedEngine] = []
        self.journal: list[str] = []
        self.hf_calls: list[list[str]] = []
        self.stats: list[BatchStats] = []
        self.fallback = HfLoop(self._hf, max_batch_size=max_batch_size, batch_wait_s=0.0)
        self.loop = EngineLoop(make or self._make, self.fallback, max_batch_size=max_batch_size,
                                      unsupported=(EngineUnsupported,), on_batch=self.stats.append,
                                      **kw)
        self.gated = gated

    def _make(self, loaded: Any, rows: int) -> ScriptedEngine:
        engine = ScriptedEngine(loaded, rows, gated=self.gated, journal=self.journal)
        self.engines.append(engine)
        return engine

    def hf_recording(self, real: Callable[..., list[GeneratedAudio]]) -> Callable[..., list[GeneratedAudio]]:
        def call(loaded: Any, items: list[GenerationItem], progress: Any,
                 on_window: Any = None) -> list[GeneratedAudio]:
            self.hf_calls.append([i.prompt for i in items])
            return real(loaded, items, progress, on_window)

        return call

    def _hf(self, loaded: Any, items: list[GenerationItem], progress: Any,
            on_window: Any = None) -> list[GeneratedAudio]:
        self.hf_calls.append([i.prompt for i in items])
        return [GeneratedAudio(samples=np.zeros((1, 4), np.float32), sample_rate=STEPS_PER_SECOND,
                               duration_s=i.duration_s, seed=i.seed or 0, generate_seconds=0.01,
                               batch_size=len(items)) for i in items]

    def submit(self, prompt: str, duration: float = 1.0, loaded: Any = "model-a", **kw: Any) -> Ticket:
        item = GenerationItem(prompt=prompt, duration_s=duration, seed=kw.pop("seed", 7), **kw)
        return self.loop.submit(loaded, item, "key", model=str(loaded))

    @property
    def engine(self) -> ScriptedEngine:
        wait_until(lambda: bool(self.engines), "an engine to be built")
        return self.engines[-1]


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def admitted(rig: Rig, prompt: str) -> Callable[[], bool]:
    return lambda: f"admit {prompt}" in rig.journal


def test_a_short_job_finishes_while_a_long_one_runs() -> None:
    rig = Rig()
    long, short = rig.submit("long", duration=10.0), rig.submit("short", duration=0.3)
    engine = rig.engine
    while not short.future.done():
        engine.advance(1)
    audio = short.future.result(0)
    assert audio.duration_s == pytest.approx(0.3) and audio.seed == 7 and audio.batch_size == 2
    assert not long.future.done() and engine.active() == 1  # the long row goes on alone
    assert engine.active_per_step.count(2) == 3  # the short job ran beside it all its 3 steps
    assert long.fraction == pytest.approx(len(engine.active_per_step) / 100)
    assert "generating" in long.message
    engine.run_free()
    assert long.future.result(WAIT).duration_s == pytest.approx(10.0)
    assert len(engine.active_per_step) == 100 and rig.hf_calls == []


def test_a_job_submitted_mid_run_joins_the_running_batch_and_a_lone_job_does_not_wait() -> None:
    rig = Rig(max_batch_size=4)
    rig.fallback.configure(max_batch_size=4, batch_wait_s=FOREVER, hard_limit_s=None)
    first = rig.submit("first", duration=2.0)
    engine = rig.engine
    engine.advance(5)  # alone, it starts at once: no batch wait
    assert first.fraction == pytest.approx(0.25)
    second = rig.submit("second", duration=0.5)
    engine.advance(1)  # the step under way ends, then the second job joins
    assert admitted(rig, "second")() and engine.active() == 2
    engine.run_free()
    assert second.future.result(WAIT).batch_size == 2
    assert first.future.result(WAIT).batch_size == 1  # its last steps it ran alone
    assert engine.active_per_step == [1] * 6 + [2] * 5 + [1] * 9
    # The metrics see every step: its rows, and the admission wait of the steps that admitted.
    wait_until(lambda: len(rig.stats) == 20, "the last step's metrics")
    assert [s.size for s in rig.stats] == engine.active_per_step
    assert sum(s.wait_s is not None for s in rig.stats) == 2
    assert all(s.model == "model-a" and 0 < s.busy_fraction <= 1 for s in rig.stats)


@pytest.mark.parametrize("reason", [JobCancelledByUser("cancelled"),
                                    JobTimeout("soft limit (scripted)", "duration")])
def test_a_dropped_job_frees_its_row_for_a_waiting_one(reason: Exception) -> None:
    rig = Rig(max_batch_size=1)
    doomed, waiting = rig.submit("doomed", duration=5.0), rig.submit("waiting", duration=0.2)
    engine = rig.engine
    engine.advance(1)
    assert doomed.fraction == pytest.approx(0.02) and engine.active() == 1
    assert rig.loop.pending() == 1 and not waiting.future.done()  # no free row for it
    doomed.drop(reason)
    with pytest.raises(type(reason)):
        doomed.future.result(0)  # its task thread has its answer at once
    engine.advance(1)  # the loop notices after this step, releases the row, admits the next
    assert rig.journal == ["admit doomed", "release doomed", "admit waiting"]
    engine.run_free()
    assert waiting.future.result(WAIT).batch_size == 1
    assert rig.loop.pending() == 0


def test_out_of_memory_on_a_step_fails_only_the_newest_row() -> None:
    rig = Rig(max_batch_size=3)
    a = rig.submit("a", duration=5.0)
    engine = rig.engine
    engine.advance(1)
    b, c = rig.submit("b", duration=0.5), rig.submit("c", duration=0.5)
    engine.advance(1)
    assert engine.active() == 3
    engine.fail_next = GpuOutOfMemory("CUDA out of memory (scripted)")
    d = rig.submit("d", duration=0.5)
    engine.go(1)
    with pytest.raises(GpuOutOfMemory):
        c.future.result(WAIT)  # retryable: Celery runs it again later
    engine.run_free()
    assert [t.future.result(WAIT).duration_s for t in (a, b, d)] == [5.0, 0.5, 0.5]
    # After the failed step two rows went on; the waiting job took a row only when one ended:
    # no more rows than fitted until the engine drained.
    assert max(engine.active_per_step) == 2
    assert rig.journal[:5] == ["admit a", "admit b", "admit c", "release c", "admit d"]


def test_any_other_step_error_fails_the_rows_of_that_step_and_the_loop_goes_on() -> None:
    rig = Rig(max_batch_size=2)
    sick = [rig.submit("sick 1")]
    engine = rig.engine
    engine.advance(1)
    sick.append(rig.submit("sick 2"))
    engine.advance(1)
    assert engine.active() == 2
    engine.fail_next = ModelRuntimeError("NaNs (scripted)")
    engine.go(1)
    for ticket in sick:
        with pytest.raises(ModelRuntimeError):
            ticket.future.result(WAIT)
    assert engine.active() == 0  # both rows released
    well = [rig.submit("well 1", duration=0.2), rig.submit("well 2", duration=0.2)]
    engine.run_free()
    assert [t.future.result(WAIT).batch_size for t in well] == [2, 2]


def test_a_finished_row_whose_decode_failed_fails_only_its_own_job() -> None:
    rig = Rig(max_batch_size=3)
    long = rig.submit("long", duration=1.0)
    engine = rig.engine
    engine.advance(1)
    broken, fine = rig.submit("broken", duration=0.3), rig.submit("fine", duration=0.3)
    engine.advance(1)  # the step under way ends, then both join
    assert engine.active() == 3
    error = ModelRuntimeError("model returned 2 samples, 3 were needed (scripted)")
    engine.fail_decode["broken"] = error
    engine.advance(3)  # broken and fine end in the same step
    with pytest.raises(ModelRuntimeError) as failed:
        broken.future.result(0)
    assert failed.value is error
    assert fine.future.result(0).batch_size == 3
    assert not long.future.done() and engine.active() == 1
    assert long.fraction == pytest.approx(0.5)
    engine.run_free()
    assert long.future.result(WAIT).duration_s == pytest.approx(1.0)
    assert engine.active_per_step == [1] * 2 + [3] * 3 + [1] * 5
    # The engine freed the failed row itself: the loop released nothing.
    assert not any(entry.startswith("release") for entry in rig.journal)


def test_an_item_the_engine_cannot_generate_goes_the_hf_way() -> None:
    rig = Rig(gated=False)
    melody = (np.zeros(3200, np.float32), 32000)
    tickets = [rig.submit("with a melody", melody=melody), rig.submit("long form", duration=45.0),
               rig.submit("text", duration=0.2)]
    audio = [t.future.result(WAIT) for t in tickets]
    assert sorted(c for call in rig.hf_calls for c in call) == ["long form", "with a melody"]
    assert rig.journal == ["admit text"]
    assert audio[2].duration_s == pytest.approx(0.2)


@pytest.mark.parametrize("refusal", [EngineUnsupported("melody checkpoint"),
                                     RuntimeError("could not build the engine (scripted)")])
def test_a_model_the_engine_cannot_drive_takes_the_hf_path(refusal: Exception) -> None:
    def refuse(loaded: Any, rows: int) -> Any:
        raise refusal

    rig = Rig(gated=False, make=refuse)
    tickets = [rig.submit(f"job {i}") for i in range(2)]
    assert [t.future.result(WAIT).duration_s for t in tickets] == [1.0, 1.0]
    assert sorted(c for call in rig.hf_calls for c in call) == ["job 0", "job 1"]


def test_two_models_take_turns_oldest_first() -> None:
    rig = Rig(max_batch_size=4)
    first = rig.submit("x first", duration=0.5, loaded="model-x")
    engine_x = rig.engine
    engine_x.advance(1)
    other = rig.submit("y other", duration=0.3, loaded="model-y")
    late = rig.submit("x late", duration=0.3, loaded="model-x")
    # x has free rows, but a job of y waits longer than x's late one: x drains first.
    engine_x.advance(4)
    first.future.result(WAIT)
    assert engine_x.active_per_step == [1] * 5
    wait_until(lambda: len(rig.engines) == 2, "model y's engine")
    engine_y = rig.engines[1]
    engine_y.run_free()
    other.future.result(WAIT)
    engine_x.run_free()
    late.future.result(WAIT)
    assert rig.journal == ["admit x first", "admit y other", "admit x late"]


def test_a_step_past_the_hard_limit_ends_the_process() -> None:
    ended = threading.Event()
    rig = Rig(gated=False, hard_limit_s=0.2, on_hard_limit=ended.set)
    rig.submit("first", duration=0.1).future.result(WAIT)
    rig.engine.hang.set()
    try:
        rig.submit("hangs", duration=0.1)
        assert ended.wait(WAIT), "the watchdog never acted on the hung step"
    finally:
        rig.engine.hang.clear()


def test_a_larger_batch_size_builds_a_larger_engine_once_the_old_one_drains() -> None:
    rig = Rig(max_batch_size=1)
    running = rig.submit("running", duration=0.5)
    small = rig.engine
    wait_until(admitted(rig, "running"), "the first job in its row")
    rig.loop.configure(max_batch_size=3, batch_wait_s=0.0, hard_limit_s=None)
    later = [rig.submit(f"later {i}", duration=0.2) for i in range(3)]
    small.run_free()
    running.future.result(WAIT)
    wait_until(lambda: len(rig.engines) == 2, "a larger engine")
    large = rig.engines[1]
    assert (small.max_rows, large.max_rows) == (1, 3)
    wait_until(lambda: large.active() == 3, "the three later jobs in one batch")
    large.run_free()
    assert [t.future.result(WAIT).batch_size for t in later] == [3, 3, 3]
    # A smaller size caps admissions on the same engine.
    rig.loop.configure(max_batch_size=1, batch_wait_s=0.0, hard_limit_s=None)
    assert [t.future.result(WAIT).batch_size for t in
            [rig.submit(f"capped {i}", duration=0.2) for i in range(2)]] == [1, 1]
    assert len(rig.engines) == 2
    with pytest.raises(ValueError, match="at least 1"):
        rig.loop.configure(max_batch_size=0, batch_wait_s=0.0, hard_limit_s=None)


def test_idle_engines_let_their_model_go() -> None:
    rig = Rig(gated=False)
    rig.submit("a", loaded="model-a").future.result(WAIT)
    assert rig.loop.release_idle_engines() == 1
    rig.submit("b", loaded="model-a").future.result(WAIT)
    assert len(rig.engines) == 2  # built again for the next job


# --- the real engine and the tiny model ------------------------------------------------------

class HeldEngine:
    """The real StaticEngine, held before its ``at``-th step until the test lets it go on, so a
    submission can be placed at a known step instead of racing a fast tiny model."""

    def __init__(self, engine: StaticEngine, at: int | None) -> None:
        self.engine, self.at, self.steps = engine, at, 0
        self.reached, self.go = threading.Event(), threading.Event()
        self.max_rows = engine.max_rows
        self.active_per_step: list[int] = []

    def step(self) -> list[tuple[int, GeneratedAudio | PipelineError]]:
        self.steps += 1
        if self.steps == self.at:
            self.reached.set()
            assert self.go.wait(WAIT), "the test never let the held step go"
        self.active_per_step.append(self.engine.active())
        return self.engine.step()

    def __getattr__(self, name: str) -> Any:  # supports, admit, release, progress, ...
        return getattr(self.engine, name)


def real_rig(loaded: LoadedModel, *, at: int | None, max_batch_size: int = 4) -> tuple[Rig, list[HeldEngine]]:
    held: list[HeldEngine] = []

    def make(model: Any, rows: int) -> HeldEngine:
        held.append(HeldEngine(StaticEngine(model, max_rows=rows), at))
        return held[-1]

    rig = Rig(max_batch_size=max_batch_size, make=make)
    rig.fallback._generate = rig.hf_recording(generate)
    return rig, held


def alone(loaded: LoadedModel, item: GenerationItem) -> GeneratedAudio:
    loop = EngineLoop(lambda model, rows: StaticEngine(model, max_rows=rows),
                             HfLoop(generate, max_batch_size=1, batch_wait_s=0.0), max_batch_size=1)
    return loop.submit(loaded, item, "key").future.result(WAIT)


def test_with_the_tiny_model_a_short_job_finishes_while_a_long_one_runs_and_sounds_as_alone(
        tiny_model: LoadedModel) -> None:
    rig, held = real_rig(tiny_model, at=1)
    long_item = GenerationItem(prompt="a long piece of strings", duration_s=6.0, seed=11, top_k=50)
    short_item = GenerationItem(prompt="a short drum hit", duration_s=0.5, seed=12, temperature=0.8,
                                guidance_scale=1.0)  # no batch key: another length and guidance
    long = rig.loop.submit(tiny_model, long_item, "key")
    wait_until(lambda: bool(held) and held[0].reached.is_set(), "the long job's first step")
    short = rig.loop.submit(tiny_model, short_item, "key")
    held[0].go.set()
    batched = short.future.result(WAIT)
    assert not long.future.done(), "the short job waited for the long one"
    assert batched.batch_size == 2 and batched.seed == 12
    assert 0 < long.fraction < 1
    long_audio = long.future.result(WAIT)
    assert long_audio.duration_s == pytest.approx(6.0) and long_audio.batch_size == 1
    assert 2 in held[0].active_per_step and rig.hf_calls == []
    # Same tokens as the job run alone; only float rounding of the batched step differs.
    np.testing.assert_allclose(batched.samples, alone(tiny_model, short_item).samples,
                               rtol=0, atol=ALONE_VS_BATCHED_MAX_DIFF)
    np.testing.assert_allclose(long_audio.samples, alone(tiny_model, long_item).samples,
                               rtol=0, atol=ALONE_VS_BATCHED_MAX_DIFF)


def test_with_the_tiny_model_a_job_submitted_mid_run_joins_the_running_batch(
        tiny_model: LoadedModel) -> None:
    rig, held = real_rig(tiny_model, at=20)
    first = rig.loop.submit(tiny_model, GenerationItem(prompt="first", duration_s=2.0, seed=1), "key")
    wait_until(lambda: bool(held) and held[0].reached.is_set(), "19 steps of the first job")
    assert 0 < first.fraction < 1 and rig.loop.active() == 1
    second = rig.loop.submit(tiny_model, GenerationItem(prompt="second", duration_s=0.5, seed=2), "key")
    held[0].go.set()
    assert second.future.result(WAIT).batch_size == 2
    first.future.result(WAIT)
    assert held[0].active_per_step[:20] == [1] * 20 and max(held[0].active_per_step) == 2
    assert [s.size for s in rig.stats][:20] == [1] * 20 and 2 in [s.size for s in rig.stats]


def test_with_the_tiny_models_what_the_engine_cannot_run_takes_the_hf_path(
        tiny_model: LoadedModel, tiny_melody_model: LoadedModel) -> None:
    rig, _ = real_rig(tiny_model, at=None)
    melody = (np.sin(np.linspace(0, 200, 32000)).astype(np.float32), 32000)
    on_melody_model = rig.loop.submit(tiny_melody_model, GenerationItem(
        prompt="hum along", duration_s=0.5, seed=3, melody=melody), "key")
    long_prompt = rig.loop.submit(tiny_model, GenerationItem(
        prompt=" ".join(["a very long prompt"] * 60), duration_s=0.5, seed=4), "key")
    assert on_melody_model.future.result(WAIT).duration_s == pytest.approx(0.5)
    assert long_prompt.future.result(WAIT).batch_size == 1
    assert sorted(p[:9] for call in rig.hf_calls for p in call) == ["a very lo", "hum along"]


def test_prepare_builds_the_engine_before_any_job_and_jobs_then_use_it() -> None:
    rig = Rig(gated=False)
    assert rig.loop.prepare("model-a") is True
    assert len(rig.engines) == 1 and rig.engines[0].max_rows == 4  # built now, in this thread
    ticket = rig.submit("first job")
    assert ticket.future.result(WAIT).duration_s == pytest.approx(1.0)
    assert len(rig.engines) == 1 and rig.hf_calls == []  # the prepared engine ran it


def test_prepare_says_so_when_the_model_cannot_have_an_engine() -> None:
    def unsupported(loaded: Any, rows: int) -> Any:
        raise EngineUnsupported("no engine for this model (test)", field="model")

    rig = Rig(gated=False, make=unsupported)
    assert rig.loop.prepare("melody-model") is False
    assert rig.submit("a melody job", loaded="melody-model").future.result(WAIT).seed == 7
    assert rig.hf_calls == [["a melody job"]]  # its jobs take the HF path
