"""What the worker can write: the output-format table, the spec check, and calling ffmpeg.

The table is the single place that knows which encoder, muxer, sample rates and bit depths a
format takes. ``check_output_spec`` refuses a combination before any ffmpeg process starts, so a
bad request fails as a permanent ``UnsupportedOption`` instead of as a retried ffmpeg crash.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PostProcessFailed, UnsupportedOption
from pipeline.ffmpeg_runner import exec_ffmpeg as _exec
from pipeline.ffmpeg_runner import run_ffmpeg as run_ffmpeg  # noqa: PLC0414 (re-export)

# Rates every format here accepts except where a format narrows them (mp3, opus).
SAMPLE_RATES: tuple[int, ...] = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000,
                                 88200, 96000)
NORMALIZATIONS: tuple[str, ...] = ("none", "peak", "rms", "lufs")
DEFAULT_TARGETS: Mapping[str, float] = {"peak": -1.0, "rms": -20.0, "lufs": -14.0}
# (low, high) accepted target_level per mode; lufs is loudnorm's own accepted range for I.
TARGET_RANGES: Mapping[str, tuple[float, float]] = {
    "peak": (-60.0, 0.0), "rms": (-60.0, 0.0), "lufs": (-70.0, -5.0)}
MP3_BITRATES_K: tuple[int, ...] = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160,
                                   192, 224, 256, 320)
STDERR_TAIL_CHARS = 2000


@dataclass(frozen=True)
class FormatInfo:
    """One row of the output-format table."""

    name: str
    extension: str
    muxer: str
    codec_name: str  # what ffprobe reports for the stream
    lossless: bool
    bit_depths: tuple[int, ...] = ()  # empty for lossy formats: they have no bit depth
    sample_rates: tuple[int, ...] = SAMPLE_RATES


FORMATS: Mapping[str, FormatInfo] = {
    "wav": FormatInfo("wav", ".wav", "wav", "pcm_s16le", True, (8, 16, 24, 32)),
    # ffmpeg 5.x's FLAC encoder has no 8- or 32-bit mode.
    "flac": FormatInfo("flac", ".flac", "flac", "flac", True, (16, 24)),
    "mp3": FormatInfo("mp3", ".mp3", "mp3", "mp3", False,
                      sample_rates=(8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)),
    "ogg": FormatInfo("ogg", ".ogg", "ogg", "vorbis", False),
    # Opus is always Ogg-contained; libopus only takes these input rates.
    "opus": FormatInfo("opus", ".opus", "ogg", "opus", False,
                       sample_rates=(8000, 12000, 16000, 24000, 48000)),
}
WAV_CODECS: Mapping[int, str] = {8: "pcm_u8", 16: "pcm_s16le", 24: "pcm_s24le", 32: "pcm_s32le"}
DEFAULT_BIT_DEPTH = 16


@dataclass(frozen=True)
class OutputSpec:
    """What the finished file should be.

    ``bit_depth`` applies to wav and flac only (None means 16); lossy formats refuse one.
    ``target_level`` is dBFS for peak/rms and LUFS for lufs; None takes ``DEFAULT_TARGETS``.
    ``mp3_bitrate`` applies to mp3 only; below 32 kHz libmp3lame caps it at 160k (MPEG-2).
    """

    format: str = "wav"
    sample_rate: int = 32000
    channels: int = 1
    bit_depth: int | None = None
    normalization: str = "none"
    target_level: float | None = None
    mp3_bitrate: str = "192k"

    @property
    def info(self) -> FormatInfo:
        """The table row for ``format`` (call ``check_output_spec`` first)."""
        return FORMATS[self.format]

    @property
    def target(self) -> float | None:
        """The normalisation target with the mode's default filled in; None for "none"."""
        if self.normalization == "none":
            return None
        if self.target_level is not None:
            return float(self.target_level)
        return DEFAULT_TARGETS[self.normalization]

    @property
    def effective_bit_depth(self) -> int | None:
        """The bit depth written: None for lossy formats."""
        if not self.info.lossless:
            return None
        return self.bit_depth or DEFAULT_BIT_DEPTH


def _refuse(field: str, message: str, value: Any, allowed: Any) -> UnsupportedOption:
    return UnsupportedOption(message, field=field, details={"value": value, "allowed": allowed})


def check_output_spec(spec: OutputSpec) -> None:
    """Raise ``UnsupportedOption`` (field names the option) for a spec the encoders cannot do."""
    info = FORMATS.get(spec.format)
    if info is None:
        raise _refuse("format", f"output format {spec.format!r} is not supported; choose one of "
                      f"{', '.join(FORMATS)}", spec.format, list(FORMATS))
    if spec.sample_rate not in info.sample_rates:
        raise _refuse("sample_rate", f"{spec.format} cannot be written at {spec.sample_rate} Hz; "
                      f"supported rates: {', '.join(map(str, info.sample_rates))}",
                      spec.sample_rate, list(info.sample_rates))
    if spec.channels not in (1, 2):
        raise _refuse("channels", f"channels must be 1 (mono) or 2 (stereo), got {spec.channels}",
                      spec.channels, [1, 2])
    if spec.bit_depth is not None:
        if not info.lossless:
            raise _refuse("bit_depth", f"bit_depth applies to wav and flac only; {spec.format} is "
                          "lossy and has no bit depth, leave bit_depth unset", spec.bit_depth, [])
        if spec.bit_depth not in info.bit_depths:
            raise _refuse("bit_depth", f"{spec.format} cannot be written at {spec.bit_depth} bits; "
                          f"supported: {', '.join(map(str, info.bit_depths))}",
                          spec.bit_depth, list(info.bit_depths))
    _check_normalization(spec)
    if spec.format == "mp3":
        match = re.fullmatch(r"(\d+)k", spec.mp3_bitrate)
        if match is None or int(match.group(1)) not in MP3_BITRATES_K:
            raise _refuse("mp3_bitrate", f"mp3_bitrate {spec.mp3_bitrate!r} is not an MP3 bitrate; "
                          f"use one of {', '.join(f'{k}k' for k in MP3_BITRATES_K)}",
                          spec.mp3_bitrate, [f"{k}k" for k in MP3_BITRATES_K])


