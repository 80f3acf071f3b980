"""End to end through the queue: a caller process enqueues, a real worker process generates
with the tiny model, real ffmpeg writes the file, and we check the file with ffprobe."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

import pipeline
from pipeline import GenerationRequest, JobStatus

from .conftest import (
    Worker,
    base_env,
    caller_output,
    ffprobe,
    held,
    measured_lufs,
    release,
    run_caller,
    start_caller,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _settings(workdir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> pipeline.Settings:
    for key, value in base_env(workdir, redis_url).items():
        if key.startswith("MUSICGEN_"):
            monkeypatch.setenv(key, value)
    return pipeline.load_settings(cwd=workdir)


def _progress_seen(log: Path) -> list[list[Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def test_caller_process_gets_the_file_it_asked_for(shared_worker: Worker, workdir: Path, redis_url: str,
                                                   tmp_path: Path) -> None:
    faults = Path(shared_worker.env["FAULTS_DIR"])
    hold = f"progress-{uuid.uuid4().hex[:8]}"
    seen_log = tmp_path / "progress.jsonl"
    caller = start_caller(workdir, redis_url, {
        "prompt": f"calm piano\x07 over rain FAULT:hold-progress={hold}", "duration": 2.0, "format": "flac",
        "sample_rate": 44100, "channels": 2, "bit_depth": 24, "normalization": "lufs",
        "loudness_target": -16.0, "seed": 7}, progress_log=seen_log)
    # The job stays at its first generation step until the caller has seen it there: however
    # fast the tiny model is, the caller observes progress while tokens are generated.
    wait_for(lambda: caller.poll() is not None or any(0.0 < f < 0.9 for f, _ in _progress_seen(seen_log)),
             120, "the caller to see a generation step")
    release(faults, hold)
    out = caller_output(caller)
    assert "error" not in out, out
    assert out["imported"] == [], "the calling service must not import the worker stack"
    result = out["result"]
    path = Path(result["output_path"])
    assert path.is_file() and path.suffix == ".flac"
    probe = ffprobe(path)
    stream = probe["streams"][0]
    assert probe["format"]["format_name"] == "flac"
    assert int(stream["sample_rate"]) == 44100 and stream["channels"] == 2
    assert stream["bits_per_raw_sample"] == "24"
    assert float(probe["format"]["duration"]) == pytest.approx(2.0, abs=1e-3)
    assert measured_lufs(path) == pytest.approx(-16.0, abs=0.5)
    assert result["seed"] == 7 and result["model"] == "tiny"
    timings = result["timings"]
    assert timings["generate"] > 0 and timings["postprocess"] > 0 and timings["total"] >= timings["generate"]
    progress = out["progress"]
    assert progress == _progress_seen(seen_log)
    fractions = [f for f, _ in progress]
    assert fractions == sorted(fractions), progress  # never goes backwards
    assert [p for p in progress if 0.0 < p[0] < 0.9], progress  # seen while tokens are generated
    assert progress[-1] == [1.0, "done"], progress
    sidecar = json.loads(Path(result["sidecar_path"]).read_text())
    # the control character is stripped
    assert sidecar["request"]["prompt"] == f"calm piano over rain FAULT:hold-progress={hold}"
    assert sidecar["result"]["output_path"] == str(path)
    assert held(faults, hold)


@pytest.mark.parametrize(("fmt", "rate", "channels", "codec"), [
    ("wav", 32000, 1, "pcm_s16le"), ("mp3", 44100, 2, "mp3"), ("ogg", 48000, 1, "vorbis"),
    ("opus", 48000, 2, "opus"),
])
def test_each_output_format(shared_worker: Worker, workdir: Path, redis_url: str, fmt: str, rate: int,
                            channels: int, codec: str) -> None:
    out = run_caller(workdir, redis_url, {"prompt": "drums", "duration": 1.0, "format": fmt,
                                          "sample_rate": rate, "channels": channels, "normalization": "peak"})
    assert "error" not in out, out
    probe = ffprobe(Path(out["result"]["output_path"]))
    stream = probe["streams"][0]
    assert stream["codec_name"] == codec
    assert int(stream["sample_rate"]) == rate and stream["channels"] == channels
    # lossy codecs pad a frame or two; the sample-exact formats are checked above
    assert float(probe["format"]["duration"]) == pytest.approx(1.0, abs=0.08)


def test_same_seed_same_audio(shared_worker: Worker, workdir: Path, redis_url: str) -> None:
    request = {"prompt": "same again", "duration": 1.0, "format": "wav", "normalization": "none", "seed": 42}
    first = run_caller(workdir, redis_url, request)["result"]
    second = run_caller(workdir, redis_url, request)["result"]
    a, _ = sf.read(first["output_path"])
    b, _ = sf.read(second["output_path"])
    assert first["job_id"] != second["job_id"]
    assert np.array_equal(a, b)


def test_melody_conditioning_with_the_tiny_melody_model(shared_worker: Worker, workdir: Path,
                                                        redis_url: str, tmp_path: Path) -> None:
    t = np.arange(32000 * 2) / 32000
    melody = tmp_path / "melody.wav"
    sf.write(melody, 0.3 * np.sin(2 * np.pi * 440 * t), 32000)
    out = run_caller(workdir, redis_url, {"prompt": "hum along", "duration": 1.0, "model": "tiny-melody",
                                          "melody": str(melody), "format": "wav"})
    assert "error" not in out, out
    assert out["result"]["model"] == "tiny-melody"
    assert float(ffprobe(Path(out["result"]["output_path"]))["format"]["duration"]) == pytest.approx(1.0, abs=1e-3)


def test_a_job_past_the_window_through_the_queue(shared_worker: Worker, workdir: Path,
                                                redis_url: str) -> None:
    """40 s from a model with a 30 s window: two windows, one file of exactly 40 s, and no
    partial file left behind once the final one is written."""
    out = run_caller(workdir, redis_url, {"prompt": "a long one", "duration": 40.0, "format": "wav",
                                          "normalization": "none", "seed": 3}, timeout=240)
    assert "error" not in out, out
    path = Path(out["result"]["output_path"])
    assert sf.info(path).frames == 40 * 32000
    assert not list(path.parent.glob(f"{out['job_id']}.partial*"))


def test_idempotent_enqueue_gives_one_job(shared_worker: Worker, workdir: Path, redis_url: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(workdir, redis_url, monkeypatch)
    producer = pipeline.Producer(settings)
    job_id = f"client-{time.time_ns()}"
    request = GenerationRequest(prompt="once only", duration=0.5, job_id=job_id, format="wav")
    first = producer.enqueue(request)
    second = producer.enqueue(request)
    assert first.id == second.id == job_id
    result = first.wait(120)
    assert second.wait(5) == result
    outputs = list(Path(settings.storage.output_dir).glob(f"{job_id}.*"))
    assert sorted(p.suffix for p in outputs) == [".json", ".wav"]
    # A duplicate message, had one been sent, was queued before this one: a worker with one slot
    # takes messages in order, so once this one is done the duplicate would have been received.
    producer.enqueue(GenerationRequest(prompt="after once only", duration=0.5, format="wav")).wait(120)
    assert shared_worker.log_text().count(f"musicgen.generate[{job_id}] received") == 1


def test_cancel_a_queued_job_and_a_running_one(shared_worker: Worker, workdir: Path, redis_url: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(workdir, redis_url, monkeypatch)
    producer = pipeline.Producer(settings)
    faults = Path(shared_worker.env["FAULTS_DIR"])
    hold = f"cancel-{uuid.uuid4().hex[:8]}"
    # Held at its first generation step, so "running" and "queued" are states, not a race.
    running = producer.enqueue(GenerationRequest(prompt=f"long one FAULT:hold-progress={hold}", duration=2.0,
                                                 format="wav"))
    wait_for(lambda: held(faults, hold), 120, "the long job to be generating")
    queued = producer.enqueue(GenerationRequest(prompt="never starts", duration=0.5, format="wav"))
    # The task thread publishes its job's step within its poll interval of the step itself.
    wait_for(lambda: running.status() is JobStatus.progress and running.progress().fraction > 0.0,
             30, "the held job's progress to be published")
    assert queued.status() is JobStatus.queued  # one job per GPU: the second waits
    assert queued.cancel() is True
    assert queued.status() is JobStatus.cancelled
    assert running.cancel() is True
    release(faults, hold)  # its next progress step sees the flag
    with pytest.raises(pipeline.JobCancelled):
        running.wait(120)
    # The worker moves on to the cancelled queued job, sees its flag, and skips it.
    probe = producer.enqueue(GenerationRequest(prompt="after", duration=0.5, format="wav"))
    probe.wait(120)
    assert queued.status() is JobStatus.cancelled
    out_dir = Path(settings.storage.output_dir)
    assert not list(out_dir.glob(f"{running.id}*")) and not list(out_dir.glob(f"{queued.id}*"))
    assert not list(out_dir.glob(f".{running.id}*"))  # no partial file
    temp = Path(settings.storage.temp_dir)
    assert not (temp / running.id).exists()
    assert f"musicgen.generate[{queued.id}] succeeded" not in shared_worker.log_text()


def test_embedded_default_needs_no_server(workdir: Path, tmp_path: Path) -> None:
    env = base_env(workdir, None, MUSICGEN_APP__DATA_DIR=str(tmp_path / "data"),
                   MUSICGEN_STORAGE__OUTPUT_DIR=str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "lofi loop", "--model", "tiny",
                           "--duration", "1", "--format", "wav", "--json"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert Path(result["output_path"]).parent == tmp_path / "out"
    assert float(ffprobe(Path(result["output_path"]))["format"]["duration"]) == pytest.approx(1.0, abs=1e-3)
    assert (tmp_path / "data" / "broker").is_dir()  # the file-system broker, not Redis


def test_count_makes_variations_in_one_batch_on_the_embedded_default(workdir: Path, tmp_path: Path) -> None:
    env = base_env(workdir, None, MUSICGEN_APP__DATA_DIR=str(tmp_path / "data"),
                   MUSICGEN_STORAGE__OUTPUT_DIR=str(tmp_path / "out"),
                   # the N jobs are queued before the worker starts: a batch runs when it is full
                   MUSICGEN_GENERATION__BATCH_WAIT_MS="60000",
                   MUSICGEN_MODEL__ENGINE="hf")  # one call of N is the HF batcher's promise
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "lofi loop", "--model", "tiny",
                           "--duration", "0.5", "--format", "wav", "--count", "3", "--seed", "40", "--json"],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)
    assert [r["seed"] for r in results] == [40, 41, 42]
    assert [r["batch_size"] for r in results] == [3, 3, 3]
    files = [Path(r["output_path"]) for r in results]
    assert len({f.read_bytes() for f in files}) == 3  # three different variations
    assert all(f.parent == tmp_path / "out" for f in files)


def test_count_past_the_seed_range_is_one_clear_error(workdir: Path, tmp_path: Path) -> None:
    env = base_env(workdir, None, MUSICGEN_APP__DATA_DIR=str(tmp_path / "data"))
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "generate", "x", "--model", "tiny",
                           "--count", "2", "--seed", str(2**32 - 1)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "invalid_request" in proc.stderr and "seed" in proc.stderr, proc.stderr
    assert not (tmp_path / "data" / "broker").exists()  # refused before anything was queued
