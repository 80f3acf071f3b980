"""Continuation of a caller's clip (issue 25) on the tiny model: the clip's EnCodec codes are the
decoder's prompt, the output's length is exact with and without the clip, and continuations
with different prompt lengths batch by prompt length.

The clip is itself audio the tiny model generated, so EnCodec sees the kind of signal it codes.
Most tests shrink the window to 2 s (100 frames), as tests/workers/test_longform.py does.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pipeline.errors import InvalidRequest, UnsupportedOption
from workers.generation.offline import generate_on
from workers.runtime.batch import GenerationItem, validate_items
from workers.runtime.engine import EngineUnsupported, StaticEngine
from workers.runtime.frames import batch_key_for, check_continuation, prompt_frames, windows_of
from workers.runtime.loaded import LoadedModel
from workers.runtime.loading import load_model
from workers.runtime.longform import WindowCodes, encode_audio
from workers.runtime.musicgen import generate
from workers.runtime.tiny import make_tiny
from workers.runtime.windows import Window

RATE = 32_000
FRAME = 640  # samples per codec frame at 50 Hz




def _item(clip: np.ndarray, duration: float, *, included: bool = True, seed: int = 5,
          rate: int = RATE, stride: float = 1.2) -> GenerationItem:
    return GenerationItem("a piano", duration, temperature=1.0, seed=seed,
                          continuation=(clip, rate), continuation_included=included,
                          window_stride_s=stride)


def _encoded(loaded: LoadedModel, clip: np.ndarray, frames: int) -> torch.Tensor:
    with torch.inference_mode():
        return encode_audio(loaded.model, torch.from_numpy(clip[None, :, :frames * FRAME]))


@pytest.mark.parametrize("included", [True, False])
def test_the_first_frames_are_the_clips_codes_and_the_length_is_exact(
        short_window: LoadedModel, clip: np.ndarray, included: bool) -> None:
    item = _item(clip, 1.37, included=included)
    assert prompt_frames(item, short_window) == 25  # the part-frame is left out
    seen: list[WindowCodes] = []
    [out] = generate(short_window, [item], on_window=seen.append)
    assert out.samples.shape == (1, round(1.37 * RATE))
    [window] = seen
    expected = _encoded(short_window, clip, 25)
    # The decoder was prompted with the clip's codes and hands them back ahead of the new ones;
    # the clip so far starts with them too.
    assert window.window.prompt == 25 and torch.equal(window.prompt, expected)
    assert torch.equal(window.codes[:, :, :25], expected)
    assert torch.equal(window.clip[:, :, :25], expected)
    assert window.codes.shape[-1] > 25  # and something new was generated after them
    if not included:
        # Without the clip the new audio is 1.37 s on its own: the window covered 25 + 69 frames.
        assert window.window.prompt + window.window.new >= 25 + 69
    assert np.isfinite(out.samples).all() and out.samples.std() > 0


def test_an_included_clip_leads_the_output_and_a_left_out_one_does_not(
        short_window: LoadedModel, clip: np.ndarray) -> None:
    [with_clip] = generate(short_window, [_item(clip, 1.5)])
    [without] = generate(short_window, [_item(clip, 1.5 - 25 * FRAME / RATE, included=False)])
    # The same seed and prompt: the same new frames, once after the decoded clip, once alone.
    start = 25 * FRAME
    assert without.samples.shape[-1] == with_clip.samples.shape[-1] - start
    # The decoder's output near the seam depends on its context, so compare well past it.
    np.testing.assert_allclose(without.samples[:, 2 * FRAME:], with_clip.samples[:, start + 2 * FRAME:],
                               atol=1e-4)


def test_a_clip_at_another_rate_and_in_stereo_is_made_the_models(
        short_window: LoadedModel, clip: np.ndarray) -> None:
    stereo_48k = np.repeat(np.interp(np.arange(0, clip.shape[-1], 32 / 48),
                                     np.arange(clip.shape[-1]), clip[0])[None], 2, axis=0)
    item = _item(stereo_48k.astype(np.float32), 1.0, rate=48_000)
    assert prompt_frames(item, short_window) == 25
    [out] = generate(short_window, [item])
    assert out.samples.shape == (1, RATE)


def test_continuations_with_different_prompt_lengths_batch_by_prompt_length(
        short_window: LoadedModel, clip: np.ndarray) -> None:
    short, longer = _item(clip[:, :10 * FRAME], 1.0), _item(clip, 1.0, seed=6)
    same = _item(clip[:, :10 * FRAME], 1.0, seed=9)
    assert batch_key_for(short_window, short) == batch_key_for(short_window, same)
    assert batch_key_for(short_window, short) != batch_key_for(short_window, longer)
    plain = GenerationItem("a piano", 1.0, seed=5, window_stride_s=1.2)
    assert batch_key_for(short_window, plain) != batch_key_for(short_window, short)
    seen: list[WindowCodes] = []
    outs = generate(short_window, [short, longer, same, plain], on_window=seen.append)
    assert [o.samples.shape for o in outs] == [(1, RATE)] * 4
    assert [o.batch_size for o in outs] == [2, 1, 2, 1]
    prompts = sorted(w.window.prompt for w in seen)
    assert prompts == [10, 25]
    batched = next(w for w in seen if w.window.prompt == 10)
    assert torch.equal(batched.codes[:, :, :10], _encoded(short_window, clip, 10).repeat(2, 1, 1))
    # Each row is what it is alone: batching changes no continuation.
    [alone] = generate(short_window, [longer])
    np.testing.assert_allclose(outs[1].samples, alone.samples, atol=1e-5)


def test_a_continuation_past_the_window_runs_window_by_window(
        short_window: LoadedModel, clip: np.ndarray) -> None:
    item = _item(clip, 4.3)
    windows = windows_of(item, short_window)
    assert windows[0] == Window(0, 0, 25, 75) and len(windows) > 1
    seen: list[WindowCodes] = []
    [out] = generate(short_window, [item], on_window=seen.append)
    assert out.samples.shape == (1, round(4.3 * RATE))
    assert torch.equal(seen[-1].clip[:, :, :25], _encoded(short_window, clip, 25))
    assert [w.window.index for w in seen] == list(range(len(windows)))


@pytest.mark.parametrize(("samples", "duration", "included", "field"), [
    (300, 1.0, True, "continuation"),  # under one codec frame
    (int(1.5 * RATE), 1.9, True, "continuation"),  # leaves under 1 s of the 2 s window
    (25 * FRAME, 0.5, True, "duration"),  # included: no new audio within the duration
])
def test_a_continuation_the_model_cannot_continue_names_its_field(
        short_window: LoadedModel, samples: int, duration: float, included: bool,
        field: str) -> None:
    wave = np.full((1, samples), 0.1, dtype=np.float32)
    with pytest.raises(InvalidRequest) as caught:
        check_continuation(_item(wave, duration, included=included), short_window)
    assert caught.value.field == field


def test_a_continuation_with_a_melody_or_a_bad_shape_is_refused(
        tiny_melody_model: LoadedModel) -> None:
    wave = np.zeros((1, RATE), dtype=np.float32)
    both = dataclasses.replace(_item(wave, 2.0), melody=(wave, RATE))
    with pytest.raises(UnsupportedOption) as refused:
        validate_items([both], max_duration_s=30, sampling_rate=RATE, melody_supported=True)
    assert refused.value.field == "continuation"
    with pytest.raises(InvalidRequest) as bad:
        validate_items([_item(np.zeros((RATE, 2), dtype=np.float32), 2.0)], max_duration_s=30,
                       sampling_rate=RATE, melody_supported=False)
    assert bad.value.field == "continuation"


def test_a_melody_model_continues_a_clip_without_a_melody(
        tiny_melody_model: LoadedModel, clip: np.ndarray) -> None:
    seen: list[WindowCodes] = []
    [out] = generate(tiny_melody_model, [_item(clip, 1.2)], on_window=seen.append)
    assert out.samples.shape == (1, round(1.2 * RATE))
    assert torch.equal(seen[0].codes[:, :, :25], _encoded(tiny_melody_model, clip, 25))


def test_the_static_engine_runs_a_continuation_and_hands_one_past_its_window_to_hf(
        short_window: LoadedModel, clip: np.ndarray) -> None:
    engine = StaticEngine(short_window, max_rows=2)
    within, past = _item(clip, 1.0), _item(clip, 4.3)
    assert engine.supports(within) and not engine.supports(past)
    with pytest.raises(EngineUnsupported) as refused:
        engine.admit(past, 0)
    assert "past the window" in refused.value.message
    got = generate_on(engine, [within, past, GenerationItem("jazz", 0.3, seed=6)])
    [want] = generate(short_window, [past])
    np.testing.assert_array_equal(got[1].samples, want.samples)  # the HF path's, unchanged
    assert [g.samples.shape for g in got] == [(1, RATE), (1, round(4.3 * RATE)), (1, round(0.3 * RATE))]


@pytest.fixture(scope="module")
def tiny_stereo(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = make_tiny(tmp_path_factory.mktemp("models") / "tiny-stereo", stereo=True)
    return load_model(str(path), device="cpu", dtype="float32", offline=True)


def test_a_stereo_model_is_prompted_with_each_channels_codes_interleaved(
        tiny_stereo: LoadedModel) -> None:
    [made] = generate(tiny_stereo, [GenerationItem("a drum", 0.5, seed=3)])
    stereo_clip = made.samples[:, :20 * FRAME]
    assert not np.array_equal(stereo_clip[0], stereo_clip[1])
    seen: list[WindowCodes] = []
    [out] = generate(tiny_stereo, [_item(stereo_clip, 1.0)], on_window=seen.append)
    assert out.samples.shape == (2, RATE)
    encoder = tiny_stereo.model.audio_encoder
    with torch.inference_mode():
        left, right = (encoder.encode(torch.from_numpy(stereo_clip[None, c:c + 1])).audio_codes[0]
                       for c in (0, 1))
    prompt = seen[0].codes[:, :, :20]
    assert prompt.shape[1] == 8  # left, right, left, ... as the stereo decoder reads them
    assert torch.equal(prompt[:, ::2], left) and torch.equal(prompt[:, 1::2], right)
