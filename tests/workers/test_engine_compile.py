"""The engine's compiled step: a compiler failure falls back to the eager step, and a compiled
step produces the eager step's codes. Few on purpose: inductor on a 2-core CPU takes tens of
seconds per graph, so the real compile runs one row bucket."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch

from workers.runtime import GenerationItem, LoadedModel
from workers.runtime.engine import StaticEngine

from .test_engine import assert_same_codes, engine_codes, hf_greedy_codes

ITEM = GenerationItem("calm piano", 0.3, temperature=0.0)


def test_a_compile_failure_runs_the_eager_step_with_a_warning(
        tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    calls: list[str] = []

    def broken_compile(model: Any, **options: Any) -> Any:
        calls.append(options.get("mode", ""))

        def fails(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("inductor exploded")  # what a backend error looks like, lazily

        return fails

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="workers.runtime.engine.compile"):
        engine = StaticEngine(tiny_model, max_rows=2, compile=True)
    assert calls == ["default"]  # it did try, in the CPU's mode
    assert engine.compiled is False
    assert "inductor exploded" in caplog.text
    assert_same_codes(engine_codes(engine, [ITEM])[0], hf_greedy_codes(tiny_model, ITEM))


@pytest.mark.slow
def test_the_compiled_step_gives_the_eager_steps_codes(tiny_model: LoadedModel) -> None:
    compiled = StaticEngine(tiny_model, max_rows=1, compile=True)
    assert compiled.compiled is True
    eager = StaticEngine(tiny_model, max_rows=1)
    items = [ITEM, GenerationItem("jazz", 0.2, seed=3, top_k=50, guidance_scale=1.0)]
    for item in items:
        assert_same_codes(engine_codes(compiled, [item])[0], engine_codes(eager, [item])[0])
