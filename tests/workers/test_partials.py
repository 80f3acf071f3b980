"""Partial results of long jobs (issue 11): after each window but the last, the job runner
publishes the audio so far as a playable file in the job's format, through the job's storage;
the final file is written as before and the partial is gone when the job ends."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import soundfile as sf

from pipeline.client.resolve import resolve
from pipeline.config.loader import load_settings
from pipeline.config.schema import Settings
from pipeline.contract.jobs import GenerationRequest
from workers.job_runner import JobRunner
from workers.runtime.longform import WindowCodes
from workers.runtime.musicgen import generate
from workers.runtime.tiny import make_tiny

WAIT = 60.0  # a bound on waits for states, not a measured duration


@pytest.fixture(scope="module")
def two_second_window(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny checkpoint whose window is 100 tokens (2 s): long-form after 2 s."""
    path = make_tiny(tmp_path_factory.mktemp("models") / "tiny-2s")
    config = json.loads((path / "generation_config.json").read_text(encoding="utf-8"))
    (path / "generation_config.json").write_text(json.dumps({**config, "max_length": 100}),
                                                 encoding="utf-8")
    return path


@pytest.fixture
def settings(tmp_path: Path, two_second_window: Path) -> Settings:
    return load_settings("development", cwd=tmp_path, overrides={
        "storage.output_dir": str(tmp_path / "outputs"), "storage.temp_dir": str(tmp_path / "tmp"),
        "model.preset": "tiny", "model.source": str(two_second_window), "model.max_duration": 2.0,
        "generation.window_stride": 1.2, "generation.max_batch_size": 1})


def test_a_long_job_publishes_each_window_and_keeps_only_the_final_file(
        settings: Settings, tmp_path: Path) -> None:
    published: list[dict[str, Any]] = []
    seen = {window: threading.Event() for window in (1, 2, 3)}

    def on_partial(info: dict[str, Any]) -> None:
        # Read at once: the next window replaces the file. Each must be a file that plays.
        audio, rate = sf.read(info["path"], always_2d=True)
        published.append({**info, "frames": audio.shape[0], "rate": rate})
        seen[info["window"]].set()

    def paced(loaded: Any, items: list[Any], progress: Any, engine_sink: Any) -> Any:
        # The loop never waits for a partial (a newer one replaces an unpublished one); the
        # test makes it wait for each, so that every window's partial is seen.
        assert engine_sink is not None

        def hook(window: WindowCodes) -> None:
            engine_sink(window)
            if window.window.index + 1 < window.count:
                assert seen[window.window.index + 1].wait(WAIT)

        return generate(loaded, items, progress, on_window=hook)

    spec = resolve(GenerationRequest(prompt="a long piece", duration=5.0, format="wav", seed=3),
                   settings, job_id="long-1")
    runner = JobRunner(settings)
    runner.batcher._generate = paced
    outcome = runner.run(spec, worker="w", progress=lambda f, m: None, started_at=time.time(),
                         on_partial=on_partial)
    # 256 frames in windows of 100, 60, 60 and 36 new frames: three partials, then the result.
    assert [(p["window"], p["windows"]) for p in published] == [(1, 4), (2, 4), (3, 4)]
    assert [p["seconds"] for p in published] == [2.0, 3.2, 4.4]
    assert [p["frames"] for p in published] == [64000, 102400, 140800]
    assert {p["path"] for p in published} == {str(tmp_path / "outputs" / "long-1.partial.wav")}
    assert all(p["uri"].startswith("file://") and p["format"] == "wav" for p in published)
    assert outcome.result.duration == 5.0
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["long-1.wav",
                                                                        "long-1.wav.json"]


def test_a_job_within_the_window_publishes_no_partial(settings: Settings) -> None:
    published: list[dict[str, Any]] = []
    spec = resolve(GenerationRequest(prompt="short", duration=1.5, format="wav", seed=3),
                   settings, job_id="short-1")
    JobRunner(settings).run(spec, worker="w", progress=lambda f, m: None, started_at=time.time(),
                            on_partial=published.append)
    assert published == []
