"""A call's conditioning inputs (prompts, melody, a continuation's audio) on the model's device, and the lock that keeps
one model call at a time per process."""

from __future__ import annotations

import threading

import numpy as np
import torch

from workers.runtime.batch import GenerationItem
from workers.runtime.loaded import LoadedModel
from workers.runtime.melody import resample

# Sampling no longer touches torch's process-global generator (each item draws from its own, see
# workers.runtime.sampling), so this lock is not about reproducibility. It keeps one generate call
# at a time per process: two interleaved calls would each hold their KV caches in GPU memory and
# contend for the same kernels, where one wider batch does the same work in one pass.
GENERATE_LOCK = threading.Lock()


def model_inputs(loaded: LoadedModel, items: list[GenerationItem]) -> dict[str, torch.Tensor]:
    """The processor's inputs for ``items``' prompts (and melodies), padded, on the device."""
    prompts = [item.prompt for item in items]
    if any(item.melody is not None for item in items):
        rate = loaded.processor.sampling_rate
        waves = [_mono_at(item.melody, rate) for item in items if item.melody is not None]
        inputs = loaded.processor(text=prompts, audio=waves, sampling_rate=rate, padding=True)
    else:
        inputs = loaded.processor(text=prompts, padding=True, return_tensors="pt")
    moved: dict[str, torch.Tensor] = {}
    for name, value in dict(inputs).items():
        value = value.to(loaded.device)
        moved[name] = value.to(loaded.dtype) if value.is_floating_point() else value
    return moved


def _mono_at(melody: tuple[np.ndarray, int], rate: int) -> np.ndarray:
    samples, source_rate = melody
    wave = np.asarray(samples, dtype=np.float32)
    if wave.ndim == 2:
        wave = wave.mean(axis=0)
    return resample(torch.from_numpy(np.ascontiguousarray(wave)), source_rate, rate).numpy()


def continuation_audio(loaded: LoadedModel, items: list[GenerationItem],
                       samples: int) -> torch.Tensor:
    """The items' continuations at the model's rate and channel count, each cut to its first
    ``samples`` (whole codec frames; the batch key gives every row as many):
    ``(batch, channels, samples)``."""
    rows = []
    for item in items:
        if item.continuation is None:
            raise ValueError("every item of a continuation call needs a continuation")
        wave, rate = item.continuation
        wave = np.asarray(wave, dtype=np.float32)
        wave = wave[None] if wave.ndim == 1 else wave
        # Channels as ffmpeg's -ac would make them: mono is the mean, mono to stereo a copy.
        if wave.shape[0] != loaded.audio_channels:
            wave = np.repeat(wave.mean(axis=0, keepdims=True), loaded.audio_channels, axis=0)
        at_rate = resample(torch.from_numpy(np.ascontiguousarray(wave)), int(rate),
                           loaded.sampling_rate)
        rows.append(at_rate[:, :samples])
    return torch.stack(rows)
