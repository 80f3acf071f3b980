"""What a finished file can be: the one output-format table and the spec checked against it.

Producer and worker both import this module, so the producer refuses exactly what the worker
could not render: a bad combination fails in ``resolve()`` before anything is queued, never
after the GPU has generated. Pure Python (stdlib + pydantic): the producer must not import
ffmpeg. What needs the ffmpeg binary (encoder availability, encoder arguments) stays in
``workers.audio.formats``.

Field names are the request's own (``format``, ``sample_rate``, ``channels``, ``bit_depth``,
``normalization``, ``loudness_target``; ``mp3_bitrate`` comes from settings), so an error's
``field`` names what the caller can change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from pipeline.errors import InvalidRequest, PipelineError, UnsupportedOption

# The Literals are the typed, schema-visible form of the table (GenerationRequest and
# AudioSettings use them); the tuples below are read from them, and FORMATS' keys are checked
# against FormatName at import, so the two cannot drift apart.
FormatName = Literal["wav", "mp3", "flac", "ogg", "opus"]
# Every rate some format takes; a format narrows it in its row (mp3, opus).
SampleRate = Literal[8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 88200, 96000]
BitDepth = Literal[8, 16, 24, 32]
Channels = Literal[1, 2]
Normalization = Literal["none", "peak", "rms", "lufs"]

SAMPLE_RATES: tuple[int, ...] = get_args(SampleRate)
BIT_DEPTHS: tuple[int, ...] = get_args(BitDepth)
CHANNELS: tuple[int, ...] = get_args(Channels)
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)
DEFAULT_TARGETS: Mapping[str, float] = {"peak": -1.0, "rms": -20.0, "lufs": -14.0}
# (low, high) accepted loudness_target per mode: dBFS for peak/rms; for lufs, loudnorm's own
# accepted range for I.
TARGET_RANGES: Mapping[str, tuple[float, float]] = {
    "peak": (-60.0, 0.0), "rms": (-60.0, 0.0), "lufs": (-70.0, -5.0)}
MP3_BITRATES_K: tuple[int, ...] = (8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160,
                                   192, 224, 256, 320)
MP3_BITRATES: tuple[str, ...] = tuple(f"{k}k" for k in MP3_BITRATES_K)
DEFAULT_BIT_DEPTH = 16


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
    media_type: str = "application/octet-stream"  # Content-Type for HTTP and object storage


FORMATS: Mapping[str, FormatInfo] = {
    "wav": FormatInfo("wav", ".wav", "wav", "pcm_s16le", True, (8, 16, 24, 32),
                      media_type="audio/wav"),
    # ffmpeg 5.x's FLAC encoder has no 8- or 32-bit mode.
    "flac": FormatInfo("flac", ".flac", "flac", "flac", True, (16, 24), media_type="audio/flac"),
    "mp3": FormatInfo("mp3", ".mp3", "mp3", "mp3", False,
                      sample_rates=(8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000),
                      media_type="audio/mpeg"),
    "ogg": FormatInfo("ogg", ".ogg", "ogg", "vorbis", False, media_type="audio/ogg"),
    # Opus is always Ogg-contained; libopus only takes these input rates.
    "opus": FormatInfo("opus", ".opus", "ogg", "opus", False,
                       sample_rates=(8000, 12000, 16000, 24000, 48000),
                       media_type="audio/ogg; codecs=opus"),
}
if set(FORMATS) != set(get_args(FormatName)):  # pragma: no cover - a broken edit of this file
    raise RuntimeError("FORMATS and FormatName list different formats")
# Content-Type by file suffix, for what serves or uploads a finished file (and its sidecar).
MEDIA_TYPES_BY_SUFFIX: Mapping[str, str] = {
    **{info.extension: info.media_type for info in FORMATS.values()}, ".json": "application/json"}
# What the worker writes (maintenance sweeps files with these suffixes).
OUTPUT_SUFFIXES: frozenset[str] = frozenset(info.extension for info in FORMATS.values())


class OutputSpec(BaseModel):
    """What the finished file should be; constructing or validating one runs the table check.

    ``bit_depth`` applies to wav and flac only (None means 16); lossy formats refuse one.
    ``loudness_target`` is dBFS for peak/rms and LUFS for lufs; None takes ``DEFAULT_TARGETS``.
    ``mp3_bitrate`` applies to mp3 only; below 32 kHz libmp3lame caps it at 160k (MPEG-2).

    An impossible combination is a pydantic ``ValidationError`` at the option's own ``loc``
    whose error type is the typed error's ``code``: a ``JobSpec`` decoded on the worker with a
    bad ``output`` is refused (as ``output.sample_rate``...) before any GPU work. Code that wants
    the typed error itself (``resolve()``) calls ``check_output_spec`` first.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Plain types, not the Literals: every domain check is in check_output_spec, so each
    # refusal is one typed error naming its field, however the spec was built.
    format: str = "wav"
    sample_rate: int = 32000
    channels: int = 1
    bit_depth: int | None = None
    normalization: str = "none"
    loudness_target: float | None = None
    mp3_bitrate: str = "192k"

    @model_validator(mode="after")
    def _renderable(self) -> OutputSpec:
        try:
            check_output_spec(self)
        except PipelineError as exc:
            # A ValidationError raised here is merged into the caller's: its loc nests under
            # the field holding this spec (JobSpec.output), so the refusal names the option.
            field = exc.field or "format"
            raise ValidationError.from_exception_data(type(self).__name__, [InitErrorDetails(
                type=PydanticCustomError(exc.code, "{message}", {"message": exc.message}),
                loc=(field,), input=getattr(self, field, None))]) from exc
        return self

    @property
    def info(self) -> FormatInfo:
        """The table row for ``format``."""
        return FORMATS[self.format]

    @property
    def target(self) -> float | None:
        """The normalisation target with the mode's default filled in; None for "none"."""
        if self.normalization == "none":
            return None
        if self.loudness_target is not None:
            return float(self.loudness_target)
        return DEFAULT_TARGETS[self.normalization]

    @property
    def effective_bit_depth(self) -> int | None:
        """The bit depth written: None for lossy formats."""
        if not self.info.lossless:
            return None
        return self.bit_depth or DEFAULT_BIT_DEPTH


