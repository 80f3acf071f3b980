"""Probe audio with the ``ffprobe`` binary, and check an uploaded melody before it is queued.

Producer side: the standard library only (a calling service installs neither numpy nor
ffmpeg-python). A bad melody is refused here, as a permanent ``InvalidRequest`` on the
``melody`` field, instead of failing later on a GPU worker.
"""

from __future__ import annotations

import fnmatch
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import InvalidRequest, PostProcessFailed, ServiceUnavailable
from pipeline.infra.ffmpeg_runner import exec_ffmpeg, stderr_tail

MB = 1024 * 1024  # sizes are binary megabytes, like most upload limits (nginx's "10m")

# Each canonical name a caller may allow -> (ffprobe container names, codec patterns).
# ffprobe names a demuxer family, not a file type ("mov,mp4,m4a,3gp,3g2,mj2" for every
# MP4/M4A), so the codec decides: an .m4a is that family carrying AAC or ALAC.
FORMAT_RULES: dict[str, tuple[frozenset[str], tuple[str, ...]]] = {
    "wav": (frozenset({"wav"}), ("pcm_*",)),
    "mp3": (frozenset({"mp3"}), ("mp3",)),
    "flac": (frozenset({"flac"}), ("flac",)),
    "ogg": (frozenset({"ogg"}), ("vorbis", "opus", "flac")),
    "opus": (frozenset({"ogg"}), ("opus",)),
    "m4a": (frozenset({"mov", "mp4", "m4a"}), ("aac", "alac")),
    "mp4": (frozenset({"mov", "mp4", "m4a"}), ("aac", "alac", "mp3")),
    "aac": (frozenset({"aac"}), ("aac",)),
    "aiff": (frozenset({"aiff"}), ("pcm_*",)),
    "webm": (frozenset({"matroska", "webm"}), ("opus", "vorbis")),
}
DEFAULT_MELODY_FORMATS: tuple[str, ...] = ("wav", "mp3", "flac", "ogg", "m4a", "aac")


@dataclass(frozen=True)
class AudioInfo:
    """What ffprobe reports for a file's first audio stream.

    ``container`` is ffprobe's format_name ("wav", "ogg", "mov,mp4,m4a,3gp,3g2,mj2");
    ``bit_depth`` is the stored sample depth where the codec has one (PCM, FLAC), else None.
    """

    container: str
    codec: str
    duration_s: float
    sample_rate: int
    channels: int
    size_bytes: int
    bit_depth: int | None = None

    @property
    def format_names(self) -> tuple[str, ...]:
        """The canonical names (keys of ``FORMAT_RULES``) this file counts as."""
        containers = set(self.container.split(","))
        return tuple(name for name, (family, codecs) in FORMAT_RULES.items()
                     if containers & family
                     and any(fnmatch.fnmatchcase(self.codec, c) for c in codecs))


def _melody_error(message: str, rule: str, value: Any, limit: Any,
                  field: str = "melody") -> InvalidRequest:
    return InvalidRequest(message, field=field,
                          details={"rule": rule, "value": value, "limit": limit})


def probe(path: Path, *, ffprobe: str = "ffprobe", timeout_s: float = 10,
          field: str = "melody") -> AudioInfo:
    """Run ffprobe on ``path`` and describe its first audio stream.

    Whose fault a failure is decides the error (``field`` is the request's field: the melody
    or the continuation). ``InvalidRequest`` (field "melody", permanent)
    when ffprobe *exits* non-zero (unreadable file) or finds no audio stream: the caller must
    send another file. ``ServiceUnavailable`` (field "melody", ``details["rule"]`` says why)
    when ffprobe is missing, is killed by a signal, or does not finish within ``timeout_s``:
    a file under the size limit probes in well under a second, so a timeout says this host is
    overloaded, not that the melody is bad, and the same request may succeed later.
    """
    path = Path(path)
    # "file:" + an absolute path: never read as an option or a URL; the whitelist stops a
    # crafted playlist (HLS, concat) from making ffprobe open network addresses.
    argv = [ffprobe, "-v", "error", "-print_format", "json", "-show_format", "-show_streams",
            "-select_streams", "a", "-protocol_whitelist", "file", f"file:{path.absolute()}"]
    try:
        proc = exec_ffmpeg(argv, what=f"probing the {field}", timeout_s=timeout_s)
    except PostProcessFailed as e:  # the runner's timeout: retryable, so not the caller's fault
        raise ServiceUnavailable(f"the {field} could not be probed within {timeout_s:g} s; this "
                                 "host is busy, retry later", field,
                                 {"rule": "probe_timeout", "timeout_s": timeout_s}) from e
    if proc.returncode < 0:
        raise ServiceUnavailable(f"ffprobe was killed by signal {-proc.returncode} while probing "
                                 f"the {field}; retry later", field,
                                 {"rule": "probe_killed", "returncode": proc.returncode,
                                  "stderr_tail": stderr_tail(proc.stderr)})
    problem = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode != 0:
        reason = problem[-1] if problem else f"ffprobe exited with status {proc.returncode}"
        raise _melody_error(f"{field} is not a readable audio file ({reason})", "readable",
                            reason, None, field)
    data = json.loads(proc.stdout or b"{}")
    streams, fmt = data.get("streams") or [], data.get("format") or {}
    if not streams:
        raise _melody_error(f"{field} has no audio stream (ffprobe found format "
                            f"{fmt.get('format_name', 'unknown')!r})", "has_audio", 0, 1, field)
    stream = streams[0]
    duration = _number(stream.get("duration")) or _number(fmt.get("duration"))
    rate = int(_number(stream.get("sample_rate")) or 0)
    if duration is None or rate <= 0:
        raise _melody_error(f"{field}'s duration or sample rate cannot be read", "readable",
                            {"duration": duration, "sample_rate": rate}, None, field)
    depth = int(_number(stream.get("bits_per_raw_sample")) or stream.get("bits_per_sample") or 0)
    return AudioInfo(container=str(fmt.get("format_name", "")),
                     codec=str(stream.get("codec_name", "")), duration_s=duration,
                     sample_rate=rate, channels=int(stream.get("channels") or 0),
                     size_bytes=path.stat().st_size, bit_depth=depth or None)


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # absent, or ffprobe's "N/A"
        return None


