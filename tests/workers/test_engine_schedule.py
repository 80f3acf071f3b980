"""The static engine under any admission schedule: every job's codes are its solo run's.

A row that has finished (or was released) stays inside the step's row bucket while a higher row
is active, so the step computes it too. These tests pin down that such a free row never writes
into another row's cache, above all after a job that filled the whole window (issue 22, defect
1): the real 30 s window with the tiny model (about 1 ms a step on one CPU thread), and a
property-based test over random schedules on a window shortened to 2.4 s, where a full-window
job ends at the cache's last position just as a 30 s job does in the real one.
"""

from __future__ import annotations

from dataclasses import astuple, replace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.runtime import GeneratedAudio, GenerationItem, LoadedModel
from workers.runtime.engine import StaticEngine
from workers.runtime.frames import bucket_for, max_new_tokens_for, window_frames

from .test_engine import assert_same_codes, decoded_rows, recorded_codes

FULL = GenerationItem("loud rock drums", 28.0, temperature=0.0)  # >= 25.6 s: the whole window
PLACEHOLDER = GenerationItem("x", 0.1, temperature=0.0)  # holds a row for a few steps
NEIGHBOURS = (
    GenerationItem("calm piano", 1.0, temperature=0.0),
    GenerationItem("jazz", 1.0, seed=3, temperature=0.8, top_k=50, guidance_scale=1.5),
    GenerationItem("ambient pads", 0.6, seed=9, top_p=0.9, guidance_scale=1.0),
)
LEFT_WHEN_NEIGHBOURS_JOIN = 10  # steps the full-window job has left when its neighbours start


def steps_of(loaded: LoadedModel, item: GenerationItem) -> int:
    return max_new_tokens_for(bucket_for(item.duration_s, loaded), loaded.delay_codebooks)


def step_recording(engine: StaticEngine) -> list[tuple[int, GeneratedAudio, torch.Tensor]]:
    """One step; each finished row with its audio and the ``(codebooks, frames)`` codes EnCodec
    received for it (rows finishing together may be decoded in one batched call)."""
    with recorded_codes(engine.loaded) as seen:
        finished = engine.step()
    codes = decoded_rows(seen, engine.loaded.audio_channels)
    out = []
    for (row, outcome), part in zip(finished, codes, strict=True):
        assert isinstance(outcome, GeneratedAudio), outcome
        out.append((row, outcome, part))
    return out


def run_alone(engine: StaticEngine, item: GenerationItem) -> tuple[GeneratedAudio, torch.Tensor]:
    """``item`` alone in an idle engine: its audio and codes."""
    assert engine.active() == 0
    engine.admit(item, item.seed or 0)
    while not (finished := step_recording(engine)):
        pass
    [(_, audio, codes)] = finished
    return audio, codes


@pytest.fixture(scope="module")
def solo(tiny_model: LoadedModel) -> dict[str, tuple[GeneratedAudio, torch.Tensor]]:
    engine = StaticEngine(tiny_model, max_rows=1)
    return {item.prompt: run_alone(engine, item) for item in (FULL, *NEIGHBOURS)}


def step_until_left(engine: StaticEngine, row: int, left: int) -> None:
    """Step until the job in ``row`` has ``left`` steps to go (nothing may finish meanwhile but
    placeholders)."""
    steps = steps_of(engine.loaded, FULL)
    while round(engine.progress(row) * steps) < steps - left:
        for _, audio, _ in step_recording(engine):
            assert audio.duration_s == PLACEHOLDER.duration_s


def test_a_full_window_job_ending_beside_a_short_one_leaves_its_audio_as_alone(
        tiny_model: LoadedModel, solo: dict[str, tuple[GeneratedAudio, torch.Tensor]]) -> None:
    # The reproduction: on the unfixed engine the 1 s job's audio moved by 0.04.
    engine = StaticEngine(tiny_model, max_rows=2)
    full_row = engine.admit(FULL, 0)
    step_until_left(engine, full_row, LEFT_WHEN_NEIGHBOURS_JOIN)
    short_row = engine.admit(NEIGHBOURS[0], 0)
    got: dict[int, tuple[GeneratedAudio, torch.Tensor]] = {}
    while engine.active():
        got.update({row: (audio, codes) for row, audio, codes in step_recording(engine)})
    assert_same_codes(got[short_row][1], solo[NEIGHBOURS[0].prompt][1])
    assert np.array_equal(got[short_row][0].samples, solo[NEIGHBOURS[0].prompt][0].samples)
    assert_same_codes(got[full_row][1], solo[FULL.prompt][1])


@pytest.mark.parametrize("full_row", [0, 1, 2, 3])
def test_full_window_neighbours_at_every_row_run_as_alone(
        tiny_model: LoadedModel, solo: dict[str, tuple[GeneratedAudio, torch.Tensor]],
        full_row: int) -> None:
    # The full-window job's row goes free while every other row is active, so it sits inside
    # the step's bucket at the position where its job ended: the cache's last. In the last row
    # the unfixed engine wrote past the tensor (IndexError); in any other, into the next row.
    engine = StaticEngine(tiny_model, max_rows=4)
    for _ in range(full_row):
        engine.admit(PLACEHOLDER, 0)
    assert engine.admit(FULL, 0) == full_row
    step_until_left(engine, full_row, LEFT_WHEN_NEIGHBOURS_JOIN)
    assert engine.active() == 1
    names = {full_row: FULL.prompt}
    names.update({engine.admit(item, item.seed or 0): item.prompt for item in NEIGHBOURS})
    assert sorted(names) == [0, 1, 2, 3]
    got: dict[str, torch.Tensor] = {}
    while engine.active():
        got.update({names[row]: codes for row, _, codes in step_recording(engine)})
    assert set(got) == set(names.values())
    for name, codes in got.items():
        assert_same_codes(codes, solo[name][1])


