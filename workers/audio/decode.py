"""Decode an input audio file (a melody, a continuation clip) to float samples with ffmpeg: any container ffprobe
accepted at enqueue (mp3, m4a, ogg...) decodes here the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from pipeline.errors import InvalidRequest
from pipeline.infra.ffmpeg_runner import exec_ffmpeg, failure, stderr_tail


def decode_mono(path: Path, sample_rate: int, *, ffmpeg: str = "ffmpeg",
                timeout_s: float = 120) -> npt.NDArray[np.float32]:
    """The file as mono float32 samples at ``sample_rate`` (see ``decode_audio``)."""
    mono: npt.NDArray[np.float32] = decode_audio(path, sample_rate, 1, ffmpeg=ffmpeg,
                                                 timeout_s=timeout_s)[0]
    return mono


def decode_audio(path: Path, sample_rate: int, channels: int, *, field: str = "melody",
                 ffmpeg: str = "ffmpeg", timeout_s: float = 120) -> npt.NDArray[np.float32]:
    """The file as float32 samples ``(channels, n)`` at ``sample_rate``, mixed down or up by
    ffmpeg to ``channels``.

    Whose fault a failure is decides whether it is retried: ffmpeg *exiting* non-zero, or
    decoding no audio, means the input is bad (``InvalidRequest`` naming ``field``, permanent);
    a timeout or ffmpeg killed by a signal (the OOM killer, say) is the node's trouble (the
    retryable ``PostProcessFailed``), and a missing binary is ``ServiceUnavailable``.
    """
    argv = [ffmpeg, "-v", "error", "-nostdin", "-i", str(path), "-f", "f32le", "-ac",
            str(channels), "-ar", str(sample_rate), "pipe:1"]
    proc = exec_ffmpeg(argv, what=f"decoding the {field}", timeout_s=timeout_s)
    if proc.returncode < 0:
        raise failure(proc, what=f"decoding the {field}")
    if proc.returncode != 0 or len(proc.stdout) < 4 * channels:
        tail = stderr_tail(proc.stderr)[-400:].strip()
        raise InvalidRequest(f"the {field} could not be decoded: {tail or 'no audio'}", field,
                             {"returncode": proc.returncode, "stderr_tail": tail})
    interleaved = np.frombuffer(proc.stdout, dtype=np.float32)
    frames = len(interleaved) // channels
    return np.array(interleaved[:frames * channels].reshape(frames, channels).T, order="C")
