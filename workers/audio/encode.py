"""Writing the finished samples: in process with libsndfile where that pays, else one ffmpeg run.

Starting ffmpeg costs about 85 ms on a 2-core node before it encodes a sample (it links some
200 libraries), more than the whole render of a wav. So libsndfile (soundfile) writes in
process every format it can write exactly as ffmpeg would and at least as fast: wav, flac
and ogg (Vorbis). ``encoder_for`` is the one place that decides; the rest is one ffmpeg run
that reads interleaved float32 samples from stdin (already at the output rate and channel
count) and encodes them with the arguments of ``formats.encoder_args``.

Why mp3 and opus still go to ffmpeg (the encoder step alone, ``write_in_process`` against
``encode_with_ffmpeg`` with ffmpeg's start included: median CPU ms for 10 s of noise and tone
on a 2-core host under some load; the ratios held across runs, the absolute figures move):

* mp3 at 44.1 kHz, 192k: ffmpeg 150 mono / 260 stereo, libsndfile 280 / 590. libsndfile
  writes the same stream (``sndfile_encoding`` gives LAME the same CBR bitrate; ffprobe agreed
  for all 324 table combinations of rate, bitrate and channels), but the LAME built into
  soundfile's wheel runs 2-3x slower than Debian's libmp3lame that ffmpeg links. Add "mp3" to
  ``IN_PROCESS_FORMATS`` under a libsndfile whose LAME is faster.
* opus at 48 kHz: ffmpeg 190 mono / 205 stereo, libsndfile 195 / 370; and ffmpeg's libopus runs
  unconstrained VBR by default, which libsndfile cannot ask for (it keeps libopus's
  constrained VBR), so the files would differ.
* ogg at 44.1 kHz: ffmpeg 175 mono / 245 stereo, libsndfile 68 / 157, the same stream (the
  same nominal bitrate at every rate and layout): in process.

Errors: a libsndfile write that fails is the retryable ``PostProcessFailed`` (the disk's or
the encoder's trouble, never the request's). ffmpeg runs are mapped by
``pipeline.infra.ffmpeg_runner``, the project's one runner: a missing or unexecutable binary is
``ServiceUnavailable``, a timeout, a non-zero exit or a signal the retryable
``PostProcessFailed`` with the tail of stderr in ``details``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import ffmpeg as ffmpeg_lib
import numpy as np
import soundfile as sf

from pipeline.contract.output_format import MP3_BITRATES, OutputSpec
from pipeline.errors import PostProcessFailed
from pipeline.infra.ffmpeg_runner import run_checked

Encoder = Literal["libsndfile", "ffmpeg"]

# libsndfile's subtype for each bit depth: unsigned 8-bit is what WAV means by 8 bits.
SUBTYPES: Mapping[int, str] = {8: "PCM_U8", 16: "PCM_16", 24: "PCM_24", 32: "PCM_32"}
CONTAINERS: Mapping[str, str] = {"wav": "WAV", "flac": "FLAC"}
# The formats written in process (see the module docstring for why not mp3 and opus).
IN_PROCESS_FORMATS = frozenset({"wav", "flac", "ogg"})
# ffmpeg's libvorbis encodes at VBR quality 3 (of -1..10) when given neither a bitrate nor a
# quality; libsndfile's Vorbis quality is 1 - compression_level on 0..1, so 0.7 is the same.
VORBIS_COMPRESSION = 0.7
# LAME's CBR bitrate range per MPEG version, as libsndfile maps compression_level onto it:
# (lowest rate of the version, (kbps at compression 1, kbps at compression 0)).
MP3_BITRATE_RANGES: tuple[tuple[int, tuple[int, int]], ...] = (
    (32000, (32, 320)),  # MPEG-1
    (16000, (8, 160)),  # MPEG-2
    (0, (8, 64)),  # MPEG-2.5
)


@dataclass(frozen=True)
class SndfileEncoding:
    """How libsndfile writes one spec: major format, subtype and its encoder settings."""

    format: str
    subtype: str
    compression_level: float | None = None
    bitrate_mode: str | None = None


def sndfile_encoding(spec: OutputSpec) -> SndfileEncoding | None:
    """libsndfile's settings that write ``spec`` as the ffmpeg path would: the same codec,
    rate, channels and bitrate (or VBR quality); None where libsndfile cannot (opus)."""
    if spec.format in CONTAINERS:
        return SndfileEncoding(CONTAINERS[spec.format],
                               SUBTYPES[spec.effective_bit_depth or 16])
    if spec.format == "ogg":
        return SndfileEncoding("OGG", "VORBIS", VORBIS_COMPRESSION)
    if spec.format == "mp3":
        return SndfileEncoding("MP3", "MPEG_LAYER_III",
                               mp3_compression_level(spec.mp3_bitrate, spec.sample_rate),
                               "CONSTANT")
    return None  # opus: libsndfile cannot turn off libopus's VBR constraint as ffmpeg does


def mp3_compression_level(bitrate: str, sample_rate: int) -> float:
    """The compression_level at which libsndfile gives LAME ``bitrate`` ("192k") at this rate.

    libsndfile sets ``int(high - level * (high - low))`` kbps, the range being the MPEG
    version's; aiming half a kbps above the bitrate makes the truncation land on it exactly.
    A bitrate outside the range is clamped to its edge, which is what LAME does with the
    bitrate ffmpeg passes it (192k at 22.05 kHz is 160k either way); one inside the range that
    the version has no frame size for (144k in MPEG-1) goes to LAME as is, as ffmpeg passes it.
    """
    if bitrate not in MP3_BITRATES:
        raise ValueError(f"{bitrate!r} is not an MP3 bitrate")
    low, high = next(span for lowest, span in MP3_BITRATE_RANGES if sample_rate >= lowest)
    kbps = min(max(int(bitrate.removesuffix("k")), low), high)
    return 0.0 if kbps == high else (high - kbps - 0.5) / (high - low)


def encoder_for(spec: OutputSpec) -> Encoder:
    """Which encoder writes ``spec``: "libsndfile" in process or "ffmpeg" (one run)."""
    if spec.format in IN_PROCESS_FORMATS and sndfile_encoding(spec) is not None:
        return "libsndfile"
    return "ffmpeg"


def for_integer_pcm(audio: np.ndarray) -> np.ndarray:
    """``audio`` clipped to full scale: libsndfile wraps what lies past it, ffmpeg clipped."""
    return np.clip(audio, -1.0, 1.0) if np.abs(audio).max(initial=0.0) > 1.0 else audio


def write_in_process(audio: np.ndarray, sample_rate: int, spec: OutputSpec, out: Path) -> None:
    """Write (channels, n) float samples into ``out`` as ``spec`` asks, with libsndfile.

    Raises ``ValueError`` for a spec libsndfile cannot write as ffmpeg would (opus) and the
    retryable ``PostProcessFailed`` when libsndfile fails to write.
    """
    how = sndfile_encoding(spec)
    if how is None:
        raise ValueError(f"libsndfile cannot write {spec.format} as the ffmpeg path does")
    try:
        sf.write(out, audio.T, sample_rate, subtype=how.subtype, format=how.format,
                 compression_level=how.compression_level, bitrate_mode=how.bitrate_mode)
    except (sf.LibsndfileError, OSError) as e:
        raise PostProcessFailed(f"libsndfile could not write {spec.format} to {out.name}: {e}",
                                details={"path": str(out), "format": how.format,
                                         "subtype": how.subtype}) from e


def encode_command(channels: int, sample_rate: int, codec: Mapping[str, Any], out: Path,
                   ffmpeg: str) -> list[str]:
    """The ffmpeg command line: float32 little-endian from stdin, ``codec`` into ``out``."""
    source = ffmpeg_lib.input("pipe:", format="f32le", ac=channels, ar=sample_rate)
    argv: list[str] = (source.output(str(out), **codec).overwrite_output()
                       .global_args("-hide_banner", "-nostdin", "-nostats", "-loglevel",
                                    "warning")
                       .compile(cmd=ffmpeg))
    return argv


def encode_with_ffmpeg(audio: np.ndarray, sample_rate: int, codec: Mapping[str, Any], out: Path,
                       *, ffmpeg: str, timeout_s: float) -> str:
    """One ffmpeg run encoding (channels, n) float samples into ``out``; its stderr."""
    argv = encode_command(audio.shape[0], sample_rate, codec, out, ffmpeg)
    what = f"encoding {out.name}"
    interleaved = np.ascontiguousarray(audio.T, dtype="<f4").tobytes()
    proc = run_checked(argv, what=what, timeout_s=timeout_s, input=interleaved)
    return proc.stderr.decode("utf-8", "replace")


# Lossy encoders that move loudness past the promise on some inputs (measured on band-limited
# noise and tones, 8-96 kHz, mono and stereo: Vorbis up to +1.9 LU below 32 kHz, LAME up to
# -0.6 LU below 32 kHz; libsndfile's LAME and libvorbis drift exactly as ffmpeg's do, to the
# 0.1 LU ebur128 prints); their files are decoded in process and measured. libopus kept within
# 0.25 LU everywhere and decodes slowest, so an Opus file is not read back.
READ_BACK_FORMATS = frozenset({"mp3", "ogg"})


def reads_back(spec: OutputSpec) -> bool:
    """True when the render decodes the encoded file to measure it (lossy encoders that drift)."""
    return spec.format in READ_BACK_FORMATS


def decode(path: Path) -> tuple[np.ndarray, int]:
    """An encoded file decoded in process by libsndfile: (channels, n) float32 and its rate.

    Raises the retryable ``PostProcessFailed`` when the file cannot be read back: it is the
    file the encoder just wrote, so a failure is the encoder's or the disk's, not the input's.
    """
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise PostProcessFailed(f"could not read back the encoded {path.name}: {e}",
                                details={"path": str(path)}) from e
    return np.ascontiguousarray(data.T), int(rate)
