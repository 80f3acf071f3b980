"""Melody decoding through the project's one ffmpeg runner: whose fault each failure is."""

from __future__ import annotations

import math
import struct
import wave
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import InvalidRequest, PipelineError, PostProcessFailed, ServiceUnavailable
from workers.audio.decode import decode_mono


def make_wav(path: Path, seconds: float = 0.5, rate: int = 16000) -> Path:
    frames = int(seconds * rate)
    data = struct.pack(f"<{frames}h", *(int(8000 * math.sin(2 * math.pi * 440 * i / rate))
                                        for i in range(frames)))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(data)
    return path


def fake_binary(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_decodes_to_mono_float_at_the_asked_rate(tmp_path: Path) -> None:
    samples = decode_mono(make_wav(tmp_path / "m.wav"), 32000)
    assert samples.dtype == np.float32 and abs(len(samples) - 16000) < 64
    assert 0.1 < float(np.abs(samples).max()) < 0.5


def test_undecodable_melody_is_the_callers_fault(tmp_path: Path) -> None:
    junk = tmp_path / "m.mp3"
    junk.write_bytes(b"not audio at all" * 64)
    with pytest.raises(InvalidRequest) as raised:
        decode_mono(junk, 32000)
    assert raised.value.field == "melody" and not raised.value.retryable


def test_decode_timeout_is_retryable_postprocess_failed(tmp_path: Path) -> None:
    # Before the one runner, subprocess.TimeoutExpired escaped as an internal error.
    slow = fake_binary(tmp_path / "ffmpeg", "exec sleep 30")
    with pytest.raises(PostProcessFailed) as raised:
        decode_mono(make_wav(tmp_path / "m.wav"), 32000, ffmpeg=slow, timeout_s=0.3)
    assert raised.value.retryable and raised.value.code == "postprocess_failed"
    assert raised.value.details["timeout_s"] == 0.3
    back = PipelineError.from_dict(raised.value.to_dict())
    assert isinstance(back, PostProcessFailed)


def test_ffmpeg_killed_by_a_signal_is_retryable_not_the_callers_fault(tmp_path: Path) -> None:
    killed = fake_binary(tmp_path / "ffmpeg", "kill -9 $$")
    with pytest.raises(PostProcessFailed) as raised:
        decode_mono(make_wav(tmp_path / "m.wav"), 32000, ffmpeg=killed)
    assert raised.value.details["returncode"] == -9


def test_missing_ffmpeg_is_service_unavailable(tmp_path: Path) -> None:
    with pytest.raises(ServiceUnavailable) as raised:
        decode_mono(make_wav(tmp_path / "m.wav"), 32000, ffmpeg=str(tmp_path / "no-ffmpeg"))
    assert raised.value.details == {"binary": str(tmp_path / "no-ffmpeg")}
