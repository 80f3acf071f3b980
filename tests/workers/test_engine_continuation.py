"""A continuation on the static engine (issue 25): its row replays the clip's codes through the
delay pattern before it generates, and comes out with the HF path's codes and audio.

The HF path (``workers.runtime.musicgen.generate``) feeds the clip's codes to transformers'
generate as ``decoder_input_ids``; its codes are read from its ``on_window`` hook (the clip so
far, prompt included), the engine's where it hands them to EnCodec (``recorded_codes``). The
clip is the tiny model's own audio, as in tests/workers/test_continuation.py; the window is cut
to 2 s so a clip of 0.5 s is a large part of it.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.errors import InvalidRequest
from workers.generation.offline import generate_on
from workers.runtime import GenerationItem, LoadedModel, generate
from workers.runtime.engine import StaticEngine
from workers.runtime.frames import item_frames, max_new_tokens_for, prompt_frames
from workers.runtime.loading import load_model
from workers.runtime.longform import WindowCodes, encode_audio
from workers.runtime.shapes import random_loaded
from workers.runtime.tiny import make_tiny

from .test_engine import assert_same_codes, engine_codes

RATE = 32_000
FRAME = 640


def continued(clip: np.ndarray, duration: float, *, included: bool = True, seed: int = 5,
              temperature: float = 1.0, guidance: float = 3.0) -> GenerationItem:
    return GenerationItem("a piano", duration, temperature=temperature, seed=seed,
                          guidance_scale=guidance, continuation=(clip, RATE),
                          continuation_included=included)


def hf_clip_codes(loaded: LoadedModel, item: GenerationItem) -> torch.Tensor:
    """``(codebooks, frames)`` the HF path generated for ``item`` alone, the clip's included."""
    seen: list[WindowCodes] = []
    generate(loaded, [item], on_window=seen.append)
    return seen[-1].clip[0]


def clip_codes(loaded: LoadedModel, clip: np.ndarray, frames: int) -> torch.Tensor:
    with torch.inference_mode():
        return encode_audio(loaded.model, torch.from_numpy(clip[None, :, :frames * FRAME]))[0]


@pytest.mark.parametrize("included", [True, False])
def test_greedy_continuation_codes_are_the_hf_paths_and_start_with_the_clip(
        short_window: LoadedModel, clip: np.ndarray, included: bool) -> None:
    item = continued(clip, 1.3 if included else 0.8, included=included, temperature=0.0)
    engine = StaticEngine(short_window, max_rows=2)
    [codes] = engine_codes(engine, [item])
    assert torch.equal(codes[:, :25], clip_codes(short_window, clip, 25))
    assert codes.shape[-1] > 25  # and it generated past the clip
    assert_same_codes(codes, hf_clip_codes(short_window, item))


def test_admission_runs_the_clip_through_the_decoder_at_once(
        short_window: LoadedModel, clip: np.ndarray) -> None:
    """The clip's 25 frames are prefilled: the row starts 25 steps in, the clip's frames that
    every codebook has (25 - 3 with the tiny model's 4 codebooks) already final."""
    engine = StaticEngine(short_window, max_rows=1)
    item = continued(clip, 1.0, temperature=0.0)
    row = engine.admit(item, 5)
    try:
        steps = max_new_tokens_for(item_frames(item, short_window), short_window.delay_codebooks)
        assert engine.progress(row) == 25 / steps
        assert engine.final_frames(row) == 25 - 3
        assert torch.equal(engine.codes_range(row, 0, 22), clip_codes(short_window, clip, 25)[:, :22])
    finally:
        engine.release(row)


def test_sampled_continuations_beside_plain_rows_have_the_hf_paths_codes(
        short_window: LoadedModel, clip: np.ndarray) -> None:
    """Rows with prompts of 25 and 10 frames and two without, all in the same steps: each row's
    random stream starts at its own first generated position, whatever its neighbours do."""
    items = [continued(clip, 1.2, seed=7),
             GenerationItem("jazz", 0.6, seed=1, temperature=0.8, top_k=50),
             continued(clip[:, :10 * FRAME], 1.0, seed=11, guidance=1.5, included=False),
             GenerationItem("rock", 1.0, seed=2, guidance_scale=1.0)]
    engine = StaticEngine(short_window, max_rows=len(items))
    got = engine_codes(engine, items)
    for item, codes in zip(items, got, strict=True):
        want = (hf_clip_codes(short_window, item) if item.continuation is not None
                else _hf_plain_codes(short_window, item))
        assert_same_codes(codes, want)


