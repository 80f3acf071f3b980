"""Post-processing with real ffmpeg: every file is checked with ffprobe and measured again,
by ffmpeg (its ebur128 and astats meters), independently of the render's in-process meters.

Duration tolerances (the container's own duration, as ffprobe reports it):
- wav, flac: exact to the sample (half a sample of slack for float rounding);
- ogg (Vorbis): within 30 ms; opus: within 30 ms (Ogg Opus adds a 312-sample pre-skip, 6.5 ms);
- mp3: ffprobe's duration counts LAME's encoder delay (576 + 529 samples) and the last partial
  frame (1152 samples at >= 32 kHz, 576 below), so it may run long by up to that much.
The decoded duration (``RenderResult.duration_s``, gapless) is checked within 30 ms for lossy
formats and exactly for lossless ones.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from pydantic import ValidationError

from pipeline.errors import (
    InvalidRequest,
    PipelineError,
    PostProcessFailed,
    ServiceUnavailable,
    UnsupportedOption,
)
from pipeline.infra.audio_probe import probe
from workers.audio import FORMATS, OutputSpec, check_output_spec, render
from workers.audio.ffmpeg_meters import analyse
from workers.audio.formats import FfmpegCaps, encoder_args

SOURCE_RATE = 32000  # MusicGen's rate
CODECS = {"wav": "pcm_s16le", "flac": "flac", "mp3": "mp3", "ogg": "vorbis", "opus": "opus"}
CONTAINERS = {"wav": "wav", "flac": "flac", "mp3": "mp3", "ogg": "ogg", "opus": "ogg"}


def sine(seconds: float, channels: int = 1, freq: float = 440.0, amp: float = 0.2) -> np.ndarray:
    t = np.arange(int(seconds * SOURCE_RATE)) / SOURCE_RATE
    wave = amp * np.sin(2 * np.pi * freq * t)
    # The second channel at a different pitch, so a swapped or dropped channel would show.
    rows = [wave, amp * np.sin(2 * np.pi * freq * 1.5 * t)][:channels]
    return np.array(rows, dtype=np.float32)


def noise(seconds: float, channels: int = 2, amp: float = 0.05, seed: int = 7) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (amp * rng.standard_normal((channels, int(seconds * SOURCE_RATE)))).astype(np.float32)


def ebur128_lufs(path: Path) -> float:
    """Integrated loudness of a finished file by ffmpeg's ebur128 filter (not the render's)."""
    out = subprocess.run(["ffmpeg", "-nostats", "-hide_banner", "-i", str(path), "-af", "ebur128",
                          "-f", "null", "-"], capture_output=True, text=True, check=True)
    lines = [line for line in out.stderr.splitlines() if line.strip().startswith("I:")]
    return float(lines[-1].split()[1])


def container_tolerance_s(fmt: str, rate: int) -> float:
    if fmt in ("wav", "flac"):
        return 0.5 / rate
    if fmt == "mp3":
        return (576 + 529 + (1152 if rate >= 32000 else 576)) / rate
    return 0.030


@pytest.fixture
def temp_dir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    path = tmp_path / "out"
    path.mkdir()
    return path


@pytest.mark.parametrize(("fmt", "rate", "channels", "in_channels"), [
    ("wav", 44100, 2, 1), ("wav", 16000, 1, 2), ("flac", 48000, 2, 2), ("flac", 32000, 1, 1),
    ("mp3", 44100, 2, 1), ("mp3", 22050, 1, 2), ("ogg", 48000, 2, 2), ("ogg", 32000, 1, 1),
    ("opus", 48000, 2, 1), ("opus", 16000, 1, 2),
])
def test_render_matches_spec(fmt: str, rate: int, channels: int, in_channels: int,
                             temp_dir: Path, out_dir: Path) -> None:
    spec = OutputSpec(format=fmt, sample_rate=rate, channels=channels)
    dest = out_dir / f"take{spec.info.extension}"
    result = render(sine(1.5, in_channels), SOURCE_RATE, spec, dest, temp_dir=temp_dir)

    info = probe(dest)
    assert (info.container, info.codec) == (CONTAINERS[fmt], CODECS[fmt])
    # An Opus stream always decodes at 48 kHz; ffprobe reports that, whatever went in.
    assert info.sample_rate == (48000 if fmt == "opus" else rate)
    assert info.channels == channels
    assert info.duration_s == pytest.approx(1.5, abs=container_tolerance_s(fmt, rate))
    assert info.duration_s >= 1.5 - 0.5 / rate  # padding only ever adds
    lossless = fmt in ("wav", "flac")
    assert result.duration_s == pytest.approx(1.5, abs=0.5 / rate if lossless else 0.030)
    assert (result.path, result.format, result.sample_rate, result.channels) == \
        (dest, fmt, rate, channels)
    assert result.bit_depth == (16 if lossless else None)
    assert result.postprocess_seconds > 0
    assert sorted(p.name for p in out_dir.iterdir()) == [dest.name]  # no .part left behind
    assert list(temp_dir.iterdir()) == []


@pytest.mark.parametrize(("fmt", "rate"), [(info.name, rate) for info in FORMATS.values()
                                           for rate in info.sample_rates])
def test_every_rate_the_table_offers_renders(fmt: str, rate: int, temp_dir: Path,
                                             out_dir: Path) -> None:
    """The producer accepts exactly the table's combinations, so each must really encode."""
    dest = out_dir / f"take{FORMATS[fmt].extension}"
    result = render(sine(0.3), SOURCE_RATE, OutputSpec(format=fmt, sample_rate=rate,
                                                       normalization="peak"), dest,
                    temp_dir=temp_dir)
    info = probe(dest)
    assert (info.container, info.codec) == (CONTAINERS[fmt], CODECS[fmt])
    assert info.sample_rate == (48000 if fmt == "opus" else rate)
    assert result.sample_rate == rate and result.duration_s > 0.25


