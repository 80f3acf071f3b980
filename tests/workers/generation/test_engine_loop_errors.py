"""What a failing engine step does to the continuous loop's jobs and to the worker process.

Any exception from a step fails the rows of that step with a typed ``PipelineError``, whatever
its class (an IndexError from a bad index is not a RuntimeError); an unrecoverable device error
ends the process through the hard limit's way out, so that no job is served on a dead CUDA
context. The scripted engine of ``test_engine_loop`` stands in where the loop is under test; the
real engine on the tiny model where the engine's own conversion is.
"""

from __future__ import annotations

import threading

import pytest

from pipeline.errors import GpuOutOfMemory, ModelRuntimeError, PipelineError
from workers.generation.engine_loop import typed
from workers.generation.offline import generate_on
from workers.runtime import GenerationItem, LoadedModel
from workers.runtime.engine import StaticEngine
from workers.watchdog import device_lost

from .test_engine_loop import WAIT, Rig, wait_until

DEVICE_ASSERT = RuntimeError(
    "CUDA error: device-side assert triggered\nCUDA kernel errors might be asynchronously "
    "reported at some other API call, so the stacktrace below might be incorrect.")


@pytest.mark.parametrize(("error", "lost"), [
    (DEVICE_ASSERT, True),
    (RuntimeError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("CUDA error: unspecified launch failure"), True),
    (RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, ...)`"),
     True),
    (ModelRuntimeError("model failed during a decoding step: CUDA error: misaligned address"),
     True),
    (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (RuntimeError("CUDA error: out of memory"), False),  # passes: memory frees up
    (GpuOutOfMemory("out of GPU memory during a decoding step"), False),
    (IndexError("index 24048 is out of bounds for dimension 0 with size 24048"), False),
    (RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"), False),
    (ValueError("NaNs in the logits"), False),
])
def test_which_errors_mean_the_device_is_lost(error: BaseException, lost: bool) -> None:
    assert device_lost(error) is lost


def test_a_device_error_is_found_behind_the_error_raised_from_it() -> None:
    try:
        try:
            raise DEVICE_ASSERT
        except RuntimeError as e:
            raise ModelRuntimeError("model failed during a decoding step") from e
    except ModelRuntimeError as converted:
        assert device_lost(converted)


def test_typed_keeps_pipeline_errors_and_converts_the_rest() -> None:
    oom = GpuOutOfMemory("out of GPU memory")
    assert typed(oom, "a step") is oom
    bad_index = IndexError("index 7 is out of bounds")
    error = typed(bad_index, "an engine step")
    assert isinstance(error, ModelRuntimeError) and error.code == "model_runtime_error"
    assert error.__cause__ is bad_index and "IndexError" in str(error)
    assert error.details == {"device_lost": False}


def test_a_step_that_raises_a_non_runtime_error_fails_its_rows_typed_and_the_loop_goes_on(
        ) -> None:
    ended = threading.Event()
    rig = Rig(max_batch_size=2, on_hard_limit=ended.set)
    sick = [rig.submit("sick 1")]
    engine = rig.engine
    engine.advance(1)
    sick.append(rig.submit("sick 2"))
    engine.advance(1)
    assert engine.active() == 2
    bad_index = IndexError("index 24048 is out of bounds for dimension 0 with size 24048")
    engine.fail_next = bad_index
    engine.go(1)
    for ticket in sick:
        with pytest.raises(ModelRuntimeError) as failed:
            ticket.future.result(WAIT)
        assert failed.value.__cause__ is bad_index
    assert engine.active() == 0 and rig.journal[-2:] == ["release sick 1", "release sick 2"]
    well = rig.submit("well", duration=0.2)
    engine.run_free()
    assert well.future.result(WAIT).duration_s == pytest.approx(0.2)
    assert not ended.is_set() and len(rig.engines) == 1  # the same engine serves on


def test_an_unrecoverable_device_error_in_a_step_ends_the_process() -> None:
    ended = threading.Event()
    rig = Rig(max_batch_size=2, on_hard_limit=ended.set)
    jobs = [rig.submit("a"), rig.submit("b")]
    engine = rig.engine
    engine.advance(1)
    assert engine.active() == 2
    engine.fail_next = ModelRuntimeError("model failed during a decoding step")
    engine.fail_next.__cause__ = DEVICE_ASSERT
    engine.go(1)
    assert ended.wait(WAIT), "the loop served on after the device was lost"
    # Here the test's callback returned instead of ending the process: the jobs fail typed and
    # the engine, whose context would be dead, is dropped; the next job builds a new one.
    for ticket in jobs:
        with pytest.raises(ModelRuntimeError):
            ticket.future.result(WAIT)
    after = rig.submit("after", duration=0.2)
    wait_until(lambda: len(rig.engines) == 2, "a new engine")
    rig.engines[-1].run_free()
    assert after.future.result(WAIT).duration_s == pytest.approx(0.2)


def test_an_unrecoverable_device_error_in_a_finished_rows_decode_ends_the_process() -> None:
    ended = threading.Event()
    rig = Rig(max_batch_size=2, on_hard_limit=ended.set)
    long = rig.submit("long", duration=1.0)
    engine = rig.engine
    lost = ModelRuntimeError("model failed during decoding a finished row: CUDA error: an "
                             "illegal memory access was encountered")
    engine.fail_decode["short"] = lost
    short = rig.submit("short", duration=0.2)
    # The short job (2 steps) joins the long one (10) at its first step or its second, which
    # one a loaded host decides: either way it ends first, and its decode says the device is
    # gone while the long row is still on it. The steps run free; no count of them is assumed.
    engine.run_free()
    assert ended.wait(WAIT)
    assert "admit long" in rig.journal and "admit short" in rig.journal
    for ticket in (long, short):  # the long job's row was on the same dead device
        with pytest.raises(ModelRuntimeError):
            ticket.future.result(WAIT)


def test_an_unrecoverable_device_error_while_admitting_ends_the_process() -> None:
    ended = threading.Event()
    rig = Rig(max_batch_size=2, on_hard_limit=ended.set)
    first = rig.submit("first", duration=1.0)
    engine = rig.engine
    real_admit = engine.admit

    def admit(item: GenerationItem, seed: int) -> int:
        if item.prompt == "doomed":
            raise DEVICE_ASSERT
        return real_admit(item, seed)

    engine.admit = admit  # type: ignore[method-assign]
    doomed = rig.submit("doomed", duration=0.1)
    engine.go(1)
    assert ended.wait(WAIT)
    for ticket in (first, doomed):
        with pytest.raises(PipelineError) as failed:
            ticket.future.result(WAIT)
        assert isinstance(failed.value, ModelRuntimeError)


def test_the_engine_turns_any_step_exception_into_a_typed_error(
        tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = StaticEngine(tiny_model, max_rows=2)
    row = engine.admit(GenerationItem("calm", 0.2, temperature=0.0), 0)
    bad_index = IndexError("index 24048 is out of bounds for dimension 0 with size 24048")

    def run(bucket: int, furthest: int) -> None:
        raise bad_index

    monkeypatch.setattr(engine, "_run", run)
    with pytest.raises(ModelRuntimeError) as failed:
        engine.step()
    assert failed.value.__cause__ is bad_index
    monkeypatch.undo()
    engine.release(row)  # what the loop does with the rows of a failed step
    assert engine.active() == 0
    assert generate_on(engine, [GenerationItem("calm", 0.2, seed=1)])[0].seed == 1
