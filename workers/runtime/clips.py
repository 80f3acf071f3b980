"""A row of generated audio trimmed to its item's length: what every generation path hands back."""

from __future__ import annotations

import numpy as np

from pipeline.errors import ModelRuntimeError
from workers.runtime.batch import GeneratedAudio
from workers.runtime.loaded import LoadedModel


def trimmed_clip(loaded: LoadedModel, samples: np.ndarray, duration_s: float, *, seed: int,
                 generate_seconds: float, batch_size: int,
                 padding_waste: float) -> GeneratedAudio:
    """``samples`` ``(channels, n)``, generated for a bucket, cut to ``duration_s`` seconds.

    Raises ``ModelRuntimeError`` when the model returned fewer samples than the item needs.
    """
    target = round(duration_s * loaded.sampling_rate)
    if samples.shape[-1] < target:
        raise ModelRuntimeError(f"model returned {samples.shape[-1]} samples, {target} were needed",
                                details={"source": loaded.source})
    return GeneratedAudio(
        samples=np.ascontiguousarray(samples[:, :target]), sample_rate=loaded.sampling_rate,
        duration_s=target / loaded.sampling_rate, seed=seed, generate_seconds=generate_seconds,
        batch_size=batch_size, padding_waste=padding_waste)
