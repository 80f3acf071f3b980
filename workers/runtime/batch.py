"""What the runtime takes and gives back: one item per requested clip, and how items are batched.

What shares a ``model.generate`` call (the batch key), and why nothing else splits a batch:

- the duration bucket: every item is generated for its bucket's frame count, alone or batched,
  and trimmed to its own length; a call generates one length for all its rows, so short items
  batched with long ones would pay for the long ones, and an item's last frames would depend on
  how far its neighbours run (MusicGen's delay pattern feeds padding to the higher codebooks of
  a row's final frames, so a longer run changes them);
- the guidance scale: transformers takes one CFG scale per call, and CFG on or off changes the
  batch itself (the unconditional half is only built when it is on);
- melody or text-only: the melody processor conditions every row of a call or none;
- a continuation's prompt length in codec frames: the prompt codes of every row go in as one
  ``decoder_input_ids`` tensor, so the rows of a call are prompted with as many frames;
- on MusicGen-Melody only, the prompt's length in tokens: that model prepends the text states to
  the decoder's input and attends to a shorter prompt's padding (transformers zeroes the padded
  states but passes no mask for them), so padding would change a job's audio. Text-only MusicGen
  reads the prompt by cross-attention with a mask, where padding changes nothing.

Prompt, seed, temperature, top-k and top-p differ freely inside a call: prompts are padded with an
attention mask and ``workers.runtime.sampling.JobSampler`` gives every item its own parameters
and its own random stream.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.contract.jobs import draw_seed
from pipeline.contract.long_form import WINDOW_STRIDE_S as DEFAULT_WINDOW_STRIDE_S
from pipeline.errors import InvalidRequest, UnsupportedOption

MAX_TOTAL_DURATION_S = 300.0  # the longest clip any deployment may configure


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
    # A clip to continue, ``(samples, sample_rate)`` like ``melody`` (the span already cut):
    # encoded with EnCodec and fed as the first window's prompt. ``continuation_included``:
    # the output is the clip then the new audio and ``duration_s`` is the whole; otherwise
    # ``duration_s`` seconds of new audio only (pipeline/contract/continuation.py).
    continuation: tuple[np.ndarray, int] | None = None
    continuation_included: bool = True
    # Past the model's window: how far each next window starts after the last one (audiocraft's
    # extend_stride); the window minus the stride is the next window's prompt.
    window_stride_s: float = DEFAULT_WINDOW_STRIDE_S


@dataclass(frozen=True)
class GeneratedAudio:
    """One generated clip: float32 ``samples`` shaped ``(channels, n)``.

    ``seed`` is the seed actually used (reproduces the clip); ``generate_seconds`` is the wall
    time of the ``model.generate`` call that produced it, shared by the items batched with it.
    ``batch_size`` is how many items that call generated; ``padding_waste`` is the fraction of
    the call's generated frames that no item needed (see ``padding_waste``).
    """

    samples: np.ndarray
    sample_rate: int
    duration_s: float
    seed: int
    generate_seconds: float
    batch_size: int = 1
    padding_waste: float = 0.0


def seed_of(item: GenerationItem) -> int:
    """The seed ``item`` runs under: its own, or one drawn as the producer draws a job's
    (``pipeline.contract.jobs.draw_seed``, the whole request range), whichever path generates it."""
    return int(item.seed) if item.seed is not None else draw_seed()


def validate_items(items: list[GenerationItem], *, max_duration_s: float, sampling_rate: int,
                   melody_supported: bool) -> None:
    """Reject what the model cannot do before any GPU time is spent.

    Raises ``InvalidRequest`` for values no model accepts (a window stride outside the window
    for a clip past it), ``UnsupportedOption`` for what this model does not support (melody on
    a text-only checkpoint, a clip past ``MAX_TOTAL_DURATION_S``).
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
        if item.duration_s > MAX_TOTAL_DURATION_S:
            raise UnsupportedOption(
                f"duration {item.duration_s:g}s is past the {MAX_TOTAL_DURATION_S:g}s that "
                "windowed continuation supports", field="duration")
        if item.duration_s > max_duration_s and not 0 < item.window_stride_s < max_duration_s:
            raise InvalidRequest(
                f"window stride {item.window_stride_s:g}s must be in (0, {max_duration_s:g}) s, "
                "the model's window", field="window_stride")
        for field, value, low, high in (("temperature", item.temperature, 0.0, None),
                                        ("top_k", item.top_k, 0, None),
                                        ("top_p", item.top_p, 0.0, 1.0),
                                        ("guidance_scale", item.guidance_scale, 0.0, None)):
            if not value >= low or (high is not None and value > high):
                raise InvalidRequest(f"{field} out of range: {value}", field=field)
        # torch.Generator.manual_seed takes any 64-bit value; bound it here so a bad seed is the caller's
        # error, not a (retryable) runtime failure inside generation.
        if item.seed is not None and not (isinstance(item.seed, (int, np.integer)) and 0 <= item.seed < 2**63):
            raise InvalidRequest(f"seed must be an integer in [0, 2**63), got {item.seed!r}",
                                 field="seed")
        if item.melody is not None:
            if not melody_supported:
                raise UnsupportedOption("melody conditioning needs a MusicGen-Melody model; "
                                        "this model is text-only", field="melody")
            _check_audio(item.melody, "melody")
        if item.continuation is not None:
            if item.melody is not None:
                raise UnsupportedOption("a continuation cannot be combined with a melody",
                                        field="continuation")
            _check_audio(item.continuation, "continuation")


