"""Continuous batching in the static engine: rows come and go between steps, and each row's
codes are what it produces alone (on the real tiny model; codes read as EnCodec receives them)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import GpuOutOfMemory, ModelRuntimeError, PipelineError
from workers.generation.offline import generate_on
from workers.runtime import GenerationItem, LoadedModel
from workers.runtime.engine import StaticEngine
from workers.runtime.engine.slots import Row
from workers.runtime.frames import bucket_for, max_new_tokens_for

from .test_engine import assert_same_codes, decoded_rows, engine_codes, recorded_codes

LONG = GenerationItem("loud rock drums", 1.0, seed=11, temperature=0.8, top_k=50)
SHORT = GenerationItem("calm piano", 0.2, seed=5, top_p=0.9, guidance_scale=2.0)
LATE = GenerationItem("jazz", 0.3, seed=8, temperature=0.0)


def steps_of(loaded: LoadedModel, item: GenerationItem) -> int:
    return max_new_tokens_for(bucket_for(item.duration_s, loaded), loaded.delay_codebooks)


def alone(loaded: LoadedModel, item: GenerationItem) -> torch.Tensor:
    return engine_codes(StaticEngine(loaded, max_rows=1), [item])[0]


def step_until(engine: StaticEngine, rows: dict[int, str],
               codes: dict[str, torch.Tensor], stop: str | None = None) -> list[str]:
    """Step until the job named ``stop`` finishes (all jobs when None); the names in finishing
    order. Finished jobs' codes land in ``codes``."""
    order: list[str] = []
    while rows and (stop is None or stop not in order):
        with recorded_codes(engine.loaded) as seen:
            finished = engine.step()
        for (row, _), part in zip(finished, decoded_rows(seen, 1), strict=True):
            name = rows.pop(row)
            codes[name] = part
            order.append(name)
    return order


@pytest.fixture(scope="module")
def solo(tiny_model: LoadedModel) -> dict[str, torch.Tensor]:
    return {name: alone(tiny_model, item)
            for name, item in (("long", LONG), ("short", SHORT), ("late", LATE))}


def test_a_short_job_beside_a_long_one_finishes_first_with_its_own_codes(
        tiny_model: LoadedModel, solo: dict[str, torch.Tensor]) -> None:
    engine = StaticEngine(tiny_model, max_rows=2)
    rows = {engine.admit(LONG, 11): "long", engine.admit(SHORT, 5): "short"}
    codes: dict[str, torch.Tensor] = {}
    order = step_until(engine, rows, codes, stop="short")
    assert order == ["short"]
    # It left as soon as its own steps were done, not at the long job's length.
    long_row = next(iter(rows))
    assert engine.progress(long_row) == pytest.approx(
        steps_of(tiny_model, SHORT) / steps_of(tiny_model, LONG))
    assert engine.active() == 1 and engine.free_rows() == 1
    step_until(engine, rows, codes)
    assert_same_codes(codes["short"], solo["short"])
    assert_same_codes(codes["long"], solo["long"])


def test_a_job_admitted_into_a_freed_row_mid_run_equals_running_it_alone(
        tiny_model: LoadedModel, solo: dict[str, torch.Tensor]) -> None:
    engine = StaticEngine(tiny_model, max_rows=2)
    rows = {engine.admit(LONG, 11): "long", engine.admit(SHORT, 5): "short"}
    codes: dict[str, torch.Tensor] = {}
    step_until(engine, rows, codes, stop="short")
    assert engine.free_rows() == 1  # the row the short job left
    late_row = engine.admit(LATE, 8)  # the long job is mid-run: another position, another prompt
    rows[late_row] = "late"
    assert engine.progress(late_row) == 0.0
    assert engine.free_rows() == 0
    with pytest.raises(RuntimeError):
        engine.admit(SHORT, 5)
    step_until(engine, rows, codes)
    for name in ("long", "short", "late"):
        assert_same_codes(codes[name], solo[name])


def test_release_frees_a_row_at_once_and_leaves_its_neighbours_alone(
        tiny_model: LoadedModel, solo: dict[str, torch.Tensor]) -> None:
    engine = StaticEngine(tiny_model, max_rows=3)
    rows = {engine.admit(SHORT, 5): "short", engine.admit(LONG, 11): "long"}
    doomed = engine.admit(GenerationItem("ambient pads", 1.0, seed=2), 2)  # cancelled mid-run
    for _ in range(5):
        assert engine.step() == []
    assert 0 < engine.progress(doomed) < 1
    engine.release(doomed)
    assert engine.free_rows() == 1 and engine.active() == 2
    with pytest.raises(KeyError):
        engine.progress(doomed)
    codes: dict[str, torch.Tensor] = {}
    step_until(engine, rows, codes)
    assert_same_codes(codes["short"], solo["short"])
    assert_same_codes(codes["long"], solo["long"])
    assert engine.step() == []  # nothing left to run


