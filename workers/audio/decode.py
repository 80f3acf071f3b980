"""Decode an input audio file (a melody) to float samples with ffmpeg: any container ffprobe
accepted at enqueue (mp3, m4a, ogg...) decodes here the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from pipeline.errors import InvalidRequest
from pipeline.infra.ffmpeg_runner import exec_ffmpeg, failure, stderr_tail


def decode_mono(path: Path, sample_rate: int, *, ffmpeg: str = "ffmpeg",
                timeout_s: float = 120) -> npt.NDArray[np.float32]:
    """The file as mono float32 samples at ``sample_rate``.

    Whose fault a failure is decides whether it is retried: ffmpeg *exiting* non-zero, or
    decoding no audio, means the melody is bad (``InvalidRequest``, field "melody", permanent);
    a timeout or ffmpeg killed by a signal (the OOM killer, say) is the node's trouble (the
    retryable ``PostProcessFailed``), and a missing binary is ``ServiceUnavailable``.
    """
    argv = [ffmpeg, "-v", "error", "-nostdin", "-i", str(path), "-f", "f32le", "-ac", "1",
            "-ar", str(sample_rate), "pipe:1"]
    proc = exec_ffmpeg(argv, what="decoding the melody", timeout_s=timeout_s)
    if proc.returncode < 0:
        raise failure(proc, what="decoding the melody")
    if proc.returncode != 0 or not proc.stdout:
        tail = stderr_tail(proc.stderr)[-400:].strip()
        raise InvalidRequest(f"the melody could not be decoded: {tail or 'no audio'}", "melody",
                             {"returncode": proc.returncode, "stderr_tail": tail})
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()
