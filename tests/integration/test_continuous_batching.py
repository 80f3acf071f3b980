"""Continuous batching through the real queue: real Redis, a real `worker --pool threads` process
with ``model.engine = static``, the tiny model and real ffmpeg.

The long job carries ``FAULT:hold-alone`` (tests/integration/faults.py): after its first step it
does not step while it is the only row, so the short job is certainly admitted beside it and
finishes while it is still running, however slowly the short job's delivery comes on a loaded
host. What the test asserts are states: the short job is SUCCESS while the long one is still
STARTED or PROGRESS, and it shared the long one's batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile

from pipeline import GenerationRequest, JobStatus

from .conftest import WorkerFactory, held, release
from .test_failures import producer, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STATIC = {"MUSICGEN_MODEL__ENGINE": "static", "MUSICGEN_GENERATION__MAX_BATCH_SIZE": "4",
          # Long enough that any wait for company would show: the static engine never waits.
          "MUSICGEN_GENERATION__BATCH_WAIT_MS": "60000"}


def test_a_short_job_finishes_while_a_long_one_is_still_generating(
        workers: WorkerFactory, workdir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    prod = producer(workdir, redis_url, monkeypatch, **STATIC)
    workers.start(pool="threads", faults=True, **STATIC)
    long = prod.enqueue(GenerationRequest(prompt="a long slow piece FAULT:hold-alone=long", duration=30.0,
                                          seed=5, format="flac", normalization="none"))
    wait_for(lambda: held(workers.tmp, "long"), 120, "the long job to be generating alone")
    short_request = GenerationRequest(prompt="a short drum fill", duration=1.0, seed=6, format="wav",
                                      guidance_scale=1.0, normalization="none")
    short = prod.enqueue(short_request)
    short_result = short.wait(180)
    assert long.status() in (JobStatus.started, JobStatus.progress)
    assert short_result.batch_size == 2  # admitted beside the long job, not after it
    release(workers.tmp, "long")
    long_result = long.wait(300)
    assert long_result.batch_size == 1  # it started alone: nobody waited for company

    for result in (short_result, long_result):
        path = Path(result.output_path)
        assert path.is_file() and Path(result.sidecar_path).is_file()
        info = soundfile.info(str(path))
        assert info.samplerate == result.sample_rate == 32000
        assert info.frames == round(result.duration * 32000)
    assert short_result.duration == pytest.approx(1.0, abs=0.03)
    assert long_result.duration == pytest.approx(30.0, abs=0.03)
    assert Path(long_result.output_path).suffix == ".flac" and Path(short_result.output_path).suffix == ".wav"
    sidecar = json.loads(Path(short_result.sidecar_path).read_text())
    assert sidecar["request"]["prompt"] == short_request.prompt and sidecar["result"]["batch_size"] == 2

    # The short job alone sounds as it did beside the long one: float rounding of the batched
    # step may move a sample across one 16-bit step, a different token would move hundreds.
    alone = prod.enqueue(short_request).wait(180)
    assert alone.batch_size == 1
    alone_pcm, _ = soundfile.read(alone.output_path, dtype="int16")
    batched_pcm, _ = soundfile.read(short_result.output_path, dtype="int16")
    assert alone_pcm.shape == batched_pcm.shape
    assert np.abs(alone_pcm.astype(np.int32) - batched_pcm.astype(np.int32)).max() <= 1
    assert np.abs(batched_pcm).max() > 0  # audio, not silence
