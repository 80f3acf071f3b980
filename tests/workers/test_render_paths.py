"""The in-process render's own decisions, each checked on real files with ffmpeg's meters.

The limiter, DC removal, input too short or silent for a loudness, the lossy read-back trim,
the one-encoder-run promise and the single run's failure mapping; and the new path against
the multi-pass reference render on the same input.
"""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from benchmarks.reference_render import render as reference_render
from pipeline.errors import PostProcessFailed
from workers.audio import OutputSpec, render
from workers.audio.dsp import remove_dc
from workers.audio.limiter import limit
from workers.audio.loudness import integrated_lufs, to_db, true_peak

RATE = 32000


def ebur128_lufs(path: Path) -> float:
    """Integrated loudness of a finished file by ffmpeg's ebur128 filter (not the render's)."""
    out = subprocess.run(["ffmpeg", "-nostats", "-hide_banner", "-i", str(path), "-af", "ebur128",
                          "-f", "null", "-"], capture_output=True, text=True, check=True)
    lines = [line for line in out.stderr.splitlines() if line.strip().startswith("I:")]
    return float(lines[-1].split()[1])


def noise(seconds: float, channels: int = 1, amp: float = 0.05, seed: int = 3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (amp * rng.standard_normal((channels, int(seconds * RATE)))).astype(np.float32)


def logging_ffmpeg(tmp_path: Path, *, then: str = 'exec {real} "$@"') -> tuple[str, Path]:
    """A wrapper around the real ffmpeg that logs each encode run (an argv naming a .part) and
    then does ``then`` for it; capability queries pass straight through."""
    real = shutil.which("ffmpeg")
    assert real is not None
    log = tmp_path / "encodes.log"
    script = tmp_path / "logging-ffmpeg"
    script.write_text("#!/bin/sh\nfor arg in \"$@\"; do case \"$arg\" in *.part)\n"
                      f"  echo \"$*\" >> {log}; {then.format(real=real)};; esac; done\n"
                      f"exec {real} \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script), log


def test_limiter_holds_the_true_peak_and_leaves_quiet_audio_alone() -> None:
    t = np.arange(RATE) / RATE
    quiet = (0.1 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
    same, reduction = limit(quiet, RATE, -1.0)
    assert same is quiet and reduction == 0.0
    # Inter-sample peaks: a tone near Nyquist/4 with a phase that puts samples off its crests,
    # driven +6 dB over full scale. Its sample peak understates its true peak.
    loud = (2.0 * np.sin(2 * np.pi * 7999 * t + 0.7)).astype(np.float32)[None, :]
    limited, reduction = limit(loud, RATE, -1.0)
    assert reduction > 6.0
    assert to_db(true_peak(limited, RATE)) <= -1.0 + 0.05


def test_remove_dc_takes_the_offset_without_a_thump_at_the_start() -> None:
    t = np.arange(RATE * 2) / RATE
    signal = (-0.3 + 0.05 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
    out = remove_dc(signal, RATE)
    assert abs(float(out[0, RATE // 2:].mean())) < 1e-3
    # Started in its steady state: no step response from -0.3 to 0 in the first samples.
    assert float(np.abs(out[0, :RATE // 10]).max()) < 0.06


@pytest.mark.parametrize("seconds", [0.0, 0.3])
def test_silent_or_too_short_input_has_no_loudness_and_is_not_normalised(
        seconds: float, tmp_path: Path) -> None:
    samples = noise(0.3) if seconds else np.zeros((1, RATE), dtype=np.float32)
    dest = tmp_path / "take.mp3"
    result = render(samples, RATE, OutputSpec(format="mp3", normalization="lufs"), dest,
                    temp_dir=tmp_path / "t")
    assert any("no integrated loudness" in note for note in result.notes)
    assert result.gain_db == 0.0 and result.to_dict()["loudness_lufs"] is None
    assert dest.stat().st_size > 0


def test_lossy_encoder_drift_is_read_back_and_trimmed(tmp_path: Path) -> None:
    # Vorbis at 16 kHz makes band-limited noise ~1.5 LU louder than the samples it was given:
    # without the read-back the file misses the promise.
    dest = tmp_path / "take.ogg"
    spec = OutputSpec(format="ogg", sample_rate=16000, channels=2, normalization="lufs")
    result = render(noise(4.0, channels=2), RATE, spec, dest, temp_dir=tmp_path / "t")
    assert any("encoded once more" in note for note in result.notes)
    assert abs(ebur128_lufs(dest) - -14.0) <= 0.5
    assert result.loudness_lufs == pytest.approx(ebur128_lufs(dest), abs=0.2)


@pytest.mark.parametrize(("fmt", "runs"), [("wav", 0), ("flac", 0), ("ogg", 0), ("mp3", 1),
                                          ("opus", 1)])
def test_one_encoder_run_at_most(fmt: str, runs: int, tmp_path: Path) -> None:
    ffmpeg, log = logging_ffmpeg(tmp_path)
    rate = 48000 if fmt == "opus" else 44100
    dest = tmp_path / f"take.{fmt}"
    result = render(noise(2.0), RATE, OutputSpec(format=fmt, sample_rate=rate,
                                                 normalization="lufs"),
                    dest, temp_dir=tmp_path / "t", ffmpeg=ffmpeg)
    encodes = log.read_text().splitlines() if log.exists() else []
    # A second run happens only for a read-back file that missed, and says so; a format
    # written in process (runs == 0) runs no ffmpeg, trimmed or not.
    trimmed = any("encoded once more" in note for note in result.notes)
    assert len(encodes) == (runs + trimmed if runs else 0)
    assert all("-f f32le" in argv and "-i pipe:" in argv for argv in encodes)
    assert sf.info(dest).frames > 0


@pytest.mark.parametrize(("fmt", "container"), [("wav", "WAV"), ("flac", "FLAC"), ("ogg", "OGG")])
def test_in_process_formats_need_no_ffmpeg(fmt: str, container: str, tmp_path: Path) -> None:
    dest = tmp_path / f"take.{fmt}"
    spec = OutputSpec(format=fmt, sample_rate=44100, normalization="peak")
    result = render(noise(1.0), RATE, spec, dest, temp_dir=tmp_path / "t",
                    ffmpeg="/nonexistent/ffmpeg")  # any ffmpeg run would fail the render
    info = sf.info(dest)
    assert result.path == dest and (info.format, info.samplerate) == (container, 44100)
    assert info.frames == pytest.approx(44100, abs=64)  # one second, resampled
    written, _ = sf.read(dest, dtype="float32")
    peak_db = float(20 * np.log10(np.abs(written).max()))
    assert result.peak_dbfs == pytest.approx(peak_db, abs=0.05)  # the file's own peak is reported
    if fmt != "ogg":  # lossless: exactly the -1 dBFS asked for; Vorbis overshoots a little
        assert peak_db == pytest.approx(-1.0, abs=0.01)


def test_encode_run_that_exits_non_zero_is_retryable(tmp_path: Path) -> None:
    ffmpeg, _ = logging_ffmpeg(tmp_path, then="echo 'no such encoder' >&2; exit 3")
    dest = tmp_path / "out" / "take.mp3"
    with pytest.raises(PostProcessFailed) as raised:
        render(noise(1.0), RATE, OutputSpec(format="mp3"), dest, temp_dir=tmp_path / "t",
               ffmpeg=ffmpeg)
    assert raised.value.retryable and raised.value.details["returncode"] == 3
    assert "no such encoder" in raised.value.details["stderr_tail"]
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []


def test_encode_run_past_its_timeout_is_retryable(tmp_path: Path) -> None:
    ffmpeg, _ = logging_ffmpeg(tmp_path, then="exec sleep 30")
    dest = tmp_path / "out" / "take.opus"
    with pytest.raises(PostProcessFailed) as raised:
        render(noise(1.0), RATE, OutputSpec(format="opus", sample_rate=48000), dest,
               temp_dir=tmp_path / "t", ffmpeg=ffmpeg, timeout_s=2.0)
    assert raised.value.retryable and "timed out" in raised.value.message
    assert raised.value.details["timeout_s"] == 2.0
    assert list(dest.parent.iterdir()) == []


@pytest.mark.parametrize(("fmt", "rate", "channels"), [("flac", 44100, 2), ("mp3", 44100, 1),
                                                       ("ogg", 22050, 2), ("opus", 48000, 1)])
def test_new_and_reference_paths_land_the_same_loudness(fmt: str, rate: int, channels: int,
                                                        tmp_path: Path) -> None:
    t = np.arange(RATE * 4) / RATE
    samples = noise(4.0, channels=channels)
    samples += (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    spec = OutputSpec(format=fmt, sample_rate=rate, channels=channels, normalization="lufs",
                      loudness_target=-16.0)
    new = render(samples, RATE, spec, tmp_path / f"new.{fmt}", temp_dir=tmp_path / "t")
    old = reference_render(samples, RATE, spec, tmp_path / f"old.{fmt}", temp_dir=tmp_path / "t")
    new_file, old_file = ebur128_lufs(new.path), ebur128_lufs(old.path)
    assert abs(new_file - -16.0) <= 0.5 and abs(old_file - -16.0) <= 0.5
    assert new_file == pytest.approx(old_file, abs=0.4)
    assert new.duration_s == pytest.approx(old.duration_s, abs=0.03)


def test_in_process_meter_agrees_with_ffmpeg_ebur128(tmp_path: Path) -> None:
    samples = noise(5.0, channels=2, amp=0.1)
    dest = tmp_path / "take.wav"
    sf.write(dest, samples.T, RATE, subtype="FLOAT")
    assert integrated_lufs(samples, RATE) == pytest.approx(ebur128_lufs(dest), abs=0.15)
