"""A job's files: cleanup removes exactly the job's own, and a new attempt starts clean."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.client.resolve import resolve
from pipeline.config.loader import load_settings
from pipeline.config.schema import Settings
from pipeline.contract.jobs import GenerationRequest
from pipeline.errors import GpuOutOfMemory
from workers.generation import EngineLoop
from workers.job_runner import JobRunner, clear_leftovers, discard_job_files, job_temp_dir

HEX = "0a1b2c3d4e5f"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings("development", overrides={
        "storage.output_dir": str(tmp_path / "outputs"), "storage.temp_dir": str(tmp_path / "tmp"),
        "model.preset": "tiny"})


def files_of(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")
    return [folder / n for n in names]


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


NEIGHBOURS = ("abc.def.wav", "abc.def.wav.json", f".abc.def.wav.{HEX}.part", "abcd.mp3",
              "abc.wav.wav", f".abc.wav.wav.{HEX}.part", "abc.mp3.wav", "other.txt")


def test_removing_job_abc_leaves_job_abc_def_alone(settings: Settings, tmp_path: Path) -> None:
    # The old glob "abc.*" deleted job "abc.def"'s finished file and sidecar.
    out = tmp_path / "outputs"
    files_of(out, "abc.mp3", "abc.mp3.json", f".abc.mp3.{HEX}.part",
             f".abc.mp3.json.{HEX}.part", f".abc.flac.{HEX}.part", *NEIGHBOURS)
    files_of(job_temp_dir(settings, "abc"), "melody.upload")
    files_of(job_temp_dir(settings, "abc.def"), "melody.upload")
    JobRunner(settings).remove_outputs("abc")
    assert names(out) == sorted(NEIGHBOURS)
    assert not job_temp_dir(settings, "abc").exists()
    assert names(job_temp_dir(settings, "abc.def")) == ["melody.upload"]


def test_discard_is_a_no_op_for_a_job_with_no_files(settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    discard_job_files(settings, "never-ran")  # no folders yet: nothing raised, nothing made
    assert not out.exists() and not (tmp_path / "tmp").exists()
    # Beside other jobs' files (one whose id starts with this one's), it touches none of them.
    files_of(out, "never-ran.x.wav", "never-ran.x.wav.json", *NEIGHBOURS)
    files_of(job_temp_dir(settings, "never-ran.x"), "melody.upload")
    discard_job_files(settings, "never-ran")
    assert names(out) == sorted(["never-ran.x.wav", "never-ran.x.wav.json", *NEIGHBOURS])
    assert names(job_temp_dir(settings, "never-ran.x")) == ["melody.upload"]
    assert not job_temp_dir(settings, "never-ran").exists()


def test_clear_leftovers_keeps_the_finished_pair(settings: Settings, tmp_path: Path) -> None:
    out = tmp_path / "outputs"
    files_of(out, "abc.wav", "abc.wav.json", f".abc.wav.{HEX}.part", *NEIGHBOURS)
    files_of(job_temp_dir(settings, "abc") / "render-1", "stage.wav")
    clear_leftovers(settings, "abc")
    assert names(out) == sorted(["abc.wav", "abc.wav.json", *NEIGHBOURS])
    assert not job_temp_dir(settings, "abc").exists()


def test_an_attempt_removes_earlier_leftovers_and_a_failed_one_leaves_nothing(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "outputs"
    # What a kill -9 during encoding left: a .part, a file without its sidecar, a temp folder.
    files_of(out, f".abc.wav.{HEX}.part", "abc.wav", *NEIGHBOURS)
    stale = files_of(job_temp_dir(settings, "abc") / "render-old", "stage.wav")[0]
    seen: list[list[str]] = []
    runner = JobRunner(settings)

    def sick_model(preset: str) -> Any:
        seen.append(names(out))  # the state the new attempt starts from
        assert not stale.exists()
        raise GpuOutOfMemory("CUDA out of memory (injected)")

    monkeypatch.setattr(runner, "model", sick_model)
    spec = resolve(GenerationRequest(prompt="x", duration=1, format="wav"), settings, job_id="abc")
    with pytest.raises(GpuOutOfMemory):
        runner.run(spec, worker="w", progress=lambda f, m: None, started_at=0.0)
    assert seen == [sorted(["abc.wav", *NEIGHBOURS])]
    assert names(out) == sorted(NEIGHBOURS)  # the failed attempt left nothing of its own
    assert not job_temp_dir(settings, "abc").exists()


def test_preload_builds_the_static_engine_of_the_preset(tmp_path: Path, tiny_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """With the static engine (the default) the preload also builds the preset's engine, so the
    first job neither waits for its cache nor stalls another model's rows while it is built."""
    settings = load_settings("development", cwd=tmp_path, overrides={
        "storage.output_dir": str(tmp_path / "outputs"), "storage.temp_dir": str(tmp_path / "tmp"),
        "model.preset": "tiny", "model.source": str(tiny_path), "model.preload": True})
    assert settings.model.engine == "static"
    runner = JobRunner(settings)
    caplog.set_level("INFO", logger="workers.generation.engine_loop")
    assert runner.preload() is not None
    assert "built a static engine of" in caplog.text
    loaded, _ = runner.model("tiny")
    caplog.clear()
    assert isinstance(runner.loop, EngineLoop) and runner.loop.prepare(loaded)
    assert "built a static engine" not in caplog.text  # the preloaded one is used
