"""Long-form generation (issue 11): windowed continuation in token space, on the tiny model.

Most tests shrink the model's window to 2 s (the same code path, a twentieth of the steps) so
that several windows run in well under a second; the melody test runs 75 s through the real
30 s window.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.errors import InvalidRequest
from workers.runtime.batch import GenerationItem
from workers.runtime.frames import batch_key_for, windows_of
from workers.runtime.loaded import LoadedModel
from workers.runtime.longform import WindowCodes, decode_codes, melody_segment
from workers.runtime.musicgen import generate
from workers.runtime.windows import Window, long_frames, plan_windows

RATE = 32_000



def _item(duration: float, seed: int = 7, prompt: str = "a piano", **kw: object) -> GenerationItem:
    return GenerationItem(prompt, duration, seed=seed, window_stride_s=1.2, **kw)  # type: ignore[arg-type]


def test_windows_follow_audiocraft_and_cover_the_clip() -> None:
    # 75 s at 50 Hz, a 30 s window, an 18 s stride: 30 s, then 18 s, 18 s and the last 9 s.
    windows = plan_windows(3750, 1500, 900)
    assert windows == [Window(0, 0, 0, 1500), Window(1, 900, 600, 900),
                       Window(2, 1800, 600, 900), Window(3, 2700, 600, 450)]
    assert sum(w.new for w in windows) == 3750
    assert plan_windows(1500, 1500, 900) == [Window(0, 0, 0, 1500)]
    with pytest.raises(ValueError):
        plan_windows(3000, 1500, 1500)


def test_rounding_a_long_clip_up_never_adds_a_window() -> None:
    # 2400 frames (48 s) need 30 + 18 s; rounded up to 2432 they would need a third window of
    # 32 frames behind a 600-frame prompt: the rounding stops at what the last window holds.
    assert long_frames(2400, 1500, 900) == 2400
    assert long_frames(3750, 1500, 900) == 3840  # 75 s: rounded to the next 128, same windows
    assert len(plan_windows(long_frames(2400, 1500, 900), 1500, 900)) == 2


def test_the_output_has_exactly_the_requested_samples(short_window: LoadedModel) -> None:
    [clip] = generate(short_window, [_item(5.37)])
    assert clip.samples.shape == (1, round(5.37 * RATE))
    assert np.isfinite(clip.samples).all() and clip.samples.std() > 0


def test_each_window_is_prompted_with_the_previous_windows_last_codes(
        short_window: LoadedModel) -> None:
    seen: list[WindowCodes] = []
    [clip] = generate(short_window, [_item(5.0)], on_window=seen.append)
    assert [w.window.index for w in seen] == [0, 1, 2, 3] and seen[0].prompt is None
    for before, after in pairwise(seen):
        assert after.prompt is not None and after.window.prompt == 40  # window 2 s - stride 1.2 s
        offset = after.window.start - before.window.start
        assert torch.equal(after.prompt, before.codes[:, :, offset:offset + after.window.prompt])
        # The decoder hands the prompt back untouched ahead of what it generated after it.
        assert torch.equal(after.codes[:, :, :after.window.prompt], after.prompt)
    # The clip is the windows' new codes decoded once (no re-encoded audio in between).
    codes = torch.cat([w.codes[:, :, w.window.prompt:w.window.prompt + w.window.new] for w in seen],
                      dim=-1)
    with torch.inference_mode():
        once = decode_codes(short_window.model, codes)[0, :, :clip.samples.shape[-1]].numpy()
    np.testing.assert_array_equal(clip.samples, once)


def test_a_seeded_long_job_is_reproducible_alone_or_with_a_neighbour(
        short_window: LoadedModel) -> None:
    alone: list[WindowCodes] = []
    [first] = generate(short_window, [_item(4.4, seed=11)], on_window=alone.append)
    [again] = generate(short_window, [_item(4.4, seed=11)])
    other_seed = generate(short_window, [_item(4.4, seed=12)])[0]
    # Same bucket and stride: window i of both jobs runs in the same call.
    item, neighbour = _item(4.4, seed=11), _item(4.3, seed=3, prompt="drums")
    assert batch_key_for(short_window, item) == batch_key_for(short_window, neighbour)
    together: list[WindowCodes] = []
    batched = generate(short_window, [neighbour, item], on_window=together.append)[1]
    np.testing.assert_array_equal(first.samples, again.samples)
    assert not np.array_equal(first.samples, other_seed.samples)
    # Batched, every window's tokens are the same; the decode's float sums in a wider batch
    # may round differently in the last bit (docs/engine.md, "What shares a batch").
    assert batched.batch_size == 2 and len(alone) == len(together) == 3
    for solo, pair in zip(alone, together, strict=True):
        assert torch.equal(solo.codes[0], pair.codes[1])
    np.testing.assert_allclose(first.samples, batched.samples, atol=1e-6)


def test_a_job_exactly_at_the_window_takes_the_one_call_path(short_window: LoadedModel) -> None:
    calls: list[int] = []
    real = short_window.model.generate

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    seen: list[WindowCodes] = []
    short_window.model.generate = counted  # type: ignore[method-assign]
    try:
        [clip] = generate(short_window, [_item(2.0)], on_window=seen.append)
        [longer] = generate(short_window, [_item(2.02)], on_window=seen.append)
    finally:
        del short_window.model.generate
    assert windows_of(_item(2.0), short_window) == [Window(0, 0, 0, 100)]
    assert clip.samples.shape[-1] == 2 * RATE and longer.samples.shape[-1] == round(2.02 * RATE)
    assert len(calls) == 3  # 2.0 s: one call; 2.02 s: two windows, two calls
    assert [w.window.index for w in seen] == [0, 1]  # only the long job reports windows


def test_progress_names_the_window_and_spans_the_whole_job(short_window: LoadedModel) -> None:
    reports: list[tuple[float, str]] = []
    generate(short_window, [_item(5.0)], lambda f, m: reports.append((f, m)))
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(m.startswith("window 1 of 4") for _, m in reports)
    last_window = [f for f, m in reports if m.startswith("window 4 of 4")]
    assert last_window and min(last_window) > 0.5  # the percentage is over all four windows


def test_a_stride_outside_the_window_is_refused(short_window: LoadedModel) -> None:
    with pytest.raises(InvalidRequest) as refused:
        generate(short_window, [GenerationItem("x", 3.0, seed=1, window_stride_s=2.0)])
    assert refused.value.field == "window_stride"


def test_the_melody_wraps_round_when_shorter_than_the_clip() -> None:
    melody = np.arange(10, dtype=np.float32)  # 10 samples at 10 Hz: one second
    assert melody_segment(melody, 10, 0.5, 1.0).tolist() == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    stereo = np.stack([melody, -melody])
    assert melody_segment(stereo, 10, 2.0, 0.3).tolist() == [[0, 1, 2], [0, -1, -2]]


def test_a_75_second_job_with_a_melody(tiny_melody_model: LoadedModel) -> None:
    t = np.arange(10 * RATE) / RATE  # a 10 s melody under a 75 s clip: it wraps
    melody = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    seen: list[WindowCodes] = []
    item = GenerationItem("hum", 75.0, seed=5, guidance_scale=1.0, melody=(melody, RATE))
    [clip] = generate(tiny_melody_model, [item], on_window=seen.append)
    assert clip.samples.shape == (1, 75 * RATE)
    assert [w.window.new for w in seen] == [1500, 900, 900, 540]  # 3750 frames bucketed to 3840
    assert np.isfinite(clip.samples).all()
