"""The static decode engine against transformers' generate: the same codes, token for token.

Codes are read where both paths hand them to EnCodec: ``audio_encoder.decode`` is wrapped by a
recorder that keeps its input and calls the real decode (the audio still comes from the model).
Models are real: the tiny checkpoint through ``load_model``, and a random model with
musicgen-small's layer shapes (``workers.runtime.shapes``) at two decoder layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.contract.jobs import MAX_SEED
from pipeline.errors import InvalidRequest
from workers.generation.offline import generate_on
from workers.runtime import GenerationItem, LoadedModel, generate
from workers.runtime.conditioning import model_inputs
from workers.runtime.engine import EngineUnsupported, StaticEngine
from workers.runtime.engine.delay import codebook_delays, frames_of, keep_generated
from workers.runtime.frames import bucket_for, max_new_tokens_for, padding_waste_for
from workers.runtime.loading import load_model
from workers.runtime.shapes import random_loaded
from workers.runtime.tiny import make_tiny

PROMPTS = ("calm piano", "loud rock drums with a much longer prompt than the others", "jazz")


@contextmanager
def recorded_codes(loaded: LoadedModel) -> Iterator[list[torch.Tensor]]:
    """Every ``(batch, codebooks, frames)`` code tensor EnCodec decodes while the block runs."""
    encoder: Any = loaded.model.audio_encoder
    seen: list[torch.Tensor] = []
    real = encoder.decode

    def decode(codes: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(codes[0].clone())
        return real(codes, *args, **kwargs)

    encoder.decode = decode
    try:
        yield seen
    finally:
        del encoder.decode


def channels_joined(parts: list[torch.Tensor], channels: int) -> list[torch.Tensor]:
    """Stereo models decode left then right: put each clip's two halves back together."""
    return [torch.cat(parts[i:i + channels], dim=-2) for i in range(0, len(parts), channels)]


def decoded_rows(parts: list[torch.Tensor], channels: int) -> list[torch.Tensor]:
    """Each ``(codebooks, frames)`` clip EnCodec decoded, in order: the engine decodes the rows
    of one length that finish in the same step in one call."""
    return [clip for part in channels_joined(parts, channels) for clip in part]


def hf_greedy_codes(loaded: LoadedModel, item: GenerationItem) -> torch.Tensor:
    """``(codebooks, frames)`` of transformers' own greedy generate for ``item`` alone."""
    steps = max_new_tokens_for(bucket_for(item.duration_s, loaded), loaded.delay_codebooks)
    with recorded_codes(loaded) as seen, torch.inference_mode():
        loaded.model.generate(**model_inputs(loaded, [item]), do_sample=False,
                              guidance_scale=item.guidance_scale, max_new_tokens=steps)
    return channels_joined(seen, loaded.audio_channels)[0][0]


def hf_path_codes(loaded: LoadedModel, item: GenerationItem) -> torch.Tensor:
    """``(codebooks, frames)`` of the batching worker's HF path (``musicgen.generate``)."""
    with recorded_codes(loaded) as seen:
        generate(loaded, [item])
    return channels_joined(seen, loaded.audio_channels)[0][0]


def engine_codes(engine: StaticEngine, items: list[GenerationItem]) -> list[torch.Tensor]:
    """Each item's codes from the engine, all admitted at once (``item.seed`` as the seed)."""
    rows = {engine.admit(item, item.seed or 0): index for index, item in enumerate(items)}
    codes: list[torch.Tensor | None] = [None] * len(items)
    channels = engine.loaded.audio_channels
    while rows:
        with recorded_codes(engine.loaded) as seen:
            finished = engine.step()
        for (row, _), part in zip(finished, decoded_rows(seen, channels), strict=True):
            codes[rows.pop(row)] = part
    return [c for c in codes if c is not None]


