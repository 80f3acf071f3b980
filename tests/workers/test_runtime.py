"""The MusicGen runtime against the real tiny checkpoints (no mocks of transformers)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import MusicgenProcessor, T5Config

from pipeline.errors import (
    GpuOutOfMemory,
    InvalidRequest,
    ModelNotFound,
    ModelRuntimeError,
    UnsupportedOption,
)
from workers.runtime import GenerationItem, LoadedModel, ModelCache, generate, load_model
from workers.runtime.batch import batch_groups
from workers.runtime.device import resolve_device, resolve_dtype
from workers.runtime.frames import bucket_for, frames_for, max_new_tokens_for
from workers.runtime.melody import ChromaExtractor, resample
from workers.runtime.progress import ProgressReporter


def one(model: LoadedModel, **fields: object) -> np.ndarray:
    defaults: dict[str, object] = {"prompt": "calm piano", "duration_s": 0.5, "seed": 7}
    item = GenerationItem(**{**defaults, **fields})  # type: ignore[arg-type]
    return generate(model, [item])[0].samples


def sine(freq: float, seconds: float, rate: int) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


# --- loading ---------------------------------------------------------------------------------

def test_load_model_round_trips_the_tiny_checkpoint(tiny_model: LoadedModel,
                                                    tiny_path: Path) -> None:
    assert tiny_model.source == str(tiny_path)
    assert isinstance(tiny_model.processor, MusicgenProcessor)
    assert (tiny_model.device, tiny_model.dtype) == ("cpu", torch.float32)
    assert tiny_model.sampling_rate == 32000
    assert (tiny_model.frame_rate, tiny_model.samples_per_frame) == (50.0, 640)
    assert tiny_model.num_codebooks == 4
    assert not tiny_model.is_melody and not tiny_model.model.training
    assert tiny_model.max_duration_s == 30.0  # 1500-token window at 50 Hz, as the real models
    assert tiny_model.load_seconds > 0


def test_melody_checkpoint_loads_as_melody(tiny_melody_model: LoadedModel) -> None:
    assert tiny_melody_model.is_melody
    assert type(tiny_melody_model.model).__name__ == "MusicgenMelodyForConditionalGeneration"
    assert tiny_melody_model.processor.sampling_rate == 32000


def test_home_relative_source_is_expanded(tiny_models_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tiny_models_dir))
    loaded = load_model("~/tiny", device="cpu", offline=True)
    assert loaded.source == "~/tiny" and not loaded.is_melody


@pytest.mark.parametrize("source", ["/nonexistent/musicgen", "./no/such/dir", "~/no-such-model"])
def test_missing_directory_is_model_not_found(source: str) -> None:
    with pytest.raises(ModelNotFound) as info:
        load_model(source, device="cpu", offline=True)
    assert source in info.value.message and info.value.field == "model"


def test_uncached_hub_id_offline_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound) as info:
        load_model("nobody/no-such-musicgen", device="cpu", offline=True, cache_dir=str(tmp_path))
    assert "nobody/no-such-musicgen" in info.value.message
    assert isinstance(info.value.__cause__, OSError)


def test_a_checkpoint_that_is_not_musicgen_is_refused(tmp_path: Path) -> None:
    T5Config(d_model=8, num_layers=1, num_heads=1).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedOption, match="not MusicGen"):
        load_model(str(tmp_path), device="cpu", offline=True)


def test_a_failing_compile_falls_back_to_the_eager_decoder(
        tiny_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken_compile(fn: object, **_: object) -> object:
        def fail(*args: object, **kwargs: object) -> None:
            raise RuntimeError("no C++ compiler for inductor")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    with caplog.at_level(logging.WARNING, logger="workers.runtime.loading"):
        loaded = load_model(str(tiny_path), device="cpu", offline=True, compile=True)
    assert "running uncompiled" in caplog.text
    assert "forward" not in vars(loaded.model.decoder)  # the class's own forward is back
    assert one(loaded, duration_s=0.1).shape == (1, 3200)


# --- model.download_timeout ------------------------------------------------------------------

@pytest.fixture
def hub_timeouts(monkeypatch: pytest.MonkeyPatch) -> Any:
    """huggingface_hub's module constants, put back after the test (they are process-wide)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", constants.HF_HUB_DOWNLOAD_TIMEOUT)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", constants.HF_HUB_ETAG_TIMEOUT)
    return constants


