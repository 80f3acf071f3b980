"""HF generate: a batch of requests through transformers' ``model.generate``, group by group.

Only ``model.generate`` needs the accelerator; validation, grouping, length arithmetic
(``frames``) and trimming (``clips``) all run (and are tested) on the CPU with the tiny model
from ``workers.runtime.tiny``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable
from typing import Any

import numpy as np
import torch

from pipeline.errors import PipelineError
from workers.runtime.batch import GeneratedAudio, GenerationItem, seed_of, validate_items
from workers.runtime.clips import trimmed_clip
from workers.runtime.conditioning import GENERATE_LOCK, continuation_audio, model_inputs
from workers.runtime.errors import raise_runtime
from workers.runtime.frames import (
    batch_key_for,
    check_continuation,
    max_new_tokens_for,
    padding_waste_for,
    windows_of,
)
from workers.runtime.loaded import LoadedModel
from workers.runtime.longform import WindowHook, generate_long
from workers.runtime.progress import ProgressCallback, ProgressReporter, StepCounter
from workers.runtime.sampling import JobSampler, sampling_of

log = logging.getLogger(__name__)


def generate(loaded: LoadedModel, items: list[GenerationItem],
             progress: ProgressCallback | None = None,
             on_window: WindowHook | None = None) -> list[GeneratedAudio]:
    """Generate audio for every item of a batch; results come back in the items' order.

    Items that share a duration bucket, a guidance scale and melody or not (and, on a melody
    model, a prompt length in tokens) run in one padded
    ``model.generate`` call (``batch_key_for``); the groups run one after another. Each item is
    generated for its bucket's frame count, samples from its own generator seeded with its seed
    (reported back, drawn at random when the item has none: ``seed_of``) and is trimmed to its
    own length, so a seed reproduces the clip bit for bit on the same model and hardware,
    whatever the item's batch neighbours (see the README for how exact that is across batch
    shapes).

    Items past the model's window run window by window (``workers.runtime.longform``, in
    lockstep with the items of their group); ``on_window`` hears of each finished window.
    """
    validate_items(items, max_duration_s=loaded.max_duration_s, sampling_rate=loaded.sampling_rate,
                   melody_supported=loaded.is_melody)
    for item in items:
        check_continuation(item, loaded)
    seeds = [seed_of(item) for item in items]
    by_key: dict[Hashable, list[int]] = {}  # batch_groups, with each item's own stride
    for index, item in enumerate(items):
        by_key.setdefault(batch_key_for(loaded, item), []).append(index)
    groups = list(by_key.values())
    windows = {tuple(g): windows_of(items[g[0]], loaded) for g in groups}
    steps = {key: sum(max_new_tokens_for(w.new, loaded.delay_codebooks) for w in plan)
             for key, plan in windows.items()}
    reporter = ProgressReporter(progress, sum(steps.values()))
    results: list[GeneratedAudio | None] = [None] * len(items)
    for group in groups:
        started = time.perf_counter()
        plan = windows[tuple(group)]
        members = [items[i] for i in group]
        # A continuation's codes prompt the first window (the batch key gives every row of the
        # group as many frames); they run the windowed path, which feeds a prompt already.
        prompt = plan[0].prompt
        if len(plan) == 1 and not prompt:
            audio = _generate_group(loaded, members, [seeds[i] for i in group],
                                    steps[tuple(group)], reporter)
        else:
            given = (continuation_audio(loaded, members, prompt * loaded.samples_per_frame)
                     if prompt else None)
            audio = generate_long(loaded, members, [seeds[i] for i in group],
                                  reporter, plan, on_window=on_window, given=given)
        elapsed = time.perf_counter() - started
        waste = padding_waste_for(loaded, members)
        for row, index in enumerate(group):
            # Without the clip in the output, the new audio starts where the prompt ends.
            skip = 0 if items[index].continuation_included else prompt * loaded.samples_per_frame
            results[index] = trimmed_clip(loaded, audio[row][:, skip:], items[index].duration_s,
                                          seed=seeds[index], generate_seconds=elapsed,
                                          batch_size=len(group), padding_waste=waste)
        log.debug("generated %d item(s) in %.2fs, %d steps, %.0f%% padding waste", len(group),
                  elapsed, steps[tuple(group)], 100 * waste)
    reporter.finish(f"generated {len(items)} item(s)")
    return [r for r in results if r is not None]


def _generate_group(loaded: LoadedModel, items: list[GenerationItem], seeds: list[int],
                    max_new_tokens: int, reporter: ProgressReporter) -> np.ndarray:
    """One ``model.generate`` call for items sharing a batch key: (batch, channels, n)."""
    guidance_scale = items[0].guidance_scale
    sampler = JobSampler([sampling_of(item, seed) for item, seed in zip(items, seeds, strict=True)],
                         guidance_scale=guidance_scale, device=loaded.device)
    # do_sample=False: the sampler has already chosen each token, greedy decoding only reads it
    # back, and HF adds none of its own temperature/top-k/top-p warpers after it.
    kwargs: dict[str, Any] = {
        **model_inputs(loaded, items), "do_sample": False, "guidance_scale": guidance_scale,
        "max_new_tokens": max_new_tokens, "logits_processor": [StepCounter(reporter), sampler],
    }
    with GENERATE_LOCK:
        try:
            with torch.inference_mode():
                out = loaded.model.generate(**kwargs)
        except PipelineError:
            raise
        except RuntimeError as e:
            raise_runtime(e, "generation")
    audio: np.ndarray = out.to(torch.float32).cpu().numpy()
    return audio