def assert_same_codes(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    assert torch.equal(got, want), f"{int((got != want).sum())} of {want.numel()} codes differ"


@pytest.fixture(scope="module")
def engine(tiny_model: LoadedModel) -> StaticEngine:
    return StaticEngine(tiny_model, max_rows=4)


@pytest.fixture(scope="module")
def small_shaped() -> LoadedModel:
    torch.set_num_threads(1)
    return random_loaded("small", layers=2, text_layers=1)


# --- greedy: token for token what transformers' generate produces ------------------------------

@pytest.mark.parametrize(("prompt", "duration", "guidance"), [
    (PROMPTS[0], 0.5, 3.0), (PROMPTS[1], 0.3, 1.0), (PROMPTS[2], 0.62, 1.7)])
def test_greedy_codes_equal_transformers_generate_on_the_tiny_model(
        engine: StaticEngine, tiny_model: LoadedModel, prompt: str, duration: float,
        guidance: float) -> None:
    item = GenerationItem(prompt, duration, temperature=0.0, guidance_scale=guidance)
    assert_same_codes(engine_codes(engine, [item])[0], hf_greedy_codes(tiny_model, item))


def test_greedy_codes_equal_transformers_generate_with_musicgen_small_shapes(
        small_shaped: LoadedModel) -> None:
    # T5-base's 768-wide states reach the 1024-wide decoder through enc_to_dec_proj here.
    engine = StaticEngine(small_shaped, max_rows=2)
    items = [GenerationItem(PROMPTS[0], 0.3, temperature=0.0),
             GenerationItem(PROMPTS[1], 0.2, temperature=0.0, guidance_scale=1.0)]
    got = engine_codes(engine, items)  # both rows in the same steps
    for item, codes in zip(items, got, strict=True):
        assert_same_codes(codes, hf_greedy_codes(small_shaped, item))


def test_stereo_codes_equal_transformers_generate(tmp_path: Path) -> None:
    stereo = load_model(str(make_tiny(tmp_path / "tiny-stereo", stereo=True)), device="cpu",
                        dtype="float32", offline=True)
    engine = StaticEngine(stereo, max_rows=2)
    item = GenerationItem(PROMPTS[0], 0.4, temperature=0.0)
    codes = engine_codes(engine, [item])[0]
    assert codes.shape[0] == 8  # left and right interleaved, each with its own delay pattern
    assert_same_codes(codes, hf_greedy_codes(stereo, item))


# --- sampling: the HF path's codes for the same seeds --------------------------------------------

SAMPLED = [
    GenerationItem(PROMPTS[0], 0.5, seed=7, temperature=0.9, top_k=100, top_p=0.95),
    GenerationItem(PROMPTS[1], 0.3, seed=1, temperature=0.7, top_k=50, guidance_scale=1.0),
    GenerationItem(PROMPTS[2], 0.6, seed=99, top_k=0, top_p=0.9, guidance_scale=2.0),
    GenerationItem("x", 0.52, seed=3, temperature=0.0),
    GenerationItem("ambient pads", 0.5, seed=7, top_k=250),
]


def test_sampled_codes_equal_the_hf_path_with_mixed_guidance_in_one_step(
        tiny_model: LoadedModel) -> None:
    engine = StaticEngine(tiny_model, max_rows=len(SAMPLED))
    got = engine_codes(engine, SAMPLED)  # five rows, three guidance scales, every step shared
    for item, codes in zip(SAMPLED, got, strict=True):
        assert_same_codes(codes, hf_path_codes(tiny_model, item))


def test_generate_keeps_the_hf_paths_contract(engine: StaticEngine,
                                               tiny_model: LoadedModel) -> None:
    reports: list[float] = []
    got = generate_on(engine, SAMPLED, progress=lambda fraction, _: reports.append(fraction))
    want = generate(tiny_model, SAMPLED)
    for mine, theirs, item in zip(got, want, SAMPLED, strict=True):
        assert mine.seed == theirs.seed == item.seed
        assert mine.samples.shape == theirs.samples.shape == (1, round(item.duration_s * 32000))
        assert mine.sample_rate == 32000 and mine.duration_s == theirs.duration_s
        # Same tokens: only float rounding of batch shapes separates the audio (see
        # test_sampling's ALONE_VS_BATCHED_MAX_DIFF: a different token moves it by ~1e-2).
        assert float(np.abs(mine.samples - theirs.samples).max()) <= 1e-6
        # Nothing pads a row to its neighbours' length: only its own bucket's frames are waste.
        assert mine.padding_waste == padding_waste_for(tiny_model, [item])
        assert 1 <= mine.batch_size <= engine.max_rows
    assert reports == sorted(reports) and reports[-1] == 1.0
    assert engine.active() == 0 and engine.free_rows() == engine.max_rows
    drawn = generate_on(engine, [GenerationItem("calm", 0.1)])[0]  # no seed: one is drawn, reported
    assert 0 <= drawn.seed <= MAX_SEED  # the producer's range (pipeline.contract.jobs.draw_seed)


# --- the delay pattern at its edges -----------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 2])
@pytest.mark.parametrize("length", [7, 8, 9, 20])
def test_the_delay_pattern_is_transformers_own(tiny_model: LoadedModel, tmp_path: Path,
                                               channels: int, length: int) -> None:
    decoder: Any = tiny_model.model.decoder
    codebooks = 4 * channels
    if channels == 2:
        decoder = load_model(str(make_tiny(tmp_path / "s", stereo=True)), device="cpu",
                             dtype="float32", offline=True).model.decoder
    start = torch.full((codebooks, 1), 2048)
    _, pattern = decoder.build_delay_pattern_mask(start, 2048, max_length=length)
    delays = codebook_delays(codebooks, channels, "cpu")
    frames = frames_of(length - 1, 4)
    keep = keep_generated(torch.arange(length), torch.full((length,), frames), delays)
    assert torch.equal(keep.T, pattern == -1)  # 7 = 2*4 - 1 is the shortest HF patterns at all
    assert int((pattern == -1).sum()) == codebooks * frames


def test_a_job_filling_the_whole_window_and_the_shortest_job_match_transformers(
        tiny_model: LoadedModel) -> None:
    short_window = replace(tiny_model, max_duration_s=1.2)  # 60 frames: a window we can afford
    engine = StaticEngine(short_window, max_rows=2)
    full = GenerationItem(PROMPTS[0], 1.2, temperature=0.0)
    shortest = GenerationItem(PROMPTS[2], 1 / 32000, temperature=0.0)
    assert engine.supports(full) and engine.supports(shortest)
    assert not engine.supports(GenerationItem(PROMPTS[0], 1.21))  # past the window: HF's
    got = engine_codes(engine, [full, shortest])
    assert got[0].shape == (4, 60)
    for item, codes in zip([full, shortest], got, strict=True):
        assert_same_codes(codes, hf_greedy_codes(short_window, item))
    audio = generate_on(engine, [shortest])[0]
    assert audio.samples.shape == (1, 1)


# --- what the engine refuses ------------------------------------------------------------------

def test_refused_and_invalid_items(engine: StaticEngine, tiny_melody_model: LoadedModel) -> None:
    with pytest.raises(InvalidRequest) as bad:
        engine.admit(GenerationItem("calm", 1.0, top_p=2.0), 0)
    assert bad.value.field == "top_p"
    too_long = GenerationItem("calm", 40.0, window_stride_s=18.0)
    assert not engine.supports(too_long)
    with pytest.raises(EngineUnsupported):
        engine.admit(too_long, 0)
    melody = StaticEngine(tiny_melody_model, max_rows=1)
    tone = (np.zeros(32000, dtype=np.float32), 32000)
    assert not melody.supports(GenerationItem("calm", 1.0))
    assert not melody.supports(GenerationItem("calm", 1.0, melody=tone))
    with pytest.raises(EngineUnsupported) as refused:
        melody.admit(GenerationItem("calm", 1.0), 0)
    assert refused.value.code == "unsupported_option"
    assert engine.active() == 0


def test_a_prompt_past_the_cross_attention_cache_runs_on_the_hf_path(
        tiny_model: LoadedModel) -> None:
    engine = StaticEngine(tiny_model, max_rows=2, max_prompt_tokens=8)
    long_prompt = GenerationItem(PROMPTS[1], 0.3, seed=5)
    assert not engine.supports(long_prompt)
    got = generate_on(engine, [long_prompt, GenerationItem("jazz", 0.3, seed=6)])
    want = generate(tiny_model, [long_prompt])[0]
    assert np.array_equal(got[0].samples, want.samples)
    assert got[1].seed == 6 and got[1].samples.shape == (1, 9600)
