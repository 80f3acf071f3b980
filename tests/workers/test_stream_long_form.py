"""A long-form stream=True job (issue 25) through the job runner, real Redis and the tiny model
with a 2 s window: its chunks come a window at a time, and joined they are the job's one-call
decode (exact sample count, seams within the engine tests' tolerance)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import soundfile as sf

from pipeline.client.resolve import resolve
from pipeline.config.loader import load_settings
from pipeline.config.schema import Settings
from pipeline.contract.jobs import GenerationRequest
from pipeline.contract.streams import AudioChunk, StreamEnd, parse_entry
from pipeline.infra.keys import stream_key
from tests.pipeline.conftest import redis_db, redis_url  # noqa: F401 (fixtures)
from tests.workers.test_partials import two_second_window  # noqa: F401 (fixture)
from workers.job_runner import JobRunner
from workers.runtime.longform import WindowCodes
from workers.runtime.musicgen import generate

WAIT = 60.0


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:  # noqa: F811
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def settings(tmp_path: Path, two_second_window: Path) -> Settings:  # noqa: F811
    return load_settings("development", cwd=tmp_path, overrides={
        "storage.output_dir": str(tmp_path / "outputs"), "storage.temp_dir": str(tmp_path / "tmp"),
        "model.preset": "tiny", "model.source": str(two_second_window), "model.max_duration": 2.0,
        "model.engine": "static", "features.streaming_generation": True,
        "generation.window_stride": 1.2, "generation.max_batch_size": 1,
        "generation.stream_chunk_s": 0.5})


def test_a_long_form_job_streams_a_window_at_a_time(settings: Settings,
                                                    client: redis.Redis) -> None:
    job_id = f"long-stream-{uuid.uuid4().hex}"
    spec = resolve(GenerationRequest(prompt="a long piece", duration=5.0, format="wav", seed=3,
                                     normalization="none", stream=True), settings, job_id=job_id)
    assert spec.stream
    runner = JobRunner(settings)
    ahead: list[int] = []  # chunks in the stream while a later window was still to come
    streamed = {window: threading.Event() for window in (1, 2, 3)}

    def paced(loaded: Any, items: list[Any], progress: Any, engine_sink: Any) -> Any:
        def hook(window: WindowCodes) -> None:
            engine_sink(window)
            if window.window.index + 1 < window.count:  # wait until its chunks are out
                deadline = time.monotonic() + WAIT
                target = window.window.index + 1
                while not streamed[target].is_set() and time.monotonic() < deadline:
                    if client.xlen(stream_key(job_id)) > (ahead[-1] if ahead else 0):
                        ahead.append(client.xlen(stream_key(job_id)))
                        streamed[target].set()
                    time.sleep(0.02)

        return generate(loaded, items, progress, on_window=hook)

    runner.batcher._generate = paced
    try:
        outcome = runner.run(spec, worker="w", progress=lambda f, m: None,
                             started_at=time.time(), stream_client=client, attempt=1)
        runner.stream_publisher().flush(WAIT)
        entries = [parse_entry(f) for _, f in client.xrange(stream_key(job_id))]
    finally:
        client.delete(stream_key(job_id))
    assert len(ahead) == 3 and ahead == sorted(ahead)  # chunks after each of 3 windows
    assert entries[-1] == StreamEnd(1, True)
    chunks = [e for e in entries if isinstance(e, AudioChunk)]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    joined = np.concatenate([c.to_numpy() for c in chunks], axis=1)
    assert joined.shape == (1, 160000)
    pcm, _ = sf.read(outcome.result.output_path, dtype="float32", always_2d=True)
    assert pcm.shape[0] == joined.shape[1]
    assert np.abs(np.clip(joined[0], -1, 1) - pcm[:, 0]).max() <= 1e-4  # 16-bit rounding
