"""MusicGen's codebook delay pattern, one row at a time.

transformers' ``build_delay_pattern_mask`` lays a call of ``length = 1 + max_new_tokens``
positions out so that codebook ``c`` (delayed by ``d = delay[c]``: its index, or its index within
its channel on a stereo model, whose codebooks interleave left and right) holds a generated token
at positions ``d + 1 .. d + frames`` and the pad token everywhere else, where
``frames = length - codebooks_per_channel``. Position 0 is the pad (BOS) token for every codebook.
``apply_delay_pattern_mask`` overwrites the other positions with the pad token before they are fed
back, and frame ``j`` of codebook ``c`` is read at position ``j + 1 + d``. Keeping each row's
``frames`` lets rows of different lengths share a step: each follows its own pattern.
"""

from __future__ import annotations

import torch


def codebook_delays(num_codebooks: int, audio_channels: int,
                    device: str | torch.device) -> torch.Tensor:
    """Each codebook's delay, ``(num_codebooks,)``: stereo codebooks are left, right, left, ..."""
    return torch.arange(num_codebooks, device=device) // audio_channels


def frames_of(steps: int, delay_codebooks: int) -> int:
    """Codec frames a row of ``steps`` decoding steps produces (HF's arithmetic)."""
    frames = steps + 1 - delay_codebooks
    if steps + 1 < 2 * delay_codebooks - 1:
        # HF skips the pattern below this length; max_new_tokens_for never asks for it.
        raise ValueError(f"{steps} steps are too few for the delay pattern of "
                         f"{delay_codebooks} codebooks")
    return frames


def keep_generated(position: torch.Tensor, frames: torch.Tensor,
                   delays: torch.Tensor) -> torch.Tensor:
    """Which codebooks hold a generated token at each row's ``position``: ``(rows, codebooks)``.

    ``position`` and ``frames`` are ``(rows,)``; the others get the pad token.
    """
    offset = position[:, None] - delays[None, :]
    return (offset >= 1) & (offset <= frames[:, None])


def codes_of(sequence: torch.Tensor, frames: int, delays: torch.Tensor) -> torch.Tensor:
    """The ``(codebooks, frames)`` codes of one row's ``(codebooks, length)`` delayed sequence."""
    index = 1 + delays[:, None] + torch.arange(frames, device=sequence.device)[None, :]
    return sequence.gather(1, index)
