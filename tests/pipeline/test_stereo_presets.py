"""Stereo presets (issue 11): shipped for every stereo checkpoint, and a stereo preset's file
keeps two channels unless the request asks for mono."""

from __future__ import annotations

from pathlib import Path

from pipeline.client.resolve import resolve
from pipeline.config.loader import load_settings
from pipeline.config.presets import known_presets, model_settings_for
from pipeline.contract.jobs import GenerationRequest

STEREO = ("musicgen-stereo-small", "musicgen-stereo-medium", "musicgen-stereo-large",
          "musicgen-stereo-melody", "musicgen-stereo-melody-large", "tiny-stereo")


def test_every_stereo_checkpoint_has_a_preset(tmp_path: Path) -> None:
    settings = load_settings("development", cwd=tmp_path)
    assert set(STEREO) <= set(known_presets())
    for name in STEREO:
        model = model_settings_for(settings, name)
        assert model.stereo and model.max_duration == 30.0
        assert model.melody == ("melody" in name)
    assert not model_settings_for(settings, "musicgen-small").stereo


def test_a_stereo_preset_keeps_two_channels_unless_mono_is_asked(tmp_path: Path) -> None:
    settings = load_settings("development", cwd=tmp_path)
    assert settings.audio.channels == 1  # the deployment's default, for mono models

    def channels(model: str, asked: int | None) -> int:
        request = GenerationRequest(prompt="x", duration=1.0, model=model, channels=asked)
        return resolve(request, settings, job_id="j").output.channels

    assert channels("tiny-stereo", None) == 2
    assert channels("tiny-stereo", 1) == 1
    assert channels("tiny", None) == 1 and channels("tiny", 2) == 2  # mono upmixed when asked
