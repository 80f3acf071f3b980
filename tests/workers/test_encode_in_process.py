"""Which encoder writes each format, and that libsndfile writes what ffmpeg would.

"What ffmpeg would" is checked against the real thing: the same samples go through the ffmpeg
path (``encoder_args`` + ``encode_with_ffmpeg``) and through libsndfile, and ffprobe must
report the same codec, rate, channels and bitrate for both files. mp3 is checked although the
render sends it to ffmpeg (``encode``'s docstring says why): its settings are kept correct so
that adding it to ``IN_PROCESS_FORMATS`` is a one-word change.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.errors import PostProcessFailed
from workers.audio import FORMATS, OutputSpec, render
from workers.audio.encode import (
    IN_PROCESS_FORMATS,
    encode_with_ffmpeg,
    encoder_for,
    mp3_compression_level,
    sndfile_encoding,
    write_in_process,
)
from workers.audio.formats import encoder_args, ffmpeg_capabilities

RATE = 32000


def stream(path: Path) -> tuple[str, int, int, str | None]:
    """ffprobe's (codec, sample rate, channels, bit_rate) for the file's audio stream."""
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "a:0", "-show_streams",
                          "-of", "json", str(path)], capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)["streams"][0]
    return info["codec_name"], int(info["sample_rate"]), int(info["channels"]), \
        info.get("bit_rate")


def noise(rate: int, channels: int, seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(11)
    return (0.1 * rng.standard_normal((channels, int(seconds * rate)))).astype(np.float32)


def both_paths(spec: OutputSpec, tmp_path: Path) -> tuple[tuple[str, int, int, str | None],
                                                           tuple[str, int, int, str | None]]:
    """ffprobe of the same samples written by the ffmpeg path and by libsndfile."""
    samples = noise(spec.sample_rate, spec.channels)
    by_ffmpeg, by_sndfile = tmp_path / "ffmpeg.part", tmp_path / "sndfile.part"
    encode_with_ffmpeg(samples, spec.sample_rate, encoder_args(spec, ffmpeg_capabilities()),
                       by_ffmpeg, ffmpeg="ffmpeg", timeout_s=60)
    write_in_process(samples, spec.sample_rate, spec, by_sndfile)
    return stream(by_ffmpeg), stream(by_sndfile)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_each_format_has_one_encoder(fmt: str) -> None:
    expected = "libsndfile" if fmt in ("wav", "flac", "ogg") else "ffmpeg"
    for rate in FORMATS[fmt].sample_rates:
        for channels in (1, 2):
            spec = OutputSpec(format=fmt, sample_rate=rate, channels=channels)
            assert encoder_for(spec) == expected, (rate, channels)


def test_formats_written_in_process_all_have_sndfile_settings(tmp_path: Path) -> None:
    # The chooser falls back to ffmpeg where libsndfile cannot honour a spec; every format the
    # policy names can be honoured at every rate, so that fallback never silently takes over.
    containers = {"wav": "WAV", "flac": "FLAC", "ogg": "OGG"}
    assert set(IN_PROCESS_FORMATS) <= set(containers)
    for fmt in IN_PROCESS_FORMATS:
        for rate in FORMATS[fmt].sample_rates:
            spec = OutputSpec(format=fmt, sample_rate=rate)
            how = sndfile_encoding(spec)
            assert how is not None and how.format == containers[fmt], (fmt, rate)
            assert sf.check_format(how.format, how.subtype), (fmt, rate, how)
            # and libsndfile really writes it at that rate
            out = tmp_path / f"{fmt}-{rate}.{fmt}"
            write_in_process(noise(rate, spec.channels, seconds=0.1), rate, spec, out)
            info = sf.info(out)
            assert (info.format, info.subtype, info.samplerate) == (how.format, how.subtype, rate)


def test_opus_is_left_to_ffmpeg(tmp_path: Path) -> None:
    spec = OutputSpec(format="opus", sample_rate=48000)
    assert sndfile_encoding(spec) is None and encoder_for(spec) == "ffmpeg"
    with pytest.raises(ValueError, match="opus"):
        write_in_process(noise(48000, 1), 48000, spec, tmp_path / "take.opus")


@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (16000, 2), (22050, 1), (32000, 2),
                                                (44100, 1), (48000, 2), (96000, 2)])
def test_vorbis_in_process_is_what_ffmpeg_writes(rate: int, channels: int,
                                                 tmp_path: Path) -> None:
    # Vorbis is VBR; bit_rate is the header's nominal rate, set by the quality and the layout.
    ffmpeg_file, sndfile_file = both_paths(
        OutputSpec(format="ogg", sample_rate=rate, channels=channels), tmp_path)
    assert sndfile_file == ffmpeg_file
    assert sndfile_file[:3] == ("vorbis", rate, channels)


@pytest.mark.parametrize(("rate", "channels", "bitrate", "kbps"), [
    (44100, 1, "192k", 192),  # the default: CBR 192 kbps
    (48000, 2, "320k", 320),  # the top of MPEG-1 (compression level 0)
    (44100, 2, "144k", 128),  # no such MPEG-1 frame size: LAME takes the nearest, either way
    (44100, 1, "16k", 32),  # below MPEG-1's floor
    (22050, 1, "192k", 160),  # MPEG-2 tops out at 160
    (16000, 2, "144k", 144),
    (8000, 1, "192k", 64),  # MPEG-2.5 tops out at 64
    (11025, 2, "8k", 8),
])
def test_mp3_in_process_has_ffmpeg_bitrate(rate: int, channels: int, bitrate: str, kbps: int,
                                           tmp_path: Path) -> None:
    ffmpeg_file, sndfile_file = both_paths(
        OutputSpec(format="mp3", sample_rate=rate, channels=channels, mp3_bitrate=bitrate),
        tmp_path)
    assert sndfile_file == ffmpeg_file == ("mp3", rate, channels, str(kbps * 1000))


def test_mp3_compression_level_refuses_what_is_not_a_bitrate() -> None:
    with pytest.raises(ValueError, match="not an MP3 bitrate"):
        mp3_compression_level("150k", 44100)


def test_libsndfile_write_failure_is_retryable(tmp_path: Path) -> None:
    out = tmp_path / "missing-folder" / "take.ogg.part"
    with pytest.raises(PostProcessFailed) as raised:
        write_in_process(noise(44100, 1), 44100, OutputSpec(format="ogg", sample_rate=44100),
                         out)
    assert raised.value.retryable and raised.value.details["format"] == "OGG"
    assert not out.exists()


def test_ogg_keeps_the_loudness_promise_without_ffmpeg(tmp_path: Path) -> None:
    # Vorbis at 22.05 kHz makes noise ~1.8 LU louder: the in-process file is read back and
    # trimmed as ffmpeg's was. The meter here is ffmpeg's (the render had none to run).
    dest = tmp_path / "take.ogg"
    spec = OutputSpec(format="ogg", sample_rate=22050, channels=2, normalization="lufs")
    result = render(noise(RATE, 2, seconds=4.0), RATE, spec, dest, temp_dir=tmp_path / "t",
                    ffmpeg="/nonexistent/ffmpeg")
    assert any("encoded once more" in note for note in result.notes)
    out = subprocess.run(["ffmpeg", "-nostats", "-hide_banner", "-i", str(dest), "-af",
                          "ebur128", "-f", "null", "-"], capture_output=True, text=True,
                         check=True)
    lufs = float([line for line in out.stderr.splitlines()
                  if line.strip().startswith("I:")][-1].split()[1])
    assert abs(lufs - -14.0) <= 0.5
    assert stream(dest)[:3] == ("vorbis", 22050, 2)