def test_generate_admits_waiting_items_as_rows_free_up(tiny_model: LoadedModel,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    engine = StaticEngine(tiny_model, max_rows=2)
    finished: list[int] = []  # seeds, in the order their rows finished (a row decodes then)
    real = engine._decode_rows

    def decode(group: list[tuple[int, Row]]) -> np.ndarray:
        finished.extend(job.seed for _, job in group)
        return real(group)

    monkeypatch.setattr(engine, "_decode_rows", decode)
    items = [LONG, SHORT, LATE, GenerationItem("x", 0.1, seed=4)]
    results = generate_on(engine, items)
    assert [r.seed for r in results] == [11, 5, 8, 4]
    # The first two started together; the others took the rows the short ones left.
    assert [r.batch_size for r in results] == [1, 2, 2, 2]
    # The long job, admitted first, finished last: the short ones came and went beside it.
    assert finished == [5, 8, 4, 11]


def fail_decode(engine: StaticEngine, monkeypatch: pytest.MonkeyPatch, item: GenerationItem,
                error: Exception) -> None:
    """Make an EnCodec decode that holds ``item``'s row raise ``error``; other jobs decode for
    real (a later job in the same row too, and the rows decoded with it, again alone)."""
    real = engine._decode_rows

    def decode(group: list[tuple[int, Row]]) -> np.ndarray:
        if any(job.item is item for _, job in group):
            raise error
        return real(group)

    monkeypatch.setattr(engine, "_decode_rows", decode)


@pytest.mark.parametrize(("error", "expected"), [
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), GpuOutOfMemory),
    (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), ModelRuntimeError),
    (ModelRuntimeError("model returned 3200 samples, 6400 were needed"), ModelRuntimeError)])
def test_a_row_whose_decode_fails_gets_its_error_and_leaves_the_others_as_they_run_alone(
        tiny_model: LoadedModel, solo: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch,
        error: Exception, expected: type[PipelineError]) -> None:
    engine = StaticEngine(tiny_model, max_rows=2)
    # The failing row comes first in the step: the long row after it is the one a step that
    # stopped at the failure would leave one count behind its tokens.
    short_row, long_row = engine.admit(SHORT, 5), engine.admit(LONG, 11)
    fail_decode(engine, monkeypatch, SHORT, error)
    for _ in range(steps_of(tiny_model, SHORT) - 1):
        assert engine.step() == []
    [(row, outcome)] = engine.step()
    assert row == short_row and isinstance(outcome, expected)
    if isinstance(error, PipelineError):
        assert outcome is error
    else:  # converted as raise_runtime converts, the original kept as the cause
        assert outcome.__cause__ is error
    assert engine.active() == 1 and engine.free_rows() == 1
    with pytest.raises(KeyError):
        engine.progress(short_row)
    assert engine.progress(long_row) == pytest.approx(
        steps_of(tiny_model, SHORT) / steps_of(tiny_model, LONG))
    # The freed row takes the next job, and both run as they run alone.
    rows = {long_row: "long", engine.admit(LATE, 8): "late"}
    codes: dict[str, torch.Tensor] = {}
    step_until(engine, rows, codes)
    assert_same_codes(codes["long"], solo["long"])
    assert_same_codes(codes["late"], solo["late"])


def test_generate_raises_a_failed_rows_error_and_frees_every_row(
        tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = StaticEngine(tiny_model, max_rows=3)
    error = ModelRuntimeError("model returned 3200 samples, 6400 were needed")
    items = [GenerationItem("x", 0.1, seed=4), GenerationItem("y", 0.1, seed=6), LONG]
    fail_decode(engine, monkeypatch, items[0], error)  # the second finishes in the same step
    with pytest.raises(ModelRuntimeError) as failed:
        generate_on(engine, items)
    assert failed.value is error
    assert engine.active() == 0 and engine.free_rows() == 3
    monkeypatch.undo()
    assert [r.seed for r in generate_on(engine, items)] == [4, 6, 11]  # the engine runs on