@pytest.mark.parametrize(("bits", "codec"), [(8, "pcm_u8"), (16, "pcm_s16le"), (24, "pcm_s24le"),
                                             (32, "pcm_s32le")])
def test_wav_bit_depth(bits: int, codec: str, temp_dir: Path, out_dir: Path) -> None:
    dest = out_dir / "take.wav"
    result = render(sine(0.5), SOURCE_RATE, OutputSpec(format="wav", bit_depth=bits), dest,
                    temp_dir=temp_dir)
    info = probe(dest)
    assert (info.codec, info.bit_depth, result.bit_depth) == (codec, bits, bits)


@pytest.mark.parametrize("bits", [16, 24])
def test_flac_bit_depth(bits: int, temp_dir: Path, out_dir: Path) -> None:
    dest = out_dir / "take.flac"
    render(sine(0.5), SOURCE_RATE, OutputSpec(format="flac", bit_depth=bits), dest,
           temp_dir=temp_dir)
    assert probe(dest).bit_depth == bits  # ffprobe's bits_per_raw_sample (s32 carrying 24)


@pytest.mark.parametrize("target", [-14.0, -23.0])
@pytest.mark.parametrize(("signal", "fmt", "rate", "channels"), [
    ("sine-2s", "wav", 44100, 1), ("noise-10s", "flac", 48000, 1), ("noise-3s", "mp3", 44100, 2),
    ("sine-5s", "opus", 48000, 2),
])
def test_lufs_normalisation_lands_within_half_a_lu(signal: str, fmt: str, rate: int,
                                                    channels: int, target: float,
                                                    temp_dir: Path, out_dir: Path) -> None:
    kind, seconds = signal.split("-")
    samples = (sine if kind == "sine" else noise)(float(seconds[:-1]), channels)
    dest = out_dir / f"take.{fmt}"
    spec = OutputSpec(format=fmt, sample_rate=rate, channels=channels, normalization="lufs",
                      loudness_target=target)
    result = render(samples, SOURCE_RATE, spec, dest, temp_dir=temp_dir)

    assert abs(result.loudness_lufs - target) <= 0.5
    independent = ebur128_lufs(dest)  # the file, decoded and measured by ffmpeg
    assert abs(independent - target) <= 0.5  # the promise
    assert independent == pytest.approx(result.loudness_lufs, abs=0.2)  # the two meters agree
    assert result.true_peak_dbtp <= -1.0 + 0.5  # the ceiling, codec overshoot allowed


