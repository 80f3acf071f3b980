"""Length arithmetic of a loaded model: frames for a duration, the bucket an item is generated
for, its windows past the model's window, the ``max_new_tokens`` HF needs, and the batch key."""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable

import numpy as np

from pipeline.contract.continuation import MIN_ROOM_S
from pipeline.contract.long_form import WINDOW_STRIDE_S as DEFAULT_WINDOW_STRIDE_S
from pipeline.errors import InvalidRequest
from workers.runtime.batch import GenerationItem, batch_key, bucket_frames, padding_waste
from workers.runtime.loaded import LoadedModel
from workers.runtime.windows import Window, long_frames, plan_windows


def frames_for(duration_s: float, loaded: LoadedModel) -> int:
    """Audio frames (codec steps) needed to cover ``duration_s`` seconds."""
    return max(1, math.ceil(round(duration_s * loaded.sampling_rate) / loaded.samples_per_frame))


def max_new_tokens_for(frames: int, num_codebooks: int) -> int:
    """``max_new_tokens`` that makes HF's MusicGen return ``frames`` codec frames (or more).

    HF's generate builds the codebook delay pattern over ``1 + max_new_tokens`` positions and
    strips the ``num_codebooks`` padding positions per codebook, leaving
    ``max_new_tokens + 1 - num_codebooks`` frames (a stereo model delays each channel's
    codebooks alike: pass ``LoadedModel.delay_codebooks``, its codebooks per channel). Below ``2*num_codebooks - 1`` positions it skips
    the pattern altogether, so short requests are lifted to that floor (and trimmed afterwards).
    """
    return max(frames + num_codebooks - 1, 2 * num_codebooks - 2)


def continuation_samples(item: GenerationItem, loaded: LoadedModel) -> int:
    """Samples of the item's continuation at the model's rate (what ``resample`` makes)."""
    if item.continuation is None:
        return 0
    samples, rate = item.continuation
    n = int(np.shape(samples)[-1])
    if int(rate) == loaded.sampling_rate:
        return n
    step = math.gcd(int(rate), loaded.sampling_rate)
    return math.ceil(loaded.sampling_rate // step * n / (int(rate) // step))


def prompt_frames(item: GenerationItem, loaded: LoadedModel) -> int:
    """Codec frames of the item's continuation prompt: its whole frames (a last part-frame
    of the clip, under 1/50 s, is left out: the new audio starts on a frame)."""
    return continuation_samples(item, loaded) // loaded.samples_per_frame


def total_frames(item: GenerationItem, loaded: LoadedModel) -> int:
    """Frames the item's windows must cover: its duration, plus the prompt's frames when the
    output leaves the continuation out."""
    frames = frames_for(item.duration_s, loaded)
    if item.continuation is None or item.continuation_included:
        return frames
    return prompt_frames(item, loaded) + frames


def check_continuation(item: GenerationItem, loaded: LoadedModel) -> None:
    """``InvalidRequest`` for a continuation this model cannot continue: shorter than one
    codec frame, leaving less than ``MIN_ROOM_S`` of the window, or (included) leaving no new
    audio within ``duration``."""
    if item.continuation is None:
        return
    prompt, window = prompt_frames(item, loaded), window_frames(loaded)
    if prompt < 1:
        raise InvalidRequest("the continuation is shorter than one codec frame "
                             f"({loaded.samples_per_frame} samples at {loaded.sampling_rate} Hz)",
                             "continuation")
    if prompt > window - round(MIN_ROOM_S * loaded.frame_rate):
        raise InvalidRequest(f"the continuation is {prompt / loaded.frame_rate:.2f} s; the "
                             f"model's {loaded.max_duration_s:g} s window leaves room for at most "
                             f"{loaded.max_duration_s - MIN_ROOM_S:g} s", "continuation")
    if total_frames(item, loaded) <= prompt:
        raise InvalidRequest(f"duration {item.duration_s:g} s is the whole output, continuation "
                             "included: it must be longer than the continuation", "duration")


def item_frames(item: GenerationItem, loaded: LoadedModel) -> int:
    """Frames generated for ``item`` (prompt included), alone or in any batch: its bucket."""
    frames, window = total_frames(item, loaded), window_frames(loaded)
    if frames <= window:
        return bucket_frames(frames, window)
    return long_frames(frames, window, _stride_frames(item.window_stride_s, loaded),
                       prompt_frames(item, loaded))


def bucket_for(duration_s: float, loaded: LoadedModel,
               stride_s: float = DEFAULT_WINDOW_STRIDE_S) -> int:
    """Frames generated for an item of ``duration_s`` seconds, alone or in any batch.

    Past the window it is the long clip's total for windows ``stride_s`` apart
    (``workers.runtime.longform.long_frames``), always more than any in-window bucket, so long
    and short items never share a call.
    """
    frames, window = frames_for(duration_s, loaded), window_frames(loaded)
    if frames <= window:
        return bucket_frames(frames, window)
    return long_frames(frames, window, _stride_frames(stride_s, loaded))


def _stride_frames(stride_s: float, loaded: LoadedModel) -> int:
    return max(1, round(stride_s * loaded.frame_rate))


def window_frames(loaded: LoadedModel) -> int:
    """The frames one ``model.generate`` call may produce: the checkpoint's window."""
    return frames_for(loaded.max_duration_s, loaded)


def windows_of(item: GenerationItem, loaded: LoadedModel) -> list[Window]:
    """The model calls ``item`` takes: one within the window, more past it; a continuation's
    first window is prompted with its codes."""
    return plan_windows(item_frames(item, loaded), window_frames(loaded),
                        _stride_frames(item.window_stride_s, loaded), prompt_frames(item, loaded))


def padding_waste_for(loaded: LoadedModel, items: list[GenerationItem]) -> float:
    """The fraction of frames ``generate`` would produce for ``items`` that no item needs."""
    return padding_waste([total_frames(item, loaded) for item in items],
                         [item_frames(item, loaded) for item in items])


def batch_key_for(loaded: LoadedModel, item: GenerationItem) -> Hashable:
    """The key under which ``item`` may share a ``generate`` call with others on ``loaded``."""
    frames = item_frames(item, loaded)
    return batch_key(item, lambda _duration: frames,
                     _prompt_tokens(loaded) if loaded.is_melody else None,
                     prompt_frames(item, loaded))


def _prompt_tokens(loaded: LoadedModel) -> Callable[[str], int]:
    tokenizer = loaded.processor.tokenizer

    def count(prompt: str) -> int:
        return len(tokenizer(prompt)["input_ids"])

    return count
