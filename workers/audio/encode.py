"""Writing the finished samples: lossless in process, lossy in one ffmpeg run fed on stdin.

wav and flac are written by libsndfile (soundfile) in process: they are a container around the
samples, and starting ffmpeg (about 80 ms on a 2-core node: it links some 200 libraries) would
cost more than the whole render. mp3, ogg and opus go through exactly one ffmpeg run that reads
interleaved float32 samples from stdin (already at the output rate and channel count) and
encodes them with the arguments of ``formats.encoder_args``.

Errors are mapped by ``pipeline.ffmpeg_runner``, the project's one runner: a missing or unexecutable binary is
``ServiceUnavailable``, a timeout, a non-zero exit or a signal is the retryable
``PostProcessFailed`` with the tail of stderr in ``details``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ffmpeg as ffmpeg_lib
import numpy as np
import soundfile as sf

from pipeline.errors import PostProcessFailed
from pipeline.ffmpeg_runner import run_checked
from pipeline.output_format import OutputSpec

# libsndfile's subtype for each bit depth: unsigned 8-bit is what WAV means by 8 bits.
SUBTYPES: Mapping[int, str] = {8: "PCM_U8", 16: "PCM_16", 24: "PCM_24", 32: "PCM_32"}
CONTAINERS: Mapping[str, str] = {"wav": "WAV", "flac": "FLAC"}


def writes_in_process(spec: OutputSpec) -> bool:
    """True for the formats written without ffmpeg (wav, flac)."""
    return spec.format in CONTAINERS


def for_integer_pcm(audio: np.ndarray) -> np.ndarray:
    """``audio`` clipped to full scale: libsndfile wraps what lies past it, ffmpeg clipped."""
    return np.clip(audio, -1.0, 1.0) if np.abs(audio).max(initial=0.0) > 1.0 else audio


def write_lossless(audio: np.ndarray, sample_rate: int, spec: OutputSpec, out: Path) -> None:
    """Write (channels, n) float samples as ``spec``'s wav or flac at ``spec``'s bit depth."""
    bits = spec.effective_bit_depth or 16
    sf.write(out, audio.T, sample_rate, subtype=SUBTYPES[bits],
             format=CONTAINERS[spec.format])


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
# -0.6 LU below 32 kHz); their files are decoded in process and measured. libopus kept within
# 0.25 LU everywhere and decodes slowest, so an Opus file is not read back.
READ_BACK_FORMATS = frozenset({"mp3", "ogg"})


def reads_back(spec: OutputSpec) -> bool:
    """True when the render decodes the encoded file to measure it (lossy encoders that drift)."""
    return spec.format in READ_BACK_FORMATS


def decode(path: Path) -> tuple[np.ndarray, int]:
    """An encoded file decoded in process by libsndfile: (channels, n) float32 and its rate.

    Raises the retryable ``PostProcessFailed`` when the file cannot be read back: it is the
    file ffmpeg just wrote, so a failure is the encoder's or the disk's, not the input's.
    """
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise PostProcessFailed(f"could not read back the encoded {path.name}: {e}",
                                details={"path": str(path)}) from e
    return np.ascontiguousarray(data.T), int(rate)