def test_lufs_when_the_peak_ceiling_forbids_a_linear_gain(temp_dir: Path, out_dir: Path) -> None:
    # A quiet tone with full-scale clicks: +15 dB of linear gain would put the true peak at
    # about +15 dBTP, so the render must limit (in process) instead of clipping.
    samples = sine(3.0, amp=0.05)
    samples[0, ::8000] = 0.99
    dest = out_dir / "take.wav"
    result = render(samples, SOURCE_RATE, OutputSpec(format="wav", bit_depth=24,
                                                     normalization="lufs"), dest,
                    temp_dir=temp_dir)
    assert abs(result.loudness_lufs - -14.0) <= 0.5 and abs(ebur128_lufs(dest) + 14.0) <= 0.5
    assert result.true_peak_dbtp <= -1.0 + 0.05
    assert analyse(dest, ffmpeg="ffmpeg", timeout_s=60, loudness=False).peak_dbfs <= -1.0
    assert any("true-peak limiter" in note for note in result.notes)


def test_lufs_input_above_full_scale(temp_dir: Path, out_dir: Path) -> None:
    # Float input louder than loudnorm accepts as measured_I (> 0 LUFS) is turned down first.
    result = render(noise(2.0, amp=4.0), SOURCE_RATE,
                    OutputSpec(format="flac", channels=2, normalization="lufs"),
                    out_dir / "take.flac", temp_dir=temp_dir)
    assert abs(result.loudness_lufs - -14.0) <= 0.5 and result.peak_dbfs < 0


def test_lufs_default_target_is_minus_14(temp_dir: Path, out_dir: Path) -> None:
    result = render(noise(2.0), SOURCE_RATE, OutputSpec(format="wav", channels=2,
                                                        normalization="lufs"),
                    out_dir / "take.wav", temp_dir=temp_dir)
    assert result.loudness_lufs == pytest.approx(-14.0, abs=0.5)


@pytest.mark.parametrize(("fmt", "bits", "target"), [("wav", 24, -1.0), ("flac", 16, -6.0),
                                                     ("wav", 32, -0.1)])
def test_peak_normalisation_hits_target(fmt: str, bits: int, target: float, temp_dir: Path,
                                        out_dir: Path) -> None:
    dest = out_dir / f"take.{fmt}"
    spec = OutputSpec(format=fmt, channels=2, bit_depth=bits, normalization="peak",
                      loudness_target=target)
    result = render(noise(2.0), SOURCE_RATE, spec, dest, temp_dir=temp_dir)
    assert result.peak_dbfs == pytest.approx(target, abs=0.1)
    assert analyse(dest, ffmpeg="ffmpeg", timeout_s=60, loudness=False).peak_dbfs == \
        pytest.approx(target, abs=0.1)


def test_rms_normalisation_hits_target(temp_dir: Path, out_dir: Path) -> None:
    dest = out_dir / "take.wav"
    spec = OutputSpec(format="wav", bit_depth=24, normalization="rms", loudness_target=-20.0)
    result = render(sine(1.0, amp=0.05), SOURCE_RATE, spec, dest, temp_dir=temp_dir)
    rms = analyse(dest, ffmpeg="ffmpeg", timeout_s=60, loudness=False).rms_dbfs
    assert rms == pytest.approx(-20.0, abs=0.1)
    assert result.notes == ()


def test_rms_gain_is_capped_instead_of_clipping(temp_dir: Path, out_dir: Path) -> None:
    # A quiet tone with one loud click: reaching -6 dBFS RMS would need ~+20 dB and clip.
    samples = sine(1.0, amp=0.05)
    samples[0, 1000] = 0.9
    spec = OutputSpec(format="wav", bit_depth=24, normalization="rms", loudness_target=-6.0)
    result = render(samples, SOURCE_RATE, spec, out_dir / "take.wav", temp_dir=temp_dir)
    assert result.peak_dbfs <= 0.0
    assert result.gain_db == pytest.approx(-0.1 - 20 * np.log10(0.9), abs=0.05)
    assert any("capped" in note for note in result.notes)


