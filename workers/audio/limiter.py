"""A look-ahead true-peak limiter, in process: what a linear gain cannot do without clipping.

When the gain that reaches a loudness target would lift the true peak over the ceiling, the
render applies that gain and then this limiter, instead of handing the job to ffmpeg's
``alimiter`` in the encode run: in process, the limited samples are what the render measures
and reports (and what it iterates on to land the target), so the numbers in ``RenderResult``
are those of the audio written, with no decode of the finished file.

Gain reduction is computed in dB per sample and is vectorised (no per-sample Python loop):
1. the reduction each sample needs: how far its 4x-oversampled peak is over the ceiling;
2. attack and hold: a centred running maximum over +-``ATTACK_S``, so the gain is already down
   when a peak arrives (offline, the look-ahead costs no latency);
3. release at a constant ``RELEASE_DB_PER_S``: ``r[n] = max_k (a[k] - (n - k) rho)`` is a
   running maximum of ``a[k] + k rho`` minus ``n rho``;
4. a moving average over ``ATTACK_S`` smooths the corners; since every sample within half that
   window of a peak already holds the peak's full reduction, the average never limits less.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import maximum_filter1d, uniform_filter1d

from workers.audio.loudness import true_peak_envelope

ATTACK_S = 0.002
RELEASE_DB_PER_S = 120.0  # 6 dB of reduction recovers in 50 ms
MARGIN_DB = 0.1  # aim a hair under the ceiling: the interpolated peak moves with the gain curve


def gain_reduction_db(audio: np.ndarray, sample_rate: int, ceiling_dbtp: float) -> np.ndarray:
    """Per sample, the reduction (dB, >= 0) that keeps the true peak under ``ceiling_dbtp``."""
    envelope = true_peak_envelope(audio, sample_rate).astype(np.float64)
    with np.errstate(divide="ignore"):
        over = 20.0 * np.log10(envelope) - (ceiling_dbtp - MARGIN_DB)
    needed = np.maximum(over, 0.0)
    if not needed.any():
        return needed
    attack = max(1, round(ATTACK_S * sample_rate))
    held = maximum_filter1d(needed, size=2 * attack + 1, mode="nearest")
    ramp = np.arange(held.size, dtype=np.float64) * (RELEASE_DB_PER_S / sample_rate)
    released = np.maximum.accumulate(held + ramp) - ramp
    return np.asarray(uniform_filter1d(released, size=attack + 1, mode="nearest"))


def limit(audio: np.ndarray, sample_rate: int, ceiling_dbtp: float) -> tuple[np.ndarray, float]:
    """``audio`` with its true peak held under ``ceiling_dbtp``; and the largest reduction (dB)."""
    reduction = gain_reduction_db(audio, sample_rate, ceiling_dbtp)
    most = float(reduction.max()) if reduction.size else 0.0
    if most <= 0.0:
        return audio, 0.0
    gain = np.power(10.0, -reduction / 20.0).astype(np.float32)
    return np.ascontiguousarray(audio * gain[np.newaxis, :]), most
