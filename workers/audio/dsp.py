"""Sample-level steps before the encoder: checking input, channel mapping, resampling, DC.

All in process (numpy, soxr, scipy), so a render spends no ffmpeg run on them.
"""

from __future__ import annotations

import numpy as np
import scipy.signal
import soxr

SUBSONIC_HZ = 10.0  # DC-blocking high-pass corner, applied whenever the level is normalised
RESAMPLE_QUALITY = "VHQ"  # soxr's very high quality: what ffmpeg's soxr at precision 28 gave


def input_rate(sample_rate: object) -> int:
    """``sample_rate`` as a positive int; ValueError for anything else (bool included)."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, np.integer)) \
            or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive int, got {sample_rate!r}")
    return int(sample_rate)


def channels_first(samples: np.ndarray) -> np.ndarray:
    """``samples`` as contiguous float32 shaped (channels, n); ValueError for anything else."""
    audio = np.asarray(samples)
    if not np.issubdtype(audio.dtype, np.floating):
        raise ValueError(f"samples must be floating point in [-1, 1], got dtype {audio.dtype}")
    if audio.ndim == 1:
        audio = audio[np.newaxis, :]
    if audio.ndim != 2 or audio.shape[0] not in (1, 2):
        raise ValueError(f"samples must be shaped (channels, n) with 1 or 2 channels, got "
                         f"{audio.shape}; transpose an (n, channels) array first")
    if audio.shape[1] == 0:
        raise ValueError("samples are empty")
    if not np.isfinite(audio).all():
        raise ValueError("samples contain NaN or infinity")
    return np.ascontiguousarray(audio, dtype=np.float32)


def map_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    """Downmix stereo to mono as (L + R) / 2; upmix mono by duplicating it."""
    if audio.shape[0] == channels:
        return audio
    if channels == 1:
        return np.ascontiguousarray(audio.mean(axis=0, keepdims=True, dtype=np.float32))
    return np.ascontiguousarray(np.repeat(audio, 2, axis=0))


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample (channels, n) float32 with soxr; the same array when the rates match."""
    if from_rate == to_rate:
        return audio
    out = soxr.resample(np.ascontiguousarray(audio.T), from_rate, to_rate,
                        quality=RESAMPLE_QUALITY)
    return np.ascontiguousarray(out.T, dtype=np.float32)


def remove_dc(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """A 2-pole Butterworth high-pass at ``SUBSONIC_HZ``: DC and subsonic drift out.

    A DC offset takes headroom and no loudness (K-weighting ignores it), so no gain could reach
    a loudness target past it. The filter starts in its steady state for the first sample's
    level, so an offset present from the start leaves without a step (a thump) at time zero.
    """
    sos = scipy.signal.butter(2, SUBSONIC_HZ, btype="highpass", fs=sample_rate, output="sos")
    zi = scipy.signal.sosfilt_zi(sos)[:, np.newaxis, :] * audio[np.newaxis, :, 0:1]
    out, _ = scipy.signal.sosfilt(sos, audio, axis=-1, zi=zi)
    return np.ascontiguousarray(out, dtype=np.float32)
