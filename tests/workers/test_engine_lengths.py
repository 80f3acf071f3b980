"""The compiled step reads a few self-attention lengths, not always the whole window (issue 22,
defect 3): each step reads the smallest length bucket that covers its furthest row, one graph per
(row bucket, length bucket), and the codes stay the eager step's. Graphs run through a counting
backend (dynamo's capture without inductor: milliseconds, not tens of seconds per graph)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from workers.runtime import GenerationItem, LoadedModel
from workers.runtime.engine import StaticEngine
from workers.runtime.engine.compile import length_buckets

from .test_engine import assert_same_codes, engine_codes
from .test_engine_compile import GraphCounter

LONG = GenerationItem("calm piano", 2.0, temperature=0.0)  # ~100 positions: crosses 64
SHORT = GenerationItem("jazz", 0.3, seed=3, top_k=50, guidance_scale=1.0)


def test_length_buckets_are_the_asked_ones_below_the_window_then_the_window() -> None:
    assert length_buckets(1503) == [256, 512, 1024, 1503]
    assert length_buckets(700) == [256, 512, 700]
    assert length_buckets(1503, (64,)) == [64, 1503]
    assert length_buckets(1503, ()) == [1503]


@pytest.fixture
def counter(monkeypatch: pytest.MonkeyPatch) -> Any:
    counter = GraphCounter()
    real_compile = torch.compile

    def counted(model: Any, **options: Any) -> Any:
        options.pop("mode")  # a mode is inductor's; this backend has none
        return real_compile(model, backend=counter, **options)

    monkeypatch.setattr(torch, "compile", counted)
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def test_each_step_reads_the_smallest_length_covering_its_furthest_row(
        tiny_model: LoadedModel, counter: GraphCounter) -> None:
    engine = StaticEngine(tiny_model, max_rows=2, compile=True, lengths=(64,))
    assert engine.compiled is True
    assert engine.length_buckets == [64, engine._steps_max]
    assert len(counter.calls) == 2 * 2  # row buckets 1, 2 times lengths 64, window: no more

    for item in (LONG, SHORT):
        engine.admit(item, item.seed or 0)
    read: list[tuple[int, int]] = []
    real_run = engine._run

    def run(bucket: int, furthest: int) -> torch.Tensor:
        furthest_row = int(engine._position[engine._slots.active()].max()) + 1
        logits = real_run(bucket, furthest)
        assert engine.last_length is not None
        read.append((furthest_row, engine.last_length))
        return logits

    engine._run = run  # type: ignore[method-assign]
    while engine.active():
        engine.step()
    lengths = {length for _, length in read}
    assert lengths == {64, engine._steps_max}  # the job crossed the bucket's boundary
    assert all(length == min(b for b in engine.length_buckets if b >= furthest)
               for furthest, length in read)


def test_compiled_codes_across_a_length_boundary_equal_the_eager_steps(
        tiny_model: LoadedModel, counter: GraphCounter) -> None:
    compiled = StaticEngine(tiny_model, max_rows=2, compile=True, lengths=(64,))
    eager = StaticEngine(tiny_model, max_rows=2)
    for got, want in zip(engine_codes(compiled, [LONG, SHORT]),
                         engine_codes(eager, [LONG, SHORT]), strict=True):
        assert_same_codes(got, want)
    assert compiled.compiled is True
    assert sum(counter.calls) > 2 * 2  # the compiled graphs ran, past their warm-ups
