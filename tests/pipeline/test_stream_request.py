"""stream=True at the producer (issue 25): behind features.streaming_generation, and refused,
naming ``stream``, for a job that would run on Hugging Face generate (which does not stream)."""

from __future__ import annotations

import io
import wave
from pathlib import Path

import numpy as np
import pytest

from pipeline.client.resolve import resolve
from pipeline.config.loader import load_settings
from pipeline.config.schema import GenerationSettings, Settings
from pipeline.contract.jobs import GenerationRequest, JobSpec
from pipeline.errors import InvalidRequest, UnsupportedOption


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return load_settings("development", cwd=tmp_path,
                         overrides={"model.preset": "tiny", "model.engine": "static", **overrides})


def _refusal(settings: Settings, **fields: object) -> UnsupportedOption:
    with pytest.raises(UnsupportedOption) as refused:
        resolve(GenerationRequest(prompt="x", stream=True, **fields),  # type: ignore[arg-type]
                settings, job_id="j")
    assert refused.value.field == "stream"
    return refused.value


def test_the_flag_and_the_chunk_length_default_off_and_one_second() -> None:
    assert Settings().features.streaming_generation is False
    assert GenerationSettings().stream_chunk_s == 1.0
    assert GenerationRequest(prompt="x").stream is False


def test_stream_is_refused_while_the_flag_is_off(tmp_path: Path) -> None:
    error = _refusal(_settings(tmp_path))
    assert "features.streaming_generation" in error.message


def test_stream_is_accepted_with_the_flag_on_and_crosses_the_broker(tmp_path: Path) -> None:
    settings = _settings(tmp_path, **{"features.streaming_generation": True})
    spec = resolve(GenerationRequest(prompt="x", duration=2.0, stream=True), settings, job_id="j")
    assert spec.stream is True
    assert JobSpec.model_validate_json(spec.model_dump_json()).stream is True
    plain = resolve(GenerationRequest(prompt="x", duration=2.0), settings, job_id="k")
    assert plain.stream is False


def test_stream_is_refused_where_the_job_would_run_on_hf_generate(tmp_path: Path) -> None:
    hf = _settings(tmp_path, **{"features.streaming_generation": True, "model.engine": "hf"})
    assert "model.engine = hf" in _refusal(hf, duration=2.0).message
    static = _settings(tmp_path, **{"features.streaming_generation": True})
    # Long-form jobs run window by window on HF and stream a window at a time.
    assert resolve(GenerationRequest(prompt="x", duration=45.0, stream=True), static,
                   job_id="j").stream is True
    # Continuations run on the engine within the window (and window by window past it).
    assert resolve(GenerationRequest(prompt="x", duration=3.0, stream=True,
                                     continuation=_wav(1.0)), static, job_id="c").stream is True


def _wav(seconds: float, rate: int = 32_000) -> bytes:
    """A quiet sine of ``seconds`` as WAV bytes (16-bit mono)."""
    samples = (3000 * np.sin(np.arange(int(seconds * rate)) * 0.05)).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.tobytes())
    return out.getvalue()


def test_stream_must_be_a_boolean() -> None:
    with pytest.raises(InvalidRequest) as refused:
        GenerationRequest(prompt="x", stream="sometimes")  # type: ignore[arg-type]
    assert refused.value.field == "stream"


def test_the_chunk_length_is_bounded(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="stream_chunk_s"):
        load_settings("development", cwd=tmp_path, overrides={"generation.stream_chunk_s": 0.1})
