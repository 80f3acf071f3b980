"""Decode an input audio file (a melody) to float samples with ffmpeg: any container ffprobe
accepted at enqueue (mp3, m4a, ogg...) decodes here the same way."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

from pipeline.errors import InvalidRequest, ServiceUnavailable


def decode_mono(path: Path, sample_rate: int, *, ffmpeg: str = "ffmpeg", timeout_s: float = 120) -> np.ndarray:
    """The file as mono float32 samples at ``sample_rate``."""
    if shutil.which(ffmpeg) is None:
        raise ServiceUnavailable(f"{ffmpeg} not found on this worker; install ffmpeg", None)
    proc = subprocess.run([ffmpeg, "-v", "error", "-nostdin", "-i", str(path), "-f", "f32le", "-ac", "1",
                           "-ar", str(sample_rate), "pipe:1"], capture_output=True, timeout=timeout_s,
                          check=False)
    if proc.returncode != 0 or not proc.stdout:
        tail = proc.stderr.decode(errors="replace")[-400:]
        raise InvalidRequest(f"the melody could not be decoded: {tail.strip() or 'no audio'}", "melody")
    return np.frombuffer(proc.stdout, dtype=np.float32).copy()
