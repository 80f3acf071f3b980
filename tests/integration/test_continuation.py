"""Continuation end to end (issue 25): a caller process enqueues a clip to continue, a real
worker fetches it by reference, decodes it with ffmpeg (stereo at 44.1 kHz to the tiny model's
mono 32 kHz), prompts the tiny model with its codes and renders a file of exactly the length
asked, with and without the clip. (A clip the worker cannot fetch: tests/pipeline/
test_continuation_requests.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from .conftest import Worker, run_caller

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def clip(tmp_path: Path) -> Path:
    t = np.arange(int(44100 * 1.2)) / 44100
    wave = 0.3 * np.sin(2 * np.pi * 220 * t)
    path = tmp_path / "clip.wav"
    sf.write(path, np.stack([wave, 0.5 * wave], axis=1), 44100)
    return path


@pytest.mark.parametrize(("included", "end", "duration"), [(True, None, 2.0), (False, 0.6, 1.5)])
def test_a_clip_is_continued_to_exactly_the_length_asked(
        shared_worker: Worker, workdir: Path, redis_url: str, clip: Path, included: bool,
        end: float | None, duration: float) -> None:
    request = {"duration": duration, "format": "wav", "normalization": "none", "seed": 4,
               "continuation": str(clip), "continuation_included": included}
    if end is not None:
        request["continuation_end"] = end
    out = run_caller(workdir, redis_url, request)
    assert "error" not in out, out
    path = Path(out["result"]["output_path"])
    assert sf.info(path).frames == round(duration * 32000)
    samples, _ = sf.read(path)
    assert np.isfinite(samples).all() and samples.std() > 0

