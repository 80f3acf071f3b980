"""Stereo checkpoints (issue 11): the tiny stereo model (audio_channels = 2, eight interleaved
codebooks) generates two channels, in one call and window by window, and a render keeps them."""

from __future__ import annotations

import dataclasses
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pipeline.contract.jobs import OutputSpec
from workers.audio.postprocess import render
from workers.runtime.batch import GenerationItem
from workers.runtime.loaded import LoadedModel
from workers.runtime.loading import load_model
from workers.runtime.longform import WindowCodes, decode_codes
from workers.runtime.musicgen import generate
from workers.runtime.tiny import make_tiny

RATE = 32_000


@pytest.fixture(scope="module")
def tiny_stereo(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    path = make_tiny(tmp_path_factory.mktemp("models") / "tiny-stereo", stereo=True)
    return load_model(str(path), device="cpu", dtype="float32", offline=True)


def test_the_stereo_checkpoint_generates_two_different_channels(tiny_stereo: LoadedModel) -> None:
    assert (tiny_stereo.num_codebooks, tiny_stereo.audio_channels) == (8, 2)
    assert tiny_stereo.delay_codebooks == 4
    [clip] = generate(tiny_stereo, [GenerationItem("a piano", 0.77, seed=2)])
    assert clip.samples.shape == (2, round(0.77 * RATE))
    assert not np.array_equal(clip.samples[0], clip.samples[1])


def test_a_long_stereo_clip_continues_both_channels(tiny_stereo: LoadedModel) -> None:
    short_window = dataclasses.replace(tiny_stereo, max_duration_s=2.0)
    seen: list[WindowCodes] = []
    item = GenerationItem("strings", 4.4, seed=9, window_stride_s=1.2)
    [clip] = generate(short_window, [item], on_window=seen.append)
    assert clip.samples.shape == (2, round(4.4 * RATE)) and len(seen) == 3
    for before, after in pairwise(seen):
        offset = after.window.start - before.window.start
        assert after.prompt is not None and after.prompt.shape[1] == 8  # left, right interleaved
        assert torch.equal(after.prompt, before.codes[:, :, offset:offset + after.window.prompt])
        assert torch.equal(after.codes[:, :, :after.window.prompt], after.prompt)
    codes = torch.cat([w.codes[:, :, w.window.prompt:w.window.prompt + w.window.new] for w in seen],
                      dim=-1)
    with torch.inference_mode():
        once = decode_codes(short_window.model, codes)[0, :, :clip.samples.shape[-1]].numpy()
    np.testing.assert_array_equal(clip.samples, once)


def test_a_render_keeps_both_channels_unless_mono_is_asked(tiny_stereo: LoadedModel,
                                                           tmp_path: Path) -> None:
    [clip] = generate(tiny_stereo, [GenerationItem("drums", 0.5, seed=4)])
    both = render(clip.samples, RATE, OutputSpec(format="wav", channels=2), tmp_path / "s.wav",
                  temp_dir=tmp_path)
    mono = render(clip.samples, RATE, OutputSpec(format="wav", channels=1), tmp_path / "m.wav",
                  temp_dir=tmp_path)
    left_right, _ = sf.read(both.path, always_2d=True)
    down, _ = sf.read(mono.path, always_2d=True)
    assert both.channels == 2 and left_right.shape[1] == 2
    assert not np.allclose(left_right[:, 0], left_right[:, 1])
    assert mono.channels == 1 and down.shape[1] == 1