@dataclass(frozen=True)
class MelodyLimits:
    """What a melody upload may be; ``max_size_mb`` is in binary megabytes (MiB)."""

    max_size_mb: float = 10.0
    min_duration_s: float = 1.0
    max_duration_s: float = 30.0
    allowed_formats: tuple[str, ...] = DEFAULT_MELODY_FORMATS
    min_sample_rate: int = 16000

    def __post_init__(self) -> None:
        if self.max_size_mb <= 0 or self.min_sample_rate <= 0 or not self.allowed_formats:
            raise ValueError(f"melody limits must be positive and allow a format: {self}")
        if not 0 <= self.min_duration_s <= self.max_duration_s:
            raise ValueError(f"melody limits need 0 <= min_duration_s <= max_duration_s: {self}")


def validate_melody(source: Path | bytes, limits: MelodyLimits, *,
                    ffprobe: str = "ffprobe", field: str = "melody") -> AudioInfo:
    """Check a melody (a path, or the uploaded bytes) against ``limits``; return its info.

    The size is checked first, so an oversized upload is refused without ffprobe reading it.
    Bytes go to a temporary file for ffprobe, removed afterwards. Each failure raises
    ``InvalidRequest(field=field)`` (``"melody"``, or ``"continuation"`` for a clip to
    continue) with ``details = {"rule", "value", "limit"}``.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_size(len(data), limits, field)
        tmp: Path | None = None
        try:
            with tempfile.NamedTemporaryFile(prefix="melody-", suffix=".upload",
                                             delete=False) as handle:
                tmp = Path(handle.name)
                handle.write(data)
            info = probe(tmp, ffprobe=ffprobe, field=field)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    else:
        path = Path(source)
        if not path.is_file():
            raise _melody_error(f"{field} file {path.name!r} does not exist", "exists",
                                str(path), None, field)
        _check_size(path.stat().st_size, limits, field)
        info = probe(path, ffprobe=ffprobe, field=field)
    _check_audio(info, limits, field)
    return info


def _check_size(size: int, limits: MelodyLimits, field: str) -> None:
    if size == 0:
        raise _melody_error(f"{field} is empty (0 bytes)", "non_empty", 0, None, field)
    if size > limits.max_size_mb * MB:
        raise _melody_error(f"{field} is {size / MB:.2f} MB ({size} bytes); the limit is "
                            f"{limits.max_size_mb:g} MB", "max_size_mb",
                            round(size / MB, 3), limits.max_size_mb, field)


def _check_audio(info: AudioInfo, limits: MelodyLimits, field: str) -> None:
    allowed = [name.lower() for name in limits.allowed_formats]
    names = info.format_names
    # A name with no rule (say "caf") is matched against ffprobe's container names as-is.
    unknown_ok = any(name not in FORMAT_RULES and name in info.container.split(",")
                     for name in allowed)
    if not unknown_ok and not set(names) & set(allowed):
        found = f"{names[0]} " if names else ""
        raise _melody_error(
            f"{field} format {found}(container {info.container!r}, codec {info.codec!r}) is not "
            f"allowed; allowed formats: {', '.join(allowed)}", "allowed_formats",
            f"{info.container}/{info.codec}", allowed, field)
    if info.duration_s < limits.min_duration_s:
        raise _melody_error(f"{field} is {info.duration_s:.2f} s long; it must be at least "
                            f"{limits.min_duration_s:g} s", "min_duration_s",
                            info.duration_s, limits.min_duration_s, field)
    if info.duration_s > limits.max_duration_s:
        raise _melody_error(f"{field} is {info.duration_s:.2f} s long; it must be at most "
                            f"{limits.max_duration_s:g} s", "max_duration_s",
                            info.duration_s, limits.max_duration_s, field)
    if info.sample_rate < limits.min_sample_rate:
        raise _melody_error(f"{field} sample rate is {info.sample_rate} Hz; at least "
                            f"{limits.min_sample_rate} Hz is required", "min_sample_rate",
                            info.sample_rate, limits.min_sample_rate, field)
