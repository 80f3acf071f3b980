"""The engine proves itself before it serves: a short greedy canary against HF generate.

The static engine is exact against transformers' generate in fp32 on the hardware its tests ran
on; a new GPU, driver or dtype is untested ground (house style 18). So before a worker serves a
model with it, ``self_check`` runs a few greedy rows (different lengths, guided and not, one
continuing a clip, admitted together) through the engine as built (compiled or eager) and each row alone through
the HF path (``workers.runtime.musicgen.generate``), on the same device and dtype.

What is compared is the audio: EnCodec is a deterministic function of the codes and both paths
decode one row at a time, so equal codes give the same audio to float rounding, while one
different token moves it by orders of magnitude more (``AUDIO_TOLERANCE``). In fp32 the audio
must match; in bf16 and fp16 the two paths may rightly choose different tokens, so there the
engine's audio must only be finite and of the right shape. Any exception is a failure too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from workers.generation.offline import generate_on
from workers.runtime.batch import GeneratedAudio, GenerationItem
from workers.runtime.engine.engine import StaticEngine
from workers.runtime.loaded import LoadedModel
from workers.runtime.musicgen import generate as hf_generate


def _canary_clip(seconds: float = 0.2, rate: int = 32_000) -> np.ndarray:
    """A fixed clip for the continuation row: a 220 Hz tone with its octave, ``(1, n)``."""
    t = np.arange(round(seconds * rate), dtype=np.float64) / rate
    tone = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.1 * np.sin(2 * np.pi * 440 * t)
    return tone.astype(np.float32)[None]


# Rows of different lengths (32 and 16 frames: a few dozen steps), one guided and one not, and a
# continuation of a 10-frame clip (its row replays the clip's codes through the delay pattern),
# fixed seeds (unused by greedy decoding, but nothing is drawn at random).
CANARY: tuple[GenerationItem, ...] = (
    GenerationItem("calm piano", 0.5, temperature=0.0, guidance_scale=3.0, seed=11),
    GenerationItem("drums", 0.3, temperature=0.0, guidance_scale=1.0, seed=12),
    GenerationItem("a tune", 0.6, temperature=0.0, guidance_scale=3.0, seed=13,
                   continuation=(_canary_clip(), 32_000)),
)
# Equal codes differ only by float rounding (~1e-6 on the tiny model); one different token moves
# the audio by ~1e-2 there (tests/workers/test_sampling.py ALONE_VS_BATCHED_MAX_DIFF).
AUDIO_TOLERANCE = 1e-4
# The dtype in which the engine's codes must be HF's, token for token.
EXACT_DTYPES = (torch.float32,)

HfGenerate = Callable[[LoadedModel, list[GenerationItem]], list[GeneratedAudio]]


@dataclass(frozen=True)
class SelfCheck:
    """The canary's verdict: ``passed``, else ``reason`` (one line); ``seconds`` it took."""

    passed: bool
    reason: str
    seconds: float


def self_check(engine: StaticEngine, hf: HfGenerate = hf_generate,
               items: tuple[GenerationItem, ...] = CANARY) -> SelfCheck:
    """Run the canary through ``engine`` and through ``hf``; never raises."""
    started = time.perf_counter()
    try:
        reason = _compare(engine, hf, items)
    except Exception as e:  # noqa: BLE001 - whatever the engine raises is the verdict
        reason = f"the engine raised {type(e).__name__}: {one_line(str(e))}"
    return SelfCheck(reason is None, reason or "", time.perf_counter() - started)


def _compare(engine: StaticEngine, hf: HfGenerate,
             items: tuple[GenerationItem, ...]) -> str | None:
    """Why the engine's canary audio is wrong, or None."""
    mine = generate_on(engine, list(items))
    exact = engine.loaded.dtype in EXACT_DTYPES
    for index, (item, got) in enumerate(zip(items, mine, strict=True)):
        want_samples = round(item.duration_s * engine.loaded.sampling_rate)
        if got.samples.shape[-1] != want_samples:
            return (f"row {index} has {got.samples.shape[-1]} samples, "
                    f"{want_samples} were asked for")
        if not np.isfinite(got.samples).all():
            return f"row {index} has non-finite audio"
        if not exact:
            continue
        # Alone: HF batches by guidance scale and pads prompts, the engine does neither.
        want = hf(engine.loaded, [item])[0]
        if got.samples.shape != want.samples.shape:
            return (f"row {index} has shape {got.samples.shape}, HF's "
                    f"{want.samples.shape}")
        diff = float(np.abs(got.samples - want.samples).max())
        if not diff <= AUDIO_TOLERANCE:
            return (f"row {index}'s codes differ from HF generate's in "
                    f"{str(engine.loaded.dtype).removeprefix('torch.')} (audio max diff "
                    f"{diff:.2g} > {AUDIO_TOLERANCE:g})")
    return None


def one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line, at most ``limit`` characters: a log line, not a dump."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit - 3] + "..."