def test_load_model_applies_the_download_timeout_to_hub_requests(tiny_path: Path,
                                                                 hub_timeouts: Any) -> None:
    load_model(str(tiny_path), device="cpu", offline=True, download_timeout=123)
    # What hf_hub_download (metadata) and http_get (file bytes) read at each request: setting
    # HF_HUB_*_TIMEOUT in os.environ now would be too late, huggingface_hub read it at import.
    assert (hub_timeouts.HF_HUB_DOWNLOAD_TIMEOUT, hub_timeouts.HF_HUB_ETAG_TIMEOUT) == (123, 123)


def test_without_a_download_timeout_load_model_keeps_the_process_value(tiny_path: Path,
                                                                       hub_timeouts: Any) -> None:
    hub_timeouts.HF_HUB_DOWNLOAD_TIMEOUT = 77
    load_model(str(tiny_path), device="cpu", offline=True)
    assert hub_timeouts.HF_HUB_DOWNLOAD_TIMEOUT == 77


def test_the_worker_app_applies_model_download_timeout(isolated_settings_env: Path) -> None:
    # In its own process: build_app registers Celery tasks and signal receivers process-wide.
    code = ("from huggingface_hub import constants\n"
            "from pipeline.config.schema import ModelSettings, Settings\n"
            "from workers.worker_app import build_app\n"
            "build_app(Settings(model=ModelSettings(download_timeout=321)))\n"
            "print(constants.HF_HUB_DOWNLOAD_TIMEOUT, constants.HF_HUB_ETAG_TIMEOUT)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["321", "321"]


# --- duration -> samples ---------------------------------------------------------------------

@pytest.mark.parametrize("duration", [0.01, 0.5, 1.0, 1.37])
def test_duration_maps_exactly_onto_sample_count(tiny_model: LoadedModel, duration: float) -> None:
    result = generate(tiny_model, [GenerationItem("calm piano", duration, seed=1)])[0]
    assert result.samples.shape == (1, round(duration * 32000))
    assert result.samples.dtype == np.float32
    assert result.sample_rate == 32000 and result.duration_s == pytest.approx(duration)


@pytest.mark.parametrize("frames", [1, 3, 10])
def test_max_new_tokens_accounts_for_the_delay_pattern(tiny_model: LoadedModel,
                                                       frames: int) -> None:
    # Pins transformers' behaviour: a change in how generate strips the delay pattern shows here.
    inputs = tiny_model.processor(text=["x"], return_tensors="pt")
    with torch.inference_mode():
        audio = tiny_model.model.generate(**inputs, max_new_tokens=max_new_tokens_for(frames, 4))
    assert audio.shape[-1] == max(frames, 3) * 640
    assert frames_for(frames / 50, tiny_model) == frames


def test_duration_past_what_windowed_continuation_supports_is_unsupported(
        tiny_model: LoadedModel) -> None:
    # Past the window is long-form generation (tests/workers/test_longform.py); past 300 s is
    # more than any deployment may configure, refused before any GPU time.
    with pytest.raises(UnsupportedOption, match="windowed continuation") as info:
        generate(tiny_model, [GenerationItem("long", 300.5, seed=1)])
    assert info.value.field == "duration"


@pytest.mark.parametrize("duration", [0.0, -1.0, float("nan")])
def test_non_positive_duration_is_invalid(tiny_model: LoadedModel, duration: float) -> None:
    with pytest.raises(InvalidRequest) as info:
        generate(tiny_model, [GenerationItem("x", duration, seed=1)])
    assert info.value.field == "duration"


@pytest.mark.parametrize(("fields", "field"), [
    ({"top_p": 1.5}, "top_p"), ({"temperature": -0.1}, "temperature"), ({"top_k": -1}, "top_k"),
    ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"duration_s": 1e-6}, "duration"),
])
def test_out_of_range_parameter_is_invalid(tiny_model: LoadedModel, fields: dict[str, object],
                                           field: str) -> None:
    item = GenerationItem(**{"prompt": "x", "duration_s": 0.5, **fields})  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest) as info:
        generate(tiny_model, [item])
    assert info.value.field == field and not info.value.retryable


# --- seeds, batches, progress ----------------------------------------------------------------

def test_same_seed_is_bit_identical_and_another_seed_differs(tiny_model: LoadedModel) -> None:
    first = one(tiny_model, seed=123)
    assert np.array_equal(first, one(tiny_model, seed=123))
    assert not np.array_equal(first, one(tiny_model, seed=124))


def test_prompt_changes_the_audio(tiny_model: LoadedModel) -> None:
    assert not np.array_equal(one(tiny_model), one(tiny_model, prompt="loud rock drums"))