def _check_audio(audio: tuple[np.ndarray, int], field: str) -> None:
    samples, rate = audio
    shape = np.shape(samples)
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise InvalidRequest(f"{field} sample rate must be a positive integer, got {rate!r}",
                             field=field)
    # (channels, n) with a handful of channels; (n, channels) from soundfile would be read as
    # thousands of channels, so it is refused rather than silently garbled.
    if len(shape) not in (1, 2) or shape[-1] == 0 or (len(shape) == 2 and shape[0] > 8):
        raise InvalidRequest(f"{field} must be (n,) or (channels, n) samples, got shape {shape}",
                             field=field)


# Bucket edges: four per octave of frames, never finer than MIN_BUCKET_FRAMES. Padding an item to
# its bucket costs at most ~25% of its frames (about 12% on average), and lengths near each other
# still meet in one bucket. Changing these changes the audio of a seed: keep them fixed.
MIN_BUCKET_FRAMES = 8
BUCKETS_PER_OCTAVE = 4


def bucket_frames(frames: int, max_frames: int) -> int:
    """The frame count an item needing ``frames`` is generated for, capped at the model's window.

    ``frames`` is rounded up to a multiple of a quarter of the largest power of two at or below
    it (at least ``MIN_BUCKET_FRAMES``): 25 -> 32, 100 -> 112, 500 -> 512, 1490 -> 1500 (capped).
    """
    if frames < 1:
        raise ValueError(f"frames must be positive, got {frames}")
    step = max(MIN_BUCKET_FRAMES, (1 << (frames.bit_length() - 1)) // BUCKETS_PER_OCTAVE)
    return max(frames, min(-(-frames // step) * step, max_frames))


def padding_waste(needed: Sequence[int], generated: Sequence[int]) -> float:
    """Generated frames beyond each row's need, as a fraction of all generated frames.

    ``needed[i]`` and ``generated[i]`` are one item's frames; 0.0 for nothing generated.
    """
    total = sum(generated)
    if len(needed) != len(generated) or any(
            g < n for n, g in zip(needed, generated, strict=True)):
        raise ValueError("every item needs as many generated frames as it uses, or more")
    return (total - sum(needed)) / total if total else 0.0


def batch_groups(items: list[GenerationItem], bucket: Callable[[float], int],
                 prompt_tokens: Callable[[str], int] | None = None) -> list[list[int]]:
    """Indices of ``items`` that can share one ``model.generate`` call, in first-seen order.

    ``bucket`` maps a duration to its bucket's frame count. Items share a call when they share
    that bucket, the guidance scale, melody or not and, when ``prompt_tokens`` is given (for
    MusicGen-Melody), the prompt's token count (the module docstring says why); seed,
    temperature, top-k and top-p never split a batch.
    """
    groups: dict[Hashable, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(batch_key(item, bucket, prompt_tokens), []).append(index)
    return list(groups.values())


def batch_key(item: GenerationItem, bucket: Callable[[float], int],
              prompt_tokens: Callable[[str], int] | None = None,
              prompt_frames: int = 0) -> Hashable:
    """What an item must share with others to run in their ``model.generate`` call.

    ``prompt_frames`` is the length in codec frames of a continuation's prompt (0 without one):
    every row of a call is prompted with as many frames (``decoder_input_ids`` is one tensor).
    """
    length = prompt_tokens(item.prompt) if prompt_tokens is not None else None
    # The stride changes where a long clip's windows start: only equal strides run in lockstep.
    key: tuple[Hashable, ...] = (bucket(item.duration_s), _guidance_key(item.guidance_scale),
                                 item.melody is not None, length, item.window_stride_s)
    # Appended only when set, so the keys of every other item stay what they were.
    return (*key, prompt_frames) if prompt_frames else key


def _guidance_key(scale: float) -> float:
    # transformers turns guidance off for any scale <= 1, so those scales run the same call.
    return scale if scale > 1 else 1.0