# --- random schedules ----------------------------------------------------------------------------

WINDOW_S = 1.2  # 60 frames, 63 steps: a full-window job ends at the cache's last position
SAMPLINGS = (
    {"temperature": 0.0},
    {"temperature": 0.8, "top_k": 50},
    {"temperature": 1.0, "top_k": 0, "top_p": 0.9},
)

items = st.builds(
    lambda prompt, duration, sampling, guidance, seed: GenerationItem(
        prompt, duration, guidance_scale=guidance, seed=seed, **sampling),
    prompt=st.sampled_from(("calm piano", "loud rock drums", "jazz")),
    # The whole window often: the length whose end is the cache's end.
    duration=st.one_of(st.just(WINDOW_S), st.sampled_from((0.1, 0.3, 0.6, 1.0, 1.15))),
    sampling=st.sampled_from(SAMPLINGS),
    guidance=st.sampled_from((1.0, 1.5, 3.0)),
    seed=st.integers(0, 2),
)
# A schedule as a worker sees one: jobs arrive some steps apart and wait for a free row (oldest
# first), some are cancelled some steps after they arrive (released if they are running), and
# the engine steps while any row is active. Rows free up and fill again at every moment of a
# neighbour's run, the full-window job's end included.
arrivals = st.lists(st.tuples(items, st.integers(0, 30)), min_size=2, max_size=8)
cancels = st.dictionaries(st.integers(0, 7), st.integers(0, 60), max_size=2)


def run_schedule(loaded: LoadedModel, max_rows: int,
                 jobs: list[tuple[GenerationItem, int]], cancelled: dict[int, int]
                 ) -> list[tuple[GenerationItem, torch.Tensor]]:
    """Run ``jobs`` (each an item and the steps since the previous one arrived) through a new
    engine, cancelling job ``i`` ``cancelled[i]`` steps after it arrived; each finished job's
    item and codes, in finishing order."""
    engine = StaticEngine(loaded, max_rows=max_rows)
    arrive, clock = [], 0
    for _, gap in jobs:
        clock += gap
        arrive.append(clock)
    cancel_at = {i: arrive[i] + after for i, after in cancelled.items() if i < len(jobs)}
    waiting: list[int] = []
    running: dict[int, int] = {}  # row -> job
    got: list[tuple[GenerationItem, torch.Tensor]] = []
    clock, arrived = 0, 0
    while arrived < len(jobs) or waiting or running:
        while arrived < len(jobs) and arrive[arrived] <= clock:
            waiting.append(arrived)
            arrived += 1
        for row, job in list(running.items()):
            if cancel_at.get(job, clock + 1) <= clock:
                engine.release(row)
                del running[row]
        waiting = [job for job in waiting if cancel_at.get(job, clock + 1) > clock]
        while waiting and engine.free_rows():
            job = waiting.pop(0)
            item = jobs[job][0]
            running[engine.admit(item, item.seed or 0)] = job
        for row, _, codes in step_recording(engine):
            got.append((jobs[running.pop(row)][0], codes))
        clock += 1
    assert engine.active() == 0 and engine.free_rows() == max_rows
    return got


class SoloRuns:
    """The shortened-window model and each item's codes alone (one engine of one row), filled
    as the schedules need them. Its short repr keeps hypothesis' failure report readable."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self._engine = StaticEngine(loaded, max_rows=1)
        self._codes: dict[tuple[object, ...], torch.Tensor] = {}

    def codes(self, item: GenerationItem) -> torch.Tensor:
        key = astuple(item)
        if key not in self._codes:
            self._codes[key] = run_alone(self._engine, item)[1]
        return self._codes[key]

    def __repr__(self) -> str:
        return f"SoloRuns(window {self.loaded.max_duration_s} s)"


@pytest.fixture(scope="module")
def solo_runs(tiny_model: LoadedModel) -> SoloRuns:
    loaded = replace(tiny_model, max_duration_s=WINDOW_S)
    assert window_frames(loaded) == 60
    return SoloRuns(loaded)


# Derandomized: the same 25 schedules on every run. The step is not bitwise batch-invariant on
# the CPU (a row's logits in a 1-row bucket and in a larger one differ by ~4e-6: BLAS picks
# another kernel for 2 matrix rows than for 4 or more), so over many random schedules a
# near-tie can rarely flip one code against the solo run (seen once in ~800 examples), which
# would make a randomized test flaky. These 25 fail on the engine without the parked rows.
@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(max_rows=st.integers(1, 8), jobs=arrivals, cancelled=cancels)
def test_every_job_of_any_schedule_has_its_solo_codes(
        solo_runs: SoloRuns, max_rows: int, jobs: list[tuple[GenerationItem, int]],
        cancelled: dict[int, int]) -> None:
    for item, codes in run_schedule(solo_runs.loaded, max_rows, jobs, cancelled):
        assert_same_codes(codes, solo_runs.codes(item))