def _check_normalization(spec: OutputSpec) -> None:
    if spec.normalization not in NORMALIZATIONS:
        raise _refuse("normalization", f"normalization {spec.normalization!r} is not supported; "
                      f"choose one of {', '.join(NORMALIZATIONS)}", spec.normalization,
                      list(NORMALIZATIONS))
    if spec.normalization == "none":
        if spec.target_level is not None:
            # A target with nothing to apply it is a caller mistake; doing nothing would hide it.
            raise _refuse("target_level", "target_level needs a normalization mode "
                          "(peak, rms or lufs); it has no effect with normalization 'none'",
                          spec.target_level, None)
        return
    low, high = TARGET_RANGES[spec.normalization]
    target = spec.target
    if target is None or not low <= target <= high:
        unit = "LUFS" if spec.normalization == "lufs" else "dBFS"
        raise _refuse("target_level", f"target_level {target} {unit} is outside the range "
                      f"[{low}, {high}] {unit} for {spec.normalization} normalization",
                      target, [low, high])


# --- the ffmpeg binary -----------------------------------------------------------------------

@dataclass(frozen=True)
class FfmpegCaps:
    """What one ffmpeg binary can do (from ``-encoders`` and its build configuration)."""

    encoders: frozenset[str]
    has_soxr: bool


# The one ffmpeg runner lives in pipeline/ffmpeg_runner.py (shared with decode and the
# producer's melody probe); ``_exec`` and ``run_ffmpeg`` are imported from there above.


@functools.lru_cache(maxsize=8)
def ffmpeg_capabilities(ffmpeg: str = "ffmpeg", timeout_s: float = 30.0) -> FfmpegCaps:
    """Ask ``ffmpeg`` (once per process) which encoders it has and whether it links libsoxr."""
    outputs = []
    for flag in ("-encoders", "-version"):
        proc = _exec([ffmpeg, "-hide_banner", flag], what=f"running {flag}", timeout_s=timeout_s)
        if proc.returncode != 0:
            tail = proc.stderr.decode("utf-8", "replace")[-STDERR_TAIL_CHARS:]
            raise PostProcessFailed(f"'{ffmpeg} {flag}' exited with status {proc.returncode}",
                                    details={"returncode": proc.returncode,
                                             "argv": [ffmpeg, flag], "stderr_tail": tail})
        outputs.append(proc.stdout.decode("utf-8", "replace"))
    listing, version = outputs
    # Rows after the "------" legend look like " A....D libmp3lame   libmp3lame MP3 (...)".
    body = listing.split("------", 1)[-1]
    encoders = frozenset(parts[1] for line in body.splitlines()
                         if len(parts := line.split()) >= 2)
    return FfmpegCaps(encoders=encoders, has_soxr="--enable-libsoxr" in version)


def encoder_args(spec: OutputSpec, caps: FfmpegCaps) -> dict[str, Any]:
    """ffmpeg-python output keyword arguments that encode ``spec`` with this ffmpeg."""
    info = spec.info
    args: dict[str, Any] = {"f": info.muxer}
    if spec.format == "wav":
        args["acodec"] = WAV_CODECS[spec.effective_bit_depth or DEFAULT_BIT_DEPTH]
    elif spec.format == "flac":
        args["acodec"] = "flac"
        if spec.effective_bit_depth == 24:
            # FLAC has no 24-bit sample format in ffmpeg: s32 carrying 24 significant bits.
            args.update(sample_fmt="s32", bits_per_raw_sample=24)
        else:
            args["sample_fmt"] = "s16"
    elif spec.format == "mp3":
        _need(caps, "libmp3lame", spec.format)
        args.update(acodec="libmp3lame", audio_bitrate=spec.mp3_bitrate)
    elif spec.format == "ogg":
        if "libvorbis" in caps.encoders:
            args["acodec"] = "libvorbis"
        else:
            _need(caps, "vorbis", spec.format)
            if spec.channels != 2:
                raise _refuse("channels", "this ffmpeg has only its native Vorbis encoder, which "
                              "writes stereo only; ask for 2 channels or another format",
                              spec.channels, [2])
            # The native encoder is marked experimental; ffmpeg refuses it without -strict -2.
            args.update(acodec="vorbis", strict="-2")
    else:  # opus: the native encoder is experimental and 48 kHz-only, so require libopus
        _need(caps, "libopus", spec.format)
        args["acodec"] = "libopus"
    return args


def _need(caps: FfmpegCaps, encoder: str, fmt: str) -> None:
    if encoder not in caps.encoders:
        raise _refuse("format", f"this worker's ffmpeg has no {encoder} encoder, so it cannot "
                      f"write {fmt}", fmt, sorted(FORMATS))