def test_a_drawn_seed_is_reported_and_reproduces_the_clip(tiny_model: LoadedModel) -> None:
    drawn = generate(tiny_model, [GenerationItem("calm piano", 0.3)])[0]
    assert isinstance(drawn.seed, int) and drawn.seed >= 0
    assert np.array_equal(drawn.samples, one(tiny_model, duration_s=0.3, seed=drawn.seed))


def test_greedy_decoding_is_accepted(tiny_model: LoadedModel) -> None:
    assert np.array_equal(one(tiny_model, temperature=0.0, seed=1),
                          one(tiny_model, temperature=0.0, seed=2))  # greedy ignores the seed


def test_batch_of_three_comes_back_in_order(tiny_model: LoadedModel) -> None:
    items = [GenerationItem("calm piano", 0.5, seed=1), GenerationItem("fast drums", 0.3, seed=2),
             GenerationItem("jazz", 0.7, seed=3)]
    results = generate(tiny_model, items)
    assert [r.samples.shape[-1] for r in results] == [16000, 9600, 22400]
    assert [r.seed for r in results] == [1, 2, 3]
    # Three duration buckets (32, 16 and 40 frames) run as three calls.
    assert [r.batch_size for r in results] == [1, 1, 1]
    for item, result in zip(items, results, strict=True):
        assert np.array_equal(result.samples, generate(tiny_model, [item])[0].samples)


def test_items_differing_in_prompt_seed_and_sampling_share_one_padded_call(
        tiny_model: LoadedModel) -> None:
    items = [GenerationItem("a", 1.0, seed=5),
             GenerationItem("a much longer prompt", 0.99, seed=6, temperature=0.5, top_k=50),
             GenerationItem("b", 1.05, seed=7, top_p=0.9, temperature=0.0)]
    assert batch_groups(items, lambda d: bucket_for(d, tiny_model)) == [[0, 1, 2]]
    calls: list[tuple[float, str]] = []
    results = generate(tiny_model, items, progress=lambda f, m: calls.append((f, m)))
    # One call of the 56-frame bucket (56 + 3 delay-pattern steps), not three.
    assert calls[-2][1] == "generating 59/59 steps"
    assert [r.batch_size for r in results] == [3, 3, 3]
    assert [r.samples.shape[-1] for r in results] == [32000, 31680, 33600]
    assert len({r.generate_seconds for r in results}) == 1
    assert not np.array_equal(results[0].samples[:, :31680], results[1].samples)


def test_progress_is_monotone_and_ends_at_one(tiny_model: LoadedModel) -> None:
    calls: list[tuple[float, str]] = []
    items = [GenerationItem("a", 0.5, seed=1), GenerationItem("b", 0.2, seed=2)]
    generate(tiny_model, items, progress=lambda f, m: calls.append((f, m)))
    fractions = [f for f, _ in calls]
    assert len(calls) > 10
    assert all(0 < f <= 1 for f in fractions)
    assert fractions == sorted(set(fractions))
    assert fractions[-1] == 1.0 and calls[-1][1] == "generated 2 item(s)"
    assert any("generating" in m and "steps" in m for _, m in calls)


def test_progress_reporter_throttles_long_runs() -> None:
    calls: list[float] = []
    reporter = ProgressReporter(lambda f, _: calls.append(f), total_steps=1503)
    for _ in range(1503):
        reporter.step()
    reporter.finish()
    assert reporter.steps_done == 1503
    assert 90 <= len(calls) <= 102 and calls == sorted(calls) and calls[-1] == 1.0


def test_out_of_memory_inside_generate_becomes_retryable_gpu_oom(tiny_model: LoadedModel) -> None:
    def oom(fraction: float, message: str) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(GpuOutOfMemory) as info:
        generate(tiny_model, [GenerationItem("a", 0.5, seed=1)], progress=oom)
    assert info.value.retryable and isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)


def test_other_runtime_errors_become_model_runtime_error(tiny_model: LoadedModel) -> None:
    def broken(fraction: float, message: str) -> None:
        raise RuntimeError("device-side assert triggered")

    with pytest.raises(ModelRuntimeError, match="device-side assert") as info:
        generate(tiny_model, [GenerationItem("a", 0.5, seed=1)], progress=broken)
    assert isinstance(info.value.__cause__, RuntimeError)


# --- melody ----------------------------------------------------------------------------------