def refuse(field: str, message: str, value: Any, allowed: Any,
           kind: type[PipelineError] = UnsupportedOption) -> PipelineError:
    """The typed error for one refused option, with the value and what is allowed."""
    return kind(message, field, {"value": value, "allowed": allowed})


def check_output_spec(spec: OutputSpec) -> None:
    """Raise ``UnsupportedOption`` (an option the encoders cannot do) or ``InvalidRequest`` (a
    loudness target out of range), ``field`` naming the option, for a spec that cannot render.
    """
    info = FORMATS.get(spec.format)
    if info is None:
        raise refuse("format", f"output format {spec.format!r} is not supported; choose one of "
                     f"{', '.join(FORMATS)}", spec.format, list(FORMATS))
    if spec.sample_rate not in info.sample_rates:
        raise refuse("sample_rate", f"{spec.format} cannot be written at {spec.sample_rate} Hz; "
                     f"supported rates: {', '.join(map(str, info.sample_rates))}",
                     spec.sample_rate, list(info.sample_rates))
    if spec.channels not in CHANNELS:
        raise refuse("channels", f"channels must be 1 (mono) or 2 (stereo), got {spec.channels}",
                     spec.channels, list(CHANNELS))
    if spec.bit_depth is not None:
        if not info.lossless:
            raise refuse("bit_depth", f"bit_depth applies to wav and flac only; {spec.format} is "
                         "lossy and has no bit depth, leave bit_depth unset", spec.bit_depth, [])
        if spec.bit_depth not in info.bit_depths:
            raise refuse("bit_depth", f"{spec.format} cannot be written at {spec.bit_depth} bits; "
                         f"supported: {', '.join(map(str, info.bit_depths))}",
                         spec.bit_depth, list(info.bit_depths))
    _check_normalization(spec)
    if spec.format == "mp3":
        check_mp3_bitrate(spec.mp3_bitrate)


def check_mp3_bitrate(bitrate: str) -> None:
    """Raise ``UnsupportedOption`` for a bitrate that is not an MP3 bitrate."""
    if bitrate not in MP3_BITRATES:
        raise refuse("mp3_bitrate", f"mp3_bitrate {bitrate!r} is not an MP3 bitrate; use one of "
                     f"{', '.join(MP3_BITRATES)}", bitrate, list(MP3_BITRATES))


def _check_normalization(spec: OutputSpec) -> None:
    if spec.normalization not in NORMALIZATIONS:
        raise refuse("normalization", f"normalization {spec.normalization!r} is not supported; "
                     f"choose one of {', '.join(NORMALIZATIONS)}", spec.normalization,
                     list(NORMALIZATIONS))
    if spec.normalization == "none":
        if spec.loudness_target is not None:
            # A target with nothing to apply it is a caller mistake; doing nothing would hide it.
            raise refuse("loudness_target", "loudness_target needs a normalization mode "
                         "(peak, rms or lufs); it has no effect with normalization 'none'",
                         spec.loudness_target, None, InvalidRequest)
        return
    low, high = TARGET_RANGES[spec.normalization]
    target = spec.target
    # "not low <= target <= high" also refuses NaN.
    if target is None or not low <= target <= high:
        unit = "LUFS" if spec.normalization == "lufs" else "dBFS"
        raise refuse("loudness_target", f"loudness_target {target} {unit} is outside the range "
                     f"[{low}, {high}] {unit} for {spec.normalization} normalization",
                     target, [low, high], InvalidRequest)
