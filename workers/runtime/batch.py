"""What the runtime takes and gives back: one item per requested clip, and how items are batched."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InvalidRequest, UnsupportedOption


@dataclass(frozen=True)
class GenerationItem:
    """One clip to generate. ``melody`` is ``(samples, sample_rate)``, samples mono ``(n,)`` or
    ``(channels, n)`` float; only MusicGen-Melody checkpoints accept it.

    ``temperature`` 0 means greedy decoding; ``top_k`` 0 and ``top_p`` 0 (or 1) mean "off";
    ``guidance_scale`` <= 1 turns classifier-free guidance off. ``seed`` None draws one.
    """

    prompt: str
    duration_s: float
    temperature: float = 1.0
    top_k: int = 250
    top_p: float = 0.0
    guidance_scale: float = 3.0
    seed: int | None = None
    melody: tuple[np.ndarray, int] | None = None


@dataclass(frozen=True)
class GeneratedAudio:
    """One generated clip: float32 ``samples`` shaped ``(channels, n)``.

    ``seed`` is the seed actually used (reproduces the clip); ``generate_seconds`` is the wall
    time of the ``model.generate`` call that produced it, shared by the items batched with it.
    """

    samples: np.ndarray
    sample_rate: int
    duration_s: float
    seed: int
    generate_seconds: float


def validate_items(items: list[GenerationItem], *, max_duration_s: float, sampling_rate: int,
                   melody_supported: bool) -> None:
    """Reject what the model cannot do before any GPU time is spent.

    Raises ``InvalidRequest`` for values no model accepts, ``UnsupportedOption`` for what this
    model does not support (a duration past its window, melody on a text-only checkpoint).
    """
    if not items:
        raise InvalidRequest("a generation batch needs at least one item", field="items")
    for item in items:
        if not isinstance(item.prompt, str):
            raise InvalidRequest("prompt must be a string", field="prompt")
        if not item.duration_s > 0:  # also catches NaN
            raise InvalidRequest(f"duration must be positive, got {item.duration_s}",
                                 field="duration")
        if round(item.duration_s * sampling_rate) < 1:
            raise InvalidRequest(f"duration {item.duration_s:g}s is shorter than one sample",
                                 field="duration")
        if item.duration_s > max_duration_s:
            raise UnsupportedOption(
                f"duration {item.duration_s:g}s is past this model's {max_duration_s:g}s window; "
                "windowed continuation for longer clips is not supported yet", field="duration")
        for field, value, low, high in (("temperature", item.temperature, 0.0, None),
                                        ("top_k", item.top_k, 0, None),
                                        ("top_p", item.top_p, 0.0, 1.0),
                                        ("guidance_scale", item.guidance_scale, 0.0, None)):
            if not value >= low or (high is not None and value > high):
                raise InvalidRequest(f"{field} out of range: {value}", field=field)
        # torch.manual_seed takes any 64-bit value; bound it here so a bad seed is the caller's
        # error, not a (retryable) runtime failure inside generation.
        if item.seed is not None and not (isinstance(item.seed, (int, np.integer)) and 0 <= item.seed < 2**63):
            raise InvalidRequest(f"seed must be an integer in [0, 2**63), got {item.seed!r}",
                                 field="seed")
        if item.melody is not None:
            _check_melody(item.melody, melody_supported)


def _check_melody(melody: tuple[np.ndarray, int], supported: bool) -> None:
    if not supported:
        raise UnsupportedOption("melody conditioning needs a MusicGen-Melody model; "
                                "this model is text-only", field="melody")
    samples, rate = melody
    shape = np.shape(samples)
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise InvalidRequest(f"melody sample rate must be a positive integer, got {rate!r}",
                             field="melody")
    # (channels, n) with a handful of channels; (n, channels) from soundfile would be read as
    # thousands of channels, so it is refused rather than silently garbled.
    if len(shape) not in (1, 2) or shape[-1] == 0 or (len(shape) == 2 and shape[0] > 8):
        raise InvalidRequest(f"melody must be (n,) or (channels, n) samples, got shape {shape}",
                             field="melody")


def batch_groups(items: list[GenerationItem], seeds: list[int],
                 frames: Callable[[float], int]) -> list[list[int]]:
    """Indices of ``items`` that can share one ``model.generate`` call, in first-seen order.

    Items share a call only when they have the same seed, frame count and sampling parameters,
    and either all or none carry a melody; ``frames`` maps a duration to codec frames.
    """
    groups: dict[Hashable, list[int]] = {}
    for index, (item, seed) in enumerate(zip(items, seeds, strict=True)):
        key = (seed, frames(item.duration_s), item.temperature, item.top_k, item.top_p,
               item.guidance_scale, item.melody is not None)
        groups.setdefault(key, []).append(index)
    return list(groups.values())
