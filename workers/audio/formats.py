"""What this node's ffmpeg can write: its encoders, and the encoder arguments for a spec.

The format table, ``OutputSpec`` and ``check_output_spec`` live in ``pipeline.contract.output_format``,
shared with the producer so that it refuses a bad combination before it is queued; they are
re-exported here for worker code. What stays here needs the ffmpeg binary: which encoders it
has, and ``encoder_args``, which refuses a format whose encoder this ffmpeg lacks.

The render asks for ``encoder_args`` only for the formats ffmpeg encodes there (mp3, opus:
``encode.encoder_for`` decides); wav, flac and ogg are written in process by libsndfile, so an
ffmpeg without libvorbis no longer limits ogg there. Every branch stays for the multi-pass
reference render (``benchmarks/reference_render.py``), which encodes every format with ffmpeg.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.contract.output_format import DEFAULT_BIT_DEPTH
from pipeline.contract.output_format import FORMATS as FORMATS  # noqa: PLC0414 (re-export)
from pipeline.contract.output_format import FormatInfo as FormatInfo  # noqa: PLC0414 (re-export)
from pipeline.contract.output_format import OutputSpec as OutputSpec  # noqa: PLC0414 (re-export)
from pipeline.contract.output_format import check_output_spec as check_output_spec  # noqa: PLC0414
from pipeline.contract.output_format import refuse as _refuse
from pipeline.errors import PostProcessFailed
from pipeline.infra.ffmpeg_runner import exec_ffmpeg as _exec
from pipeline.infra.ffmpeg_runner import run_ffmpeg as run_ffmpeg  # noqa: PLC0414 (re-export)

STDERR_TAIL_CHARS = 2000
WAV_CODECS: Mapping[int, str] = {8: "pcm_u8", 16: "pcm_s16le", 24: "pcm_s24le", 32: "pcm_s32le"}


# --- the ffmpeg binary -----------------------------------------------------------------------

@dataclass(frozen=True)
class FfmpegCaps:
    """What one ffmpeg binary can do (from ``-encoders`` and its build configuration)."""

    encoders: frozenset[str]
    has_soxr: bool


# The one ffmpeg runner lives in pipeline/infra/ffmpeg_runner.py (shared with decode and the
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
