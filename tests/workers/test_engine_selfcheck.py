"""The engine's self-check before serving, and the builder that sizes, checks and remembers.

Real parts: the tiny checkpoint, the real engine, the real HF path. "Made to fail" is a step
that raises; "made to differ" shifts the codes the engine hands EnCodec (what a wrong token
anywhere in its decode loop amounts to), so the HF path on the same model stays untouched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from pipeline.config.loader import load_settings
from workers.job_runner import JobRunner
from workers.runtime import LoadedModel
from workers.runtime.engine import EngineUnsupported, StaticEngine
from workers.runtime.engine.selfcheck import self_check
from workers.runtime.engine.serving import EngineBuilder
from workers.runtime.engine.sizing import shape_of
from workers.runtime.frames import max_new_tokens_for, window_frames
from workers.runtime.loading import load_model


@contextmanager
def codes_shifted_in(engine: StaticEngine) -> Iterator[None]:
    """While the block runs, every code the engine's ``step`` decodes is one token off."""
    encoder: Any = engine.loaded.model.audio_encoder
    real_decode, real_step = encoder.decode, engine.step
    stepping = False

    def decode(codes: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if stepping:
            codes = (codes + 1) % 2048
        return real_decode(codes, *args, **kwargs)

    def step() -> Any:
        nonlocal stepping
        stepping = True
        try:
            return real_step()
        finally:
            stepping = False

    encoder.decode = decode
    engine.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        del encoder.decode
        del engine.step


def failing_step() -> Any:
    # Not a RuntimeError: the canary must catch what the engine's own handling would not.
    raise IndexError("index 24048 is out of bounds for dimension 0 with size 24048")


def test_the_canary_passes_on_the_tiny_model_in_fp32(tiny_model: LoadedModel) -> None:
    engine = StaticEngine(tiny_model, max_rows=2)
    verdict = self_check(engine)
    assert verdict.passed, verdict.reason
    assert verdict.reason == "" and verdict.seconds > 0
    assert engine.active() == 0 and engine.free_rows() == 2  # it leaves the engine empty


def test_the_canary_fails_when_the_engine_raises(tiny_model: LoadedModel) -> None:
    engine = StaticEngine(tiny_model, max_rows=2)
    engine.step = failing_step  # type: ignore[method-assign]
    verdict = self_check(engine)
    assert not verdict.passed
    assert verdict.reason.startswith("the engine raised IndexError: index 24048")
    assert "\n" not in verdict.reason


def test_the_canary_fails_when_the_engines_codes_differ(tiny_model: LoadedModel) -> None:
    engine = StaticEngine(tiny_model, max_rows=2)
    with codes_shifted_in(engine):
        verdict = self_check(engine)
    assert not verdict.passed
    assert verdict.reason.startswith("row 0's codes differ from HF generate's in float32")


def test_the_canary_fails_when_a_continuation_row_ignores_its_clip(
        tiny_model: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = StaticEngine(tiny_model, max_rows=3)
    monkeypatch.setattr(engine, "_force_prompt", lambda index, position, tokens: tokens)
    verdict = self_check(engine)
    assert not verdict.passed
    assert verdict.reason.startswith("row 2's codes differ from HF generate's"), verdict.reason


def test_in_bfloat16_the_canary_asks_finite_audio_of_the_right_shape(tiny_path: Path) -> None:
    loaded = load_model(str(tiny_path), device="cpu", dtype="bfloat16", offline=True)
    engine = StaticEngine(loaded, max_rows=2)
    with codes_shifted_in(engine):  # other tokens than HF's are allowed in bf16
        assert self_check(engine).passed
    hf_calls: list[Any] = []
    verdict = self_check(engine, hf=lambda *args: hf_calls.append(args) or [])
    assert verdict.passed and hf_calls == []  # no HF run where equality is not asked


# --- EngineBuilder: the loop's engine factory -----------------------------------------------

def test_a_checked_engine_serves_and_says_so(tiny_model: LoadedModel,
                                             caplog: pytest.LogCaptureFixture) -> None:
    verdicts: list[tuple[str, str]] = []
    builder = EngineBuilder(compile=False, memory_fraction=0.5,
                            on_verdict=lambda *v: verdicts.append(v))
    with caplog.at_level(logging.INFO, logger="workers.runtime.engine.serving"):
        engine = builder.build(tiny_model, 3, model="tiny")
    assert engine.max_rows == 3  # the CPU: the rows asked for
    assert builder.serving() == {"tiny": "static"} and verdicts == [("tiny", "static")]
    assert "tiny: 3 rows as asked" in caplog.text
    assert "passed its self-check" in caplog.text


@pytest.mark.parametrize("breakage", ["raises", "differs", "build"])
def test_a_failed_check_or_build_means_hf_once_and_for_all(
        tiny_model: LoadedModel, breakage: str, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    builds: list[StaticEngine] = []

    def check(engine: StaticEngine) -> Any:
        builds.append(engine)
        if breakage == "raises":
            engine.step = failing_step  # type: ignore[method-assign]
            return self_check(engine)
        with codes_shifted_in(engine):
            return self_check(engine)

    if breakage == "build":
        monkeypatch.setattr(StaticEngine, "__init__", _broken_init)
    verdicts: list[tuple[str, str]] = []
    builder = EngineBuilder(compile=False, memory_fraction=0.5, check=check,
                            on_verdict=lambda *v: verdicts.append(v))
    with caplog.at_level(logging.WARNING, logger="workers.runtime.engine.serving"), \
            pytest.raises(EngineUnsupported, match="static engine refused"):
        builder.build(tiny_model, 2, model="tiny")
    assert builder.serving() == {"tiny": "hf"} and verdicts == [("tiny", "hf")]
    [warning] = caplog.records  # one line that says why, no traceback
    assert warning.exc_info is None and "\n" not in warning.getMessage()
    assert warning.getMessage().startswith("model tiny is served by the hf path")
    assert {"raises": "IndexError", "differs": "codes differ",
            "build": "cache allocation failed"}[breakage] in warning.getMessage()
    # The next job's build is refused at once: nothing is built, checked or logged again.
    caplog.clear()
    with pytest.raises(EngineUnsupported, match="static engine refused"):
        builder.build(tiny_model, 2, model="tiny")
    assert len(builds) == (0 if breakage == "build" else 1) and caplog.records == []


def _broken_init(self: StaticEngine, *args: Any, **kwargs: Any) -> None:
    raise RuntimeError("cache allocation failed\non the device")


def test_rows_are_capped_to_the_free_device_memory(tiny_model: LoadedModel) -> None:
    row = _row_bytes(tiny_model)
    builder = EngineBuilder(compile=False, memory_fraction=0.5,
                            free_bytes=lambda device: 2 * row * 3)  # 3 rows in half of it
    assert builder.build(tiny_model, 8, model="tiny").max_rows == 3
    starved = EngineBuilder(compile=False, memory_fraction=0.5, free_bytes=lambda device: row)
    with pytest.raises(EngineUnsupported, match="not one row fits"):
        starved.build(tiny_model, 8, model="tiny")
    assert starved.serving() == {"tiny": "hf"}


def _row_bytes(loaded: LoadedModel) -> int:
    """What one more row adds to an engine's cache, counted from the tensors it allocates
    (whatever their layout: one tensor for all layers or one per layer)."""
    def allocated(rows: int) -> int:
        found = [*vars(StaticEngine(loaded, max_rows=rows)._cache).values()]
        tensors = [t for v in found for t in (v if isinstance(v, (list, tuple)) else [v])
                   if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in tensors)

    return allocated(2) - allocated(1)


def test_the_sizing_counts_what_a_row_really_allocates(tiny_model: LoadedModel) -> None:
    shape = shape_of(tiny_model, max_new_tokens_for(window_frames(tiny_model),
                                                    tiny_model.delay_codebooks), 128)
    assert shape.row_bytes == pytest.approx(_row_bytes(tiny_model), rel=0.05)


# --- the worker's preload -------------------------------------------------------------------

def test_the_preload_checks_the_engine_and_a_smaller_engine_caps_the_batch(
        tmp_path: Path, tiny_path: Path, tiny_model: LoadedModel,
        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings("development", cwd=tmp_path, overrides={
        "model.preset": "tiny", "model.source": str(tiny_path), "model.device": "cpu",
        "model.dtype": "float32", "model.engine": "static", "worker.pool": "threads",
        "generation.max_batch_size": 4, "storage.output_dir": str(tmp_path / "out"),
        "storage.temp_dir": str(tmp_path / "tmp")})
    verdicts: list[tuple[str, str]] = []
    runner = JobRunner(settings, on_engine=lambda *v: verdicts.append(v))
    assert runner.engines is not None
    row = _row_bytes(tiny_model)  # a device with room for one row
    monkeypatch.setattr(runner.engines, "_free_bytes", lambda device: int(row / 0.6) + 1)
    started = time.perf_counter()
    assert runner.preload() is not None
    print(f"preload (load, build, self-check): {time.perf_counter() - started:.2f} s")
    assert runner.serving_engines() == {"tiny": "static"} and verdicts == [("tiny", "static")]
    assert runner.loop.max_batch_size == 1  # the loop asks for no more rows than fit
    runner.apply_settings(settings)  # a reload keeps the cap
    assert runner.loop.max_batch_size == 1


def test_hf_workers_report_hf(tmp_path: Path, tiny_path: Path) -> None:
    settings = load_settings("development", cwd=tmp_path, overrides={
        "model.preset": "tiny", "model.source": str(tiny_path), "model.device": "cpu",
        "model.engine": "hf"})
    runner = JobRunner(settings)
    runner.model("tiny")
    assert runner.engines is None and runner.serving_engines() == {"tiny": "hf"}


def test_with_the_self_check_off_the_engine_serves_unchecked(
        tmp_path: Path, tiny_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings("development", cwd=tmp_path, overrides={
        "model.preset": "tiny", "model.source": str(tiny_path), "model.device": "cpu",
        "model.engine": "static", "model.engine_self_check": False})
    runner = JobRunner(settings)
    with caplog.at_level(logging.INFO, logger="workers.runtime.engine.serving"):
        runner.preload()
    assert runner.serving_engines() == {"tiny": "static"}
    assert "serves unchecked (model.engine_self_check = false)" in caplog.text
    assert "passed its self-check" not in caplog.text
