"""Measuring audio in process: sample peak, RMS, true peak and BS.1770 integrated loudness.

The render measures the samples it hands to the encoder, so no ffmpeg run is spent on meters.
Integrated loudness is pyloudnorm's ITU-R BS.1770-4 meter (K-weighting, 400 ms blocks with
75 % overlap, the -70 LUFS absolute and -10 LU relative gates). True peak follows BS.1770-4
Annex 2: the signal oversampled 4x (soxr's linear-phase resampler) and its largest magnitude.
Channels are weighted 1.0 each and a mono signal is counted once, as ffmpeg's ebur128 and
loudnorm do, so these numbers and an ffmpeg measurement of the finished file agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyloudnorm
import soxr

TRUE_PEAK_CEILING_DBTP = -1.0  # the usual streaming ceiling for lufs normalisation
SILENCE_LUFS = -70.0  # BS.1770's absolute gate: anything quieter has no integrated loudness
BLOCK_S = 0.4  # one BS.1770 gating block: shorter audio has no integrated loudness
TRUE_PEAK_OVERSAMPLING = 4


@dataclass(frozen=True)
class Levels:
    """What was measured on one block of samples; ``-inf`` stands for "nothing there"."""

    peak_dbfs: float
    rms_dbfs: float
    true_peak_dbtp: float
    loudness_lufs: float
    samples: int  # frames per channel
    sample_rate: int

    @property
    def unmeasurable(self) -> bool:
        """True when BS.1770 gives no integrated loudness: silence, or under one 0.4 s block."""
        return not math.isfinite(self.loudness_lufs) or self.loudness_lufs <= SILENCE_LUFS

    @property
    def duration_s(self) -> float:
        """The duration of the samples measured."""
        return self.samples / self.sample_rate

    def shifted(self, gain_db: float) -> Levels:
        """The levels of the same samples after a linear gain of ``gain_db`` (exact in float)."""
        return Levels(self.peak_dbfs + gain_db, self.rms_dbfs + gain_db,
                      self.true_peak_dbtp + gain_db, self.loudness_lufs + gain_db, self.samples,
                      self.sample_rate)


def to_db(value: float) -> float:
    """20 log10 of an amplitude; ``-inf`` for 0."""
    return 20.0 * math.log10(value) if value > 0 else -math.inf


def measure(audio: np.ndarray, sample_rate: int) -> Levels:
    """Measure ``audio`` (channels first, float) at ``sample_rate``."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    flat = audio.reshape(-1).astype(np.float64)
    mean_square = float(np.dot(flat, flat) / flat.size) if flat.size else 0.0
    return Levels(peak_dbfs=to_db(peak), rms_dbfs=to_db(math.sqrt(mean_square)),
                  true_peak_dbtp=to_db(true_peak(audio, sample_rate)),
                  loudness_lufs=integrated_lufs(audio, sample_rate), samples=audio.shape[-1],
                  sample_rate=sample_rate)


def integrated_lufs(audio: np.ndarray, sample_rate: int) -> float:
    """BS.1770-4 integrated loudness in LUFS; ``-inf`` when there is none (silence, < 0.4 s)."""
    if audio.shape[-1] < math.ceil(BLOCK_S * sample_rate):
        return -math.inf
    lufs = float(pyloudnorm.Meter(sample_rate).integrated_loudness(np.asarray(audio.T)))
    return lufs if math.isfinite(lufs) and lufs > SILENCE_LUFS else -math.inf


def _oversampled_magnitude(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """|x| of ``audio`` oversampled 4x, the largest across channels: shape (4 n,)."""
    up = soxr.resample(np.ascontiguousarray(audio.T), sample_rate,
                       sample_rate * TRUE_PEAK_OVERSAMPLING, quality="HQ")
    # Per column, then elementwise: a reduction along a short axis is slow in numpy.
    magnitude = np.abs(up[:, 0])
    for channel in range(1, up.shape[1]):
        np.maximum(magnitude, np.abs(up[:, channel]), out=magnitude)
    return np.asarray(magnitude)


def true_peak_envelope(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """Per original sample, the largest oversampled magnitude across channels at or after it
    (up to the next sample). The limiter works from this: a gain held over sample ``n`` covers
    the inter-sample peaks that follow it."""
    frames = audio.shape[-1]
    envelope = np.abs(audio[0]).astype(np.float32)
    for channel in range(1, audio.shape[0]):
        np.maximum(envelope, np.abs(audio[channel]), out=envelope)
    if frames < 2:
        return np.asarray(envelope)
    magnitude = _oversampled_magnitude(audio, sample_rate)
    for phase in range(TRUE_PEAK_OVERSAMPLING):
        column = magnitude[phase::TRUE_PEAK_OVERSAMPLING][:frames]
        np.maximum(envelope[:column.size], column, out=envelope[:column.size])
    return np.asarray(envelope)


def true_peak(audio: np.ndarray, sample_rate: int) -> float:
    """The true peak as an amplitude (BS.1770-4 Annex 2), never below the sample peak."""
    if audio.size == 0:
        return 0.0
    peak = float(np.max(np.abs(audio)))
    if audio.shape[-1] < 2:
        return peak
    return max(peak, float(np.max(_oversampled_magnitude(audio, sample_rate))))
