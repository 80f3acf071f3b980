"""Melody probing with the real ffprobe: what is refused, why, and before what.

Fixtures are made with the stdlib ``wave`` module (this is producer-side code) and, for
compressed formats, the ffmpeg command line.
"""

from __future__ import annotations

import math
import random
import struct
import subprocess
import sys
import tempfile
import wave
from pathlib import Path

import pytest

from pipeline.errors import InvalidRequest, PipelineError, ServiceUnavailable
from pipeline.infra.audio_probe import MelodyLimits, probe, validate_melody

LIMITS = MelodyLimits(max_size_mb=5, min_duration_s=1.0, max_duration_s=30.0,
                      allowed_formats=("wav", "mp3", "flac", "ogg", "m4a", "aac"),
                      min_sample_rate=16000)


def make_wav(path: Path, seconds: float, rate: int = 32000, channels: int = 1) -> Path:
    frames = int(seconds * rate)
    samples = (int(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(frames)
               for _ in range(channels))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(struct.pack(f"<{frames * channels}h", *samples))
    return path


def encode(src: Path, dest: Path, *args: str) -> Path:
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(src), *args, str(dest)],
                   check=True, timeout=60)
    return dest


def rule_of(raised: pytest.ExceptionInfo[InvalidRequest]) -> str:
    assert raised.value.field == "melody" and not raised.value.retryable
    return str(raised.value.details["rule"])


def test_valid_wav_passes_with_its_facts(tmp_path: Path) -> None:
    path = make_wav(tmp_path / "melody.wav", 2.0, rate=32000, channels=2)
    info = validate_melody(path, LIMITS)
    assert (info.container, info.codec, info.sample_rate, info.channels) == \
        ("wav", "pcm_s16le", 32000, 2)
    assert info.duration_s == pytest.approx(2.0, abs=1 / 32000)
    assert info.size_bytes == path.stat().st_size and info.bit_depth == 16
    assert info.format_names == ("wav",)


@pytest.mark.parametrize(("ext", "args", "names"), [
    ("mp3", ["-c:a", "libmp3lame"], ("mp3",)),
    ("flac", ["-c:a", "flac"], ("flac",)),
    ("ogg", ["-c:a", "libvorbis"], ("ogg",)),
    ("opus", ["-c:a", "libopus", "-ar", "48000", "-f", "ogg"], ("ogg", "opus")),
    ("m4a", ["-c:a", "aac"], ("m4a", "mp4")),
    ("aac", ["-c:a", "aac", "-f", "adts"], ("aac",)),
])
def test_compressed_formats_map_to_canonical_names(ext: str, args: list[str],
                                                   names: tuple[str, ...],
                                                   tmp_path: Path) -> None:
    path = encode(make_wav(tmp_path / "src.wav", 1.5), tmp_path / f"melody.{ext}", *args)
    info = validate_melody(path, MelodyLimits(allowed_formats=names[-1:]))
    assert info.format_names == names
    assert info.duration_s == pytest.approx(1.5, abs=0.1)  # codec padding, see test_postprocess


def test_m4a_container_family_is_refused_unless_allowed(tmp_path: Path) -> None:
    path = encode(make_wav(tmp_path / "src.wav", 1.5), tmp_path / "melody.m4a", "-c:a", "aac")
    with pytest.raises(InvalidRequest) as raised:
        validate_melody(path, MelodyLimits(allowed_formats=("wav", "mp3")))
    assert rule_of(raised) == "allowed_formats"
    assert "mov,mp4,m4a,3gp,3g2,mj2" in raised.value.message and "wav, mp3" in raised.value.message
    assert raised.value.details["limit"] == ["wav", "mp3"]


def test_corrupt_file_is_invalid_melody(tmp_path: Path) -> None:
    path = tmp_path / "melody.wav"
    path.write_bytes(random.Random(1234).randbytes(20000))
    with pytest.raises(InvalidRequest) as raised:
        validate_melody(path, LIMITS)
    assert rule_of(raised) in ("readable", "has_audio")
    assert "melody" in raised.value.message


def test_oversized_file_is_refused_before_ffprobe_runs(tmp_path: Path) -> None:
    path = make_wav(tmp_path / "melody.wav", 2.0)
    tiny = MelodyLimits(max_size_mb=0.01)  # ~10 KB; the file is ~125 KB
    # With no ffprobe at all, reaching the probe would raise ServiceUnavailable instead.
    with pytest.raises(InvalidRequest) as raised:
        validate_melody(path, tiny, ffprobe="/nonexistent/ffprobe")
    assert rule_of(raised) == "max_size_mb"
    assert raised.value.details["limit"] == 0.01 and raised.value.details["value"] > 0.1
    with pytest.raises(InvalidRequest) as from_bytes:
        validate_melody(path.read_bytes(), tiny, ffprobe="/nonexistent/ffprobe")
    assert rule_of(from_bytes) == "max_size_mb"


