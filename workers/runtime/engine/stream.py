"""EnCodec decodes of a streaming row's frames, a chunk at a time (issue 25).

EnCodec's decoder is not causal: its convolutions read a few frames to the right, and its LSTM
carries state from every frame to the left. A chunk decoded alone therefore differs from the
same frames in the one-call decode at both ends (by ~4e-2 on the tiny model). Decoded with
``LEFT_CONTEXT_FRAMES`` before it and ``LOOKAHEAD_FRAMES`` after it, the frames in between match
the one-call decode to float rounding (measured on the tiny model: 25 left and 5 right frames
already give 9e-8; these leave a margin for the real models' wider LSTM). The lookahead is why a
chunk is published ``LOOKAHEAD_FRAMES`` (160 ms) after its last frame became final.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from workers.runtime.loaded import LoadedModel

LEFT_CONTEXT_FRAMES = 50
LOOKAHEAD_FRAMES = 8
# Rows of one length per EnCodec call (as the engine's DECODE_ROWS for finished rows).
DECODE_ROWS = 16


def decode_codes(loaded: LoadedModel, codes: torch.Tensor, *,
                 class_decode: bool = True) -> np.ndarray:
    """EnCodec-decode ``(rows, codebooks, frames)`` codes: ``(rows, channels, samples)`` float32.
    On a stereo model the codebooks interleave left and right; each channel decodes alone.

    ``class_decode``: call the class's own decode, never the instance's attribute, where an
    HF-path call on the same model may have its code capture standing in while this runs in
    another thread (``workers.runtime.longform.decode_codes`` says the same): the stream
    publisher's thread. The engine's finished rows keep the instance's (its tests record the
    codes it decodes there)."""
    decoder: Any = loaded.model.audio_encoder
    if class_decode:
        cls_decode = type(decoder).decode

        def decode(*args: Any, **kwargs: Any) -> Any:
            return cls_decode(decoder, *args, **kwargs)
    else:
        decode = decoder.decode
    codes = codes.to(loaded.device)
    with torch.inference_mode():
        if loaded.audio_channels == 1:
            audio = decode(codes[None], audio_scales=[None]).audio_values
        else:
            audio = torch.cat([decode(codes[None, :, c::2], audio_scales=[None])
                               .audio_values for c in (0, 1)], dim=1)
        samples: np.ndarray = audio.to(torch.float32).cpu().numpy()
    return samples


_SIDE_STREAMS: dict[torch.device, Any] = {}


@contextmanager
def _off_the_loops_stream(device: torch.device, inputs: list[torch.Tensor]) -> Iterator[None]:
    """On CUDA, run the chunk decodes on a side stream of their own: on the default stream
    (the engine loop's) every later step would queue behind them, and their ``.cpu()`` copy
    would wait for the loop's queued steps. The side stream first waits for what the default
    stream has queued (the codes' copies among it). Nothing to do on a CPU.
    (Not run on a GPU yet: the machine of this change had none.)"""
    if device.type != "cuda":
        yield
        return
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS.setdefault(device, torch.cuda.Stream(device))  # type: ignore[no-untyped-call]
    side.wait_stream(torch.cuda.default_stream(device))
    with torch.cuda.stream(side):
        for tensor in inputs:  # made on the default stream: not reused before the decode ends
            tensor.record_stream(side)
        yield


def decode_chunks(loaded: LoadedModel, chunks: list[torch.Tensor]) -> list[np.ndarray]:
    """Each ``(codebooks, frames)`` chunk decoded, ``(channels, samples)``; the chunks of one
    length (every chunk but a row's first has the same context and length) share a call."""
    device = torch.device(loaded.device)
    chunks = [codes.to(device) for codes in chunks]
    with _off_the_loops_stream(device, chunks):
        return _decode_chunks(loaded, chunks)


def _decode_chunks(loaded: LoadedModel, chunks: list[torch.Tensor]) -> list[np.ndarray]:
    by_length: dict[int, list[int]] = {}
    for i, codes in enumerate(chunks):
        by_length.setdefault(codes.shape[-1], []).append(i)
    out: list[np.ndarray | None] = [None] * len(chunks)
    for members in by_length.values():
        for start in range(0, len(members), DECODE_ROWS):
            group = members[start:start + DECODE_ROWS]
            audio = decode_codes(loaded, torch.stack([chunks[i] for i in group]))
            for i, samples in zip(group, audio, strict=True):
                out[i] = samples
    return [samples for samples in out if samples is not None]
