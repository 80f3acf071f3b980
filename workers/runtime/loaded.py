"""A MusicGen checkpoint in memory, with the audio facts the runtime reads from its config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    MusicgenForConditionalGeneration,
    MusicgenMelodyForConditionalGeneration,
    PreTrainedModel,
)

# What MusicGen was trained on (a 1500-token window at 50 Hz): a checkpoint's default window.
from pipeline.contract.long_form import MODEL_WINDOW_S as DEFAULT_MAX_DURATION_S


@dataclass
class LoadedModel:
    """A MusicGen checkpoint ready to generate, with the audio facts the runtime needs."""

    model: MusicgenForConditionalGeneration | MusicgenMelodyForConditionalGeneration
    processor: Any  # MusicgenProcessor, or MelodyProcessor for melody checkpoints
    source: str
    device: str
    dtype: torch.dtype
    sampling_rate: int
    frame_rate: float
    samples_per_frame: int
    num_codebooks: int
    is_melody: bool
    max_duration_s: float
    load_seconds: float
    audio_channels: int = 1  # 2 for musicgen-stereo-*: codebooks interleaved left, right

    @property
    def delay_codebooks(self) -> int:
        """Codebooks per channel: the delay pattern's depth (stereo delays left and right alike)."""
        return self.num_codebooks // self.audio_channels


def loaded_model(model: MusicgenForConditionalGeneration | MusicgenMelodyForConditionalGeneration,
                 processor: Any, *, source: str, device: str, dtype: torch.dtype) -> LoadedModel:
    """A ``LoadedModel`` for a MusicGen already in memory (on ``device``, in ``dtype``).

    The audio facts are read from the model's own config, so a checkpoint from disk
    (``load_model``) and a model built in code (``workers.runtime.shapes``) get them alike.
    """
    config: Any = model.config  # typed loosely by transformers (its sub-configs may be dicts)
    audio = config.audio_encoder
    sampling_rate = int(audio.sampling_rate)
    hop = int(getattr(audio, "hop_length", 0) or round(sampling_rate / audio.frame_rate))
    frame_rate = sampling_rate / hop
    return LoadedModel(
        model=model, processor=processor, source=source, device=device, dtype=dtype,
        sampling_rate=sampling_rate, frame_rate=frame_rate, samples_per_frame=hop,
        num_codebooks=int(config.decoder.num_codebooks),
        is_melody=config.model_type == "musicgen_melody",
        max_duration_s=_max_duration(model, frame_rate), load_seconds=0.0,
        audio_channels=int(getattr(config.decoder, "audio_channels", 1) or 1),
    )


def _max_duration(model: PreTrainedModel, frame_rate: float) -> float:
    # The generation window the checkpoint ships (1500 tokens for facebook/musicgen-*), capped by
    # the decoder's position table. A checkpoint without one gets transformers' default of 20
    # tokens, which is no window at all: fall back to MusicGen's 30 s.
    window = int(getattr(model.generation_config, "max_length", 0) or 0)
    positions = int(getattr(model.config.decoder, "max_position_embeddings", window) or window)
    seconds = min(window, positions) / frame_rate
    return seconds if 1.0 <= seconds <= 300.0 else DEFAULT_MAX_DURATION_S