def test_stereo_downmix_averages_and_mono_upmix_duplicates(temp_dir: Path,
                                                          out_dir: Path) -> None:
    left_only = np.zeros((2, SOURCE_RATE), dtype=np.float32)
    left_only[0] = 0.5
    mono = render(left_only, SOURCE_RATE, OutputSpec(format="wav", bit_depth=32),
                  out_dir / "mono.wav", temp_dir=temp_dir)
    assert mono.peak_dbfs == pytest.approx(20 * np.log10(0.25), abs=0.01)  # (L + R) / 2

    render(sine(0.5), SOURCE_RATE, OutputSpec(format="wav", channels=2, bit_depth=32),
           out_dir / "stereo.wav", temp_dir=temp_dir)
    data, _ = sf.read(out_dir / "stereo.wav", dtype="float32")
    assert data.shape[1] == 2 and np.array_equal(data[:, 0], data[:, 1])
    assert np.abs(data).max() > 0.19


def test_silent_input_is_reported_not_normalised(temp_dir: Path, out_dir: Path) -> None:
    spec = OutputSpec(format="flac", normalization="lufs")
    result = render(np.zeros(SOURCE_RATE, dtype=np.float32), SOURCE_RATE, spec,
                    out_dir / "silence.flac", temp_dir=temp_dir)
    assert result.notes and "no integrated loudness" in result.notes[0]
    assert result.to_dict()["loudness_lufs"] is None  # -inf is not JSON


@pytest.mark.parametrize(("options", "field", "error"), [
    ({"format": "aiff"}, "format", UnsupportedOption),
    ({"format": "opus", "sample_rate": 44100}, "sample_rate", UnsupportedOption),
    ({"format": "mp3", "sample_rate": 96000}, "sample_rate", UnsupportedOption),
    ({"channels": 6}, "channels", UnsupportedOption),
    ({"format": "mp3", "bit_depth": 24}, "bit_depth", UnsupportedOption),
    ({"format": "opus", "sample_rate": 48000, "bit_depth": 16}, "bit_depth", UnsupportedOption),
    ({"format": "flac", "bit_depth": 32}, "bit_depth", UnsupportedOption),
    ({"format": "wav", "bit_depth": 12}, "bit_depth", UnsupportedOption),
    ({"normalization": "loudest"}, "normalization", UnsupportedOption),
    ({"normalization": "lufs", "loudness_target": -2.0}, "loudness_target", InvalidRequest),
    ({"normalization": "peak", "loudness_target": 3.0}, "loudness_target", InvalidRequest),
    ({"normalization": "peak", "loudness_target": -65.0}, "loudness_target", InvalidRequest),
    ({"loudness_target": -14.0}, "loudness_target", InvalidRequest),
    ({"format": "mp3", "mp3_bitrate": "500k"}, "mp3_bitrate", UnsupportedOption),
])
def test_invalid_spec_is_refused_before_ffmpeg_runs(options: dict[str, Any], field: str,
                                                    error: type[PipelineError],
                                                    temp_dir: Path, out_dir: Path) -> None:
    # Building (or decoding) a spec runs the check: a bad one never exists as a value. It is
    # pydantic's error, at the option's loc and typed by the check's code.
    with pytest.raises(ValidationError) as built:
        OutputSpec(**options)
    [problem] = built.value.errors()
    assert (problem["loc"], problem["type"]) == ((field,), error.code)
    # One built past validation (model_construct) is still refused by the check and by render,
    # with no ffmpeg at all: it never got that far.
    spec = OutputSpec.model_construct(**options)
    with pytest.raises(error) as raised:
        check_output_spec(spec)
    assert raised.value.field == field and not raised.value.retryable
    with pytest.raises(error):
        render(sine(0.2), SOURCE_RATE, spec, out_dir / "x", temp_dir=temp_dir,
               ffmpeg="/nonexistent/ffmpeg")
    assert list(out_dir.iterdir()) == [] and list(temp_dir.iterdir()) == []


def test_encoder_fallbacks_follow_what_ffmpeg_has() -> None:
    native_only = FfmpegCaps(encoders=frozenset({"vorbis", "flac"}), has_soxr=False)
    args = encoder_args(OutputSpec(format="ogg", channels=2), native_only)
    assert (args["acodec"], args["strict"], args["f"]) == ("vorbis", "-2", "ogg")
    with pytest.raises(UnsupportedOption) as mono:
        encoder_args(OutputSpec(format="ogg", channels=1), native_only)
    assert mono.value.field == "channels"
    with pytest.raises(UnsupportedOption) as opus:
        encoder_args(OutputSpec(format="opus", sample_rate=48000), native_only)
    assert opus.value.field == "format" and "libopus" in opus.value.message