def _hf_plain_codes(loaded: LoadedModel, item: GenerationItem) -> torch.Tensor:
    from .test_engine import hf_path_codes  # the plain rows' reference, as test_engine reads it

    return hf_path_codes(loaded, item)


@pytest.mark.parametrize("included", [True, False])
def test_the_engines_audio_is_the_hf_paths_with_the_exact_length(
        short_window: LoadedModel, clip: np.ndarray, included: bool) -> None:
    item = continued(clip, 1.37, included=included)
    engine = StaticEngine(short_window, max_rows=2)
    [got] = generate_on(engine, [item])
    [want] = generate(short_window, [item])
    assert got.samples.shape == want.samples.shape == (1, round(1.37 * RATE))
    assert got.seed == want.seed == 5
    np.testing.assert_allclose(got.samples, want.samples, atol=1e-5)


def test_a_row_after_a_continuation_in_the_same_slot_is_unprompted(
        short_window: LoadedModel, clip: np.ndarray) -> None:
    """The clip's codes are the row's, not the slot's: the next job in that slot is plain."""
    engine = StaticEngine(short_window, max_rows=1)
    engine_codes(engine, [continued(clip, 1.0, temperature=0.0)])
    plain = GenerationItem("jazz", 0.5, temperature=0.0, seed=4)
    [codes] = engine_codes(engine, [plain])
    assert_same_codes(codes, _hf_plain_codes(short_window, plain))


def test_a_stereo_continuation_replays_each_channels_codes(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    stereo = load_model(str(make_tiny(tmp_path_factory.mktemp("m") / "tiny-stereo", stereo=True)),
                        device="cpu", dtype="float32", offline=True)
    stereo = dataclasses.replace(stereo, max_duration_s=2.0)
    [made] = generate(stereo, [GenerationItem("a drum", 0.5, seed=3)])
    item = continued(made.samples[:, :20 * FRAME], 1.0, temperature=0.0)
    assert prompt_frames(item, stereo) == 20
    [codes] = engine_codes(StaticEngine(stereo, max_rows=1), [item])
    want = hf_clip_codes(stereo, item)  # left, right, left, ... as the decoder reads them
    assert codes.shape[0] == want.shape[0] == 8
    # EnCodec decodes each channel alone: the engine's codes come as left's four, right's four.
    assert_same_codes(codes, torch.cat([want[0::2], want[1::2]]))


def test_a_continuation_the_model_cannot_continue_is_refused_at_admission(
        short_window: LoadedModel) -> None:
    engine = StaticEngine(short_window, max_rows=1)
    tiny_clip = np.full((1, 300), 0.1, dtype=np.float32)  # under one codec frame
    with pytest.raises(InvalidRequest) as refused:
        engine.admit(continued(tiny_clip, 1.0), 0)
    assert refused.value.field == "continuation"
    assert engine.free_rows() == 1  # nothing was taken


def test_a_continuation_on_musicgen_small_shapes_has_hf_generates_codes() -> None:
    """The prefill over small's widths (T5-base states through enc_to_dec_proj, 16 heads), two
    decoder layers: the same codes as the HF path, greedy."""
    torch.set_num_threads(1)
    small = random_loaded("small", layers=2, text_layers=1)
    t = np.arange(int(0.3 * RATE)) / RATE
    tone = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)[None]
    item = GenerationItem("calm piano", 0.5, temperature=0.0, continuation=(tone, RATE))
    assert prompt_frames(item, small) == 15
    [codes] = engine_codes(StaticEngine(small, max_rows=1), [item])
    assert_same_codes(codes, hf_clip_codes(small, item))