def test_melody_conditions_the_melody_model(tiny_melody_model: LoadedModel) -> None:
    melody = (sine(440.0, 2.0, 44100), 44100)
    plain = one(tiny_melody_model)
    conditioned = one(tiny_melody_model, melody=melody)
    assert conditioned.shape == plain.shape == (1, 16000)
    assert not np.array_equal(plain, conditioned)
    assert np.array_equal(conditioned, one(tiny_melody_model, melody=melody))
    stereo = np.stack([melody[0], melody[0]])  # (channels, n) is mixed down, same as mono
    assert np.array_equal(conditioned, one(tiny_melody_model, melody=(stereo, 44100)))


def test_melody_on_a_text_only_model_is_unsupported(tiny_model: LoadedModel) -> None:
    with pytest.raises(UnsupportedOption) as info:
        one(tiny_model, melody=(sine(440.0, 1.0, 32000), 32000))
    assert info.value.field == "melody"


def test_melody_with_samples_last_layout_is_invalid(tiny_melody_model: LoadedModel) -> None:
    with pytest.raises(InvalidRequest, match="channels, n"):
        one(tiny_melody_model, melody=(np.zeros((32000, 2), dtype=np.float32), 32000))


def test_chroma_finds_the_pitch_class_of_a_tone() -> None:
    chroma = ChromaExtractor()
    # Bins start at C, so A is 9 and E is 4.
    for freq, pitch_class in ((440.0, 9), (329.63, 4)):
        frames = chroma([sine(freq, 2.0, 32000)])
        assert frames.shape == (1, 16, 12)
        assert frames.sum(-1).eq(1).all()
        assert (frames[0].argmax(-1) == pitch_class).all()


def test_resample_keeps_a_tone_and_the_duration() -> None:
    tone = torch.from_numpy(sine(440.0, 1.0, 44100))
    out = resample(tone, 44100, 32000)
    assert out.shape == (32000,)
    expected = torch.from_numpy(sine(440.0, 1.0, 32000))
    assert (out[1000:-1000] - expected[1000:-1000]).abs().max() < 1e-2


# --- the model cache -------------------------------------------------------------------------

def test_model_cache_evicts_the_least_recently_used() -> None:
    loads: list[str] = []
    cache = ModelCache(2, lambda source: loads.append(source) or f"model:{source}")
    assert cache.get("a") == "model:a"
    cache.get("b")
    cache.get("a")  # a is now the most recently used
    cache.get("c")  # evicts b
    assert cache.sources() == ["a", "c"] and len(cache) == 2
    assert "b" not in cache
    cache.get("b")  # evicts a, loads b again
    assert loads == ["a", "b", "c", "b"]
    assert cache.sources() == ["c", "b"]
    cache.clear()
    assert len(cache) == 0 and cache.sources() == []


def test_model_cache_loads_once_under_concurrent_gets() -> None:
    loads: list[str] = []

    def slow_loader(source: str) -> object:
        loads.append(source)
        time.sleep(0.05)
        return object()

    cache = ModelCache(1, slow_loader)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(cache.get("x"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert loads == ["x"] and len({id(g) for g in got}) == 1


def test_model_cache_rejects_zero_capacity() -> None:
    with pytest.raises(ValueError):
        ModelCache(0, str)


def test_model_cache_holds_loaded_tiny_models(tiny_path: Path, tiny_melody_path: Path) -> None:
    cache: ModelCache[LoadedModel] = ModelCache(
        1, lambda s: load_model(s, device="cpu", offline=True))
    assert not cache.get(str(tiny_path)).is_melody
    assert cache.get(str(tiny_melody_path)).is_melody
    assert cache.sources() == [str(tiny_melody_path)]


# --- device and dtype ------------------------------------------------------------------------

def test_auto_device_is_cpu_on_this_host() -> None:
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "mps", "tpu"])
def test_unavailable_device_is_unsupported(device: str) -> None:
    with pytest.raises(UnsupportedOption) as info:
        resolve_device(device)
    assert info.value.field == "model.device"


def test_dtype_resolution_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    assert resolve_dtype("auto", "cpu") is torch.float32
    assert resolve_dtype("bfloat16", "cpu") is torch.bfloat16
    with caplog.at_level(logging.WARNING, logger="workers.runtime.device"):
        assert resolve_dtype("float16", "cpu") is torch.float32
    assert "float16" in caplog.text
    assert resolve_dtype("float16", "cuda") is torch.float16
    with pytest.raises(UnsupportedOption) as info:
        resolve_dtype("int8", "cpu")
    assert info.value.field == "model.dtype"