def test_missing_ffmpeg_is_service_unavailable(temp_dir: Path, out_dir: Path) -> None:
    with pytest.raises(ServiceUnavailable) as raised:
        render(sine(0.2), SOURCE_RATE, OutputSpec(format="mp3"), out_dir / "take.mp3",
               temp_dir=temp_dir, ffmpeg="/nonexistent/ffmpeg")
    assert "ffmpeg not found" in raised.value.message
    assert list(out_dir.iterdir()) == [] and list(temp_dir.iterdir()) == []


def test_ffmpeg_that_fails_is_retryable_and_leaves_nothing(temp_dir: Path,
                                                          out_dir: Path) -> None:
    # opus: ogg, which this test used, is written by libsndfile now and runs no ffmpeg.
    dest = out_dir / "take.opus"
    with pytest.raises(PostProcessFailed) as raised:
        render(sine(0.2), SOURCE_RATE, OutputSpec(format="opus", sample_rate=48000), dest,
               temp_dir=temp_dir, ffmpeg="/bin/false")
    assert raised.value.retryable and raised.value.details["returncode"] == 1
    assert not dest.exists() and list(out_dir.iterdir()) == [] and list(temp_dir.iterdir()) == []


def _ffmpeg_that_dies_while_encoding(tmp_path: Path) -> str:
    """A real ffmpeg, except that it writes half a file and is SIGKILLed when encoding."""
    real = shutil.which("ffmpeg")
    assert real is not None
    script = tmp_path / "dying-ffmpeg"
    script.write_text("#!/bin/sh\nfor arg in \"$@\"; do case \"$arg\" in *.part)\n"
                      "  printf 'half a file' > \"$arg\"; echo 'encoder exploded' >&2;"
                      " kill -9 $$;; esac; done\n"
                      f"exec {real} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def test_crash_mid_encode_cleans_up_and_keeps_old_output(tmp_path: Path, temp_dir: Path,
                                                         out_dir: Path) -> None:
    dest = out_dir / "take.mp3"
    dest.write_bytes(b"the previous, complete take")
    with pytest.raises(PostProcessFailed) as raised:
        render(sine(0.5), SOURCE_RATE, OutputSpec(format="mp3"), dest, temp_dir=temp_dir,
               ffmpeg=_ffmpeg_that_dies_while_encoding(tmp_path))
    assert "signal 9" in raised.value.message
    assert "encoder exploded" in raised.value.details["stderr_tail"]
    assert dest.read_bytes() == b"the previous, complete take"
    assert list(out_dir.iterdir()) == [dest]  # the half-written .part is gone
    assert list(temp_dir.iterdir()) == []  # nothing is staged there


@pytest.mark.parametrize(("samples", "match"), [
    (np.zeros((SOURCE_RATE, 2), dtype=np.float32), "transpose"),
    (np.zeros((2, 0), dtype=np.float32), "empty"),
    (np.zeros(100, dtype=np.int16), "floating point"),
    (np.full(100, np.nan, dtype=np.float32), "NaN"),
])
def test_malformed_samples_are_refused(samples: np.ndarray, match: str, temp_dir: Path,
                                       out_dir: Path) -> None:
    with pytest.raises(ValueError, match=match):
        render(samples, SOURCE_RATE, OutputSpec(), out_dir / "x.wav", temp_dir=temp_dir)


def test_dc_offset_does_not_stop_loudness_normalisation(tmp_path: Path) -> None:
    """A signal that is mostly DC (as a random model makes) still reaches the target: the
    subsonic high-pass removes what K-weighting ignores but the peak ceiling counts."""
    rate = 32000
    t = np.arange(rate * 4) / rate
    samples = (-0.2 + 0.02 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None, :]
    result = render(samples, rate, OutputSpec(format="wav", sample_rate=rate, normalization="lufs",
                                              loudness_target=-14.0), tmp_path / "dc.wav", temp_dir=tmp_path / "t")
    assert result.loudness_lufs == pytest.approx(-14.0, abs=0.5)
    decoded, _ = sf.read(tmp_path / "dc.wav")
    assert abs(decoded[rate // 2:].mean()) < 0.01  # the offset is gone
