"""Music longer than the model's window: windowed continuation in token space.

A port of audiocraft's ``MusicGen._generate_tokens`` with ``extend_stride``. The first window
generates up to the model's window; each next one starts ``stride`` frames later, is prompted
with the codes of the previous window past that point (``window - stride`` frames) and keeps
only the frames it adds. The prompt goes in un-delayed as ``decoder_input_ids`` (transformers
applies the delay pattern itself), and the codes are taken from the decoder, not from
re-encoded audio: transformers' top-level ``generate`` decodes to audio and drops the codes, so
``_capture_codes`` stands in for the EnCodec decode during each window's call (which also saves
decoding audio nobody hears). The codes of every window are concatenated and decoded once, so
there is no seam from re-encoding.

Items of one call run their windows in lockstep: they share the total frame count (bucketed,
then trimmed) and the stride, so window ``i`` of every item runs in the same ``model.generate``
call (the batch key says so, ``long_key``). One ``JobSampler`` serves every window of a call, so
each item's random stream simply goes on from window to window: a seed reproduces the whole clip.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError
from workers.runtime.batch import GenerationItem
from workers.runtime.conditioning import GENERATE_LOCK, model_inputs
from workers.runtime.errors import raise_runtime
from workers.runtime.frames import max_new_tokens_for
from workers.runtime.loaded import LoadedModel
from workers.runtime.progress import ProgressReporter, StepCounter
from workers.runtime.sampling import JobSampler, sampling_of
from workers.runtime.windows import Window


@dataclass(frozen=True)
class WindowCodes:
    """What one window produced (for tests and partial results): ``codes`` is the decoder's
    output ``(batch, codebooks, prompt + generated)``, prompt included as it went in; ``clip``
    the clip's codes so far, every window's new frames ``(batch, codebooks, frames)``."""

    window: Window
    count: int
    prompt: torch.Tensor | None
    codes: torch.Tensor
    clip: torch.Tensor


WindowHook = Callable[[WindowCodes], None]


def melody_segment(samples: np.ndarray, rate: int, start_s: float, length_s: float) -> np.ndarray:
    """The melody under a window starting ``start_s`` into the clip, ``length_s`` long, wrapping
    round to the melody's start when it is shorter than the clip (audiocraft's positions
    ``arange(start, start + length) % len``). ``samples`` is ``(n,)`` or ``(channels, n)``."""
    n = samples.shape[-1]
    first = int(start_s * rate)
    positions = np.arange(first, first + max(1, int(length_s * rate))) % n
    return np.ascontiguousarray(samples[..., positions])


@contextmanager
def _capture_codes(model: Any) -> Iterator[list[torch.Tensor]]:
    """Record the codes ``model.generate`` hands EnCodec instead of decoding them.

    Stereo models decode left and right codebooks in two calls; the caller interleaves them.
    An instance attribute shadows the method and ``del`` restores it; the generate lock held by
    the caller keeps any other call from seeing the stand-in.
    """
    captured: list[torch.Tensor] = []
    encoder = model.audio_encoder

    def decode(audio_codes: torch.Tensor, *_args: Any, **_kwargs: Any) -> SimpleNamespace:
        captured.append(audio_codes[0])
        return SimpleNamespace(audio_values=torch.zeros(audio_codes.shape[1], 1, 1))

    encoder.decode = decode
    try:
        yield captured
    finally:
        del encoder.decode


def _joined(captured: list[torch.Tensor]) -> torch.Tensor:
    if len(captured) == 1:
        return captured[0]
    left, right = captured  # stereo: codebooks interleaved left, right, left, ...
    batch, half, frames = left.shape
    return torch.stack([left, right], dim=2).reshape(batch, 2 * half, frames)


def decode_codes(model: Any, codes: torch.Tensor) -> torch.Tensor:
    """EnCodec's audio for ``codes`` ``(batch, codebooks, frames)``: ``(batch, channels, n)``."""
    scales = [None] * codes.shape[0]
    encoder = model.audio_encoder
    # The class's own decode, never an instance attribute: a job's task thread decodes its
    # partial while the engine's call may have _capture_codes standing in on the same model.
    decode = type(encoder).decode
    if int(model.decoder.config.audio_channels) == 1:
        audio: torch.Tensor = decode(encoder, codes[None], audio_scales=scales).audio_values
        return audio
    left = decode(encoder, codes[None, :, ::2], audio_scales=scales).audio_values
    right = decode(encoder, codes[None, :, 1::2], audio_scales=scales).audio_values
    return torch.cat([left, right], dim=1)