@pytest.mark.parametrize(("seconds", "rate", "rule"), [
    (0.5, 32000, "min_duration_s"), (31.0, 16000, "max_duration_s"),
    (2.0, 8000, "min_sample_rate"),
])
def test_duration_and_sample_rate_limits(seconds: float, rate: int, rule: str,
                                         tmp_path: Path) -> None:
    path = make_wav(tmp_path / "melody.wav", seconds, rate=rate)
    with pytest.raises(InvalidRequest) as raised:
        validate_melody(path, LIMITS)
    assert rule_of(raised) == rule
    assert raised.value.details["value"] == pytest.approx(seconds if "duration" in rule else rate)
    assert raised.value.to_dict()["details"]["limit"] == getattr(LIMITS, rule)


def test_bytes_input_is_probed_from_a_temp_file_that_is_removed(tmp_path: Path) -> None:
    data = make_wav(tmp_path / "melody.wav", 1.5).read_bytes()
    before = set(Path(tempfile.gettempdir()).glob("melody-*.upload"))
    info = validate_melody(data, LIMITS)
    assert (info.codec, info.size_bytes) == ("pcm_s16le", len(data))
    with pytest.raises(InvalidRequest):
        validate_melody(b"\x00not audio at all" * 100, LIMITS)
    assert set(Path(tempfile.gettempdir()).glob("melody-*.upload")) == before


def test_empty_and_missing_melodies(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as empty:
        validate_melody(b"", LIMITS, ffprobe="/nonexistent/ffprobe")
    assert rule_of(empty) == "non_empty"
    with pytest.raises(InvalidRequest) as missing:
        validate_melody(tmp_path / "nope.wav", LIMITS)
    assert rule_of(missing) == "exists"


def test_missing_ffprobe_is_service_unavailable(tmp_path: Path) -> None:
    path = make_wav(tmp_path / "melody.wav", 1.5)
    with pytest.raises(ServiceUnavailable) as raised:
        probe(path, ffprobe="/nonexistent/ffprobe")
    assert raised.value.field is None and "ffprobe not found" in raised.value.message
    assert raised.value.code == "service_unavailable"


def test_errors_survive_the_broker_round_trip(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as raised:
        validate_melody(make_wav(tmp_path / "m.wav", 0.2), LIMITS)
    back = PipelineError.from_dict(raised.value.to_dict())
    assert isinstance(back, InvalidRequest) and back.details == raised.value.details


def test_nonsense_limits_are_rejected() -> None:
    with pytest.raises(ValueError):
        MelodyLimits(min_duration_s=10, max_duration_s=5)
    with pytest.raises(ValueError):
        MelodyLimits(allowed_formats=())


def test_probe_module_stays_stdlib_only() -> None:
    # The producer installs no numpy/ffmpeg-python/torch: importing the probe must not need them.
    code = ("import sys, pipeline.infra.audio_probe\n"
            "heavy = {'numpy', 'ffmpeg', 'soundfile', 'torch'} & set(sys.modules)\n"
            "print(sorted(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[2], timeout=60, check=True)
    assert out.stdout.strip() == "[]"


def fake_binary(path: Path, body: str) -> str:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_probe_timeout_is_service_unavailable_not_the_callers_fault(tmp_path: Path) -> None:
    # An ffprobe that never answers: the host is in trouble, the melody is not shown bad.
    slow = fake_binary(tmp_path / "ffprobe", "exec sleep 30")
    path = make_wav(tmp_path / "melody.wav", 1.5)
    with pytest.raises(ServiceUnavailable) as raised:
        probe(path, ffprobe=slow, timeout_s=0.3)
    assert not isinstance(raised.value, InvalidRequest)
    assert raised.value.code == "service_unavailable" and raised.value.field == "melody"
    assert raised.value.details == {"rule": "probe_timeout", "timeout_s": 0.3}
    back = PipelineError.from_dict(raised.value.to_dict())
    assert isinstance(back, ServiceUnavailable) and back.details == raised.value.details


def test_probe_killed_by_a_signal_is_service_unavailable(tmp_path: Path) -> None:
    killed = fake_binary(tmp_path / "ffprobe", "kill -9 $$")
    with pytest.raises(ServiceUnavailable) as raised:
        probe(make_wav(tmp_path / "melody.wav", 1.5), ffprobe=killed)
    assert raised.value.details["rule"] == "probe_killed"
    assert raised.value.details["returncode"] == -9


def test_probe_exiting_non_zero_is_still_the_callers_fault(tmp_path: Path) -> None:
    failing = fake_binary(tmp_path / "ffprobe", "echo 'Invalid data found' >&2; exit 1")
    with pytest.raises(InvalidRequest) as raised:
        probe(make_wav(tmp_path / "melody.wav", 1.5), ffprobe=failing)
    assert raised.value.field == "melody" and raised.value.details["rule"] == "readable"
    assert "Invalid data found" in raised.value.message
