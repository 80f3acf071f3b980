"""Long jobs at the producer (issue 11): resolve() accepts durations past the window, the
long_form flag refuses them per user, and time limits scale with the duration."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.client.resolve import resolve
from pipeline.config.loader import load_settings
from pipeline.config.schema import Settings, WorkerSettings
from pipeline.contract.flags import bucket
from pipeline.contract.jobs import GenerationRequest
from pipeline.contract.time_limits import job_time_limits
from pipeline.contract.user_context import UserContext
from pipeline.errors import InvalidRequest, UnsupportedOption


def _settings(tmp_path: Path, **overrides: object) -> Settings:
    return load_settings("development", cwd=tmp_path, overrides={"model.preset": "tiny", **overrides})


def test_a_job_past_the_window_is_accepted_up_to_generation_max_duration(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    assert settings.generation.max_duration == 120.0  # the default: four times the window
    spec = resolve(GenerationRequest(prompt="a long piece", duration=75.0), settings, job_id="j1")
    assert spec.duration == 75.0
    with pytest.raises(InvalidRequest) as refused:
        resolve(GenerationRequest(prompt="too long", duration=121.0), settings, job_id="j2")
    assert refused.value.field == "duration"


def test_the_seeds_300_seconds_are_accepted_when_configured(tmp_path: Path) -> None:
    settings = _settings(tmp_path, **{"generation.max_duration": 300.0})
    spec = resolve(GenerationRequest(prompt="very long", duration=300.0), settings, job_id="j1")
    assert spec.duration == 300.0


def test_the_long_form_flag_refuses_past_the_window_only(tmp_path: Path) -> None:
    settings = _settings(tmp_path, **{"features.long_form": {"percentage": 50}})
    inside = next(f"user-{i}" for i in range(100) if bucket("long_form", f"user-{i}") < 50)
    outside = next(f"user-{i}" for i in range(100) if bucket("long_form", f"user-{i}") >= 50)

    def ask(user: str, duration: float) -> float:
        request = GenerationRequest(prompt="x", duration=duration, user_id=user)
        return resolve(request, settings, job_id="j", user=UserContext(user, "free")).duration

    assert ask(inside, 60.0) == 60.0
    assert ask(outside, 30.0) == 30.0  # exactly the window: one call, no flag needed
    with pytest.raises(UnsupportedOption) as refused:
        ask(outside, 30.5)
    assert refused.value.field == "duration" and "features.long_form" in refused.value.message


def test_time_limits_scale_with_the_duration_and_are_capped() -> None:
    worker = WorkerSettings(soft_time_limit=300, hard_time_limit=360, time_limit_per_second=2.0,
                            time_limit_cap=700)
    short, long, longest = (job_time_limits(worker, d) for d in (10.0, 120.0, 300.0))
    assert (short.soft, short.hard) == (320.0, 380.0)
    assert (long.soft, long.hard) == (540.0, 600.0)
    assert (longest.soft, longest.hard) == (700.0, 760.0)  # capped, the margin kept
    flat = WorkerSettings(soft_time_limit=300, hard_time_limit=360, time_limit_per_second=0.0)
    assert job_time_limits(flat, 120.0).soft == 300.0