def encode_audio(model: Any, audio: torch.Tensor) -> torch.Tensor:
    """EnCodec's codes for ``audio`` ``(batch, channels, n)``: ``(batch, codebooks, frames)``,
    a stereo model's codebooks interleaved left, right as its decoder takes them (what
    transformers' own audio-prompt path does)."""
    encoder = model.audio_encoder

    def codes_of(wave: torch.Tensor) -> torch.Tensor:
        codes: torch.Tensor = encoder.encode(wave, return_dict=True).audio_codes
        return codes[0]  # (chunks=1, batch, codebooks, frames)

    if int(model.decoder.config.audio_channels) == 1:
        return codes_of(audio)
    return _joined([codes_of(audio[:, :1]), codes_of(audio[:, 1:])])


def generate_long(loaded: LoadedModel, items: list[GenerationItem], seeds: list[int],
                  reporter: ProgressReporter, windows: list[Window], *,
                  on_window: WindowHook | None = None,
                  given: torch.Tensor | None = None) -> np.ndarray:
    """Generate ``items`` window by window, in lockstep; the decoded ``(batch, channels, n)``.

    ``given`` is the audio the clip starts with ``(batch, channels, windows[0].prompt *
    samples_per_frame)`` at the model's rate (a continuation's): its EnCodec codes are the first
    window's prompt and the first frames of what is decoded. The caller holds no lock.
    """
    guidance_scale = items[0].guidance_scale
    sampler = JobSampler([sampling_of(item, seed) for item, seed in zip(items, seeds, strict=True)],
                         guidance_scale=guidance_scale, device=loaded.device)
    counter = StepCounter(reporter)
    parts: list[torch.Tensor] = []
    prompt: torch.Tensor | None = None
    window_s = loaded.max_duration_s
    with GENERATE_LOCK:
        if given is not None:
            try:
                with torch.inference_mode():
                    prompt = encode_audio(loaded.model, given.to(loaded.device, loaded.dtype))
            except RuntimeError as e:
                raise_runtime(e, "encoding the continuation")
            parts.append(prompt)
        for window in windows:
            reporter.stage = f"window {window.index + 1} of {len(windows)}"
            start_s = window.start / loaded.frame_rate
            inputs = model_inputs(loaded, _windowed(items, start_s, window_s))
            kwargs: dict[str, Any] = {
                **inputs, "do_sample": False, "guidance_scale": guidance_scale,
                "max_new_tokens": max_new_tokens_for(window.new, loaded.delay_codebooks),
                "logits_processor": [counter, sampler]}
            if prompt is not None:
                batch, codebooks, frames = prompt.shape
                kwargs["decoder_input_ids"] = prompt.reshape(batch * codebooks, frames)
            try:
                with torch.inference_mode(), _capture_codes(loaded.model) as captured:
                    loaded.model.generate(**kwargs)
            except PipelineError:
                raise
            except RuntimeError as e:
                raise_runtime(e, f"window {window.index + 1} of {len(windows)}")
            codes = _joined(captured)
            parts.append(codes[:, :, window.prompt:window.prompt + window.new])
            if on_window is not None:
                on_window(WindowCodes(window, len(windows), prompt, codes, torch.cat(parts, -1)))
            if window.index + 1 < len(windows):
                following = windows[window.index + 1]
                # The next prompt: what this window holds from the next one's start onwards.
                offset = following.start - window.start
                prompt = codes[:, :, offset:offset + following.prompt]
        try:
            with torch.inference_mode():
                audio = decode_codes(loaded.model, torch.cat(parts, dim=-1))
        except RuntimeError as e:
            raise_runtime(e, "decoding the windows")
    return np.asarray(audio.to(torch.float32).cpu().numpy())


def _windowed(items: list[GenerationItem], start_s: float, length_s: float) -> list[GenerationItem]:
    # Melody conditioning follows the window (wrapping round a short melody), as audiocraft does.
    return [item if item.melody is None else replace(
        item, melody=(melody_segment(np.asarray(item.melody[0]), int(item.melody[1]), start_s,
                                     length_s), item.melody[1]))
            for item in items]

