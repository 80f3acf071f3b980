"""Streaming through the real queue (issue 25): real Redis, a real `worker --pool threads`
process with ``model.engine = static``, the tiny model and real ffmpeg.

Two ``stream=True`` jobs run in the engine at once; one is read live from before it starts,
the other (a continuation of a clip, the clip left out) only after it has finished (a late
reader). Each reader gets chunks from index 0,
then the job's result; the joined chunks have the finished file's exact sample count and, with
normalization off, its samples within 16-bit rounding.
"""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import soundfile

from pipeline import AudioChunk, GenerationRequest, JobResult
from pipeline.infra.keys import stream_key

from .conftest import WorkerFactory, held, release, sse_events
from .test_failures import fast, producer, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STREAMING = {"MUSICGEN_MODEL__ENGINE": "static", "MUSICGEN_GENERATION__MAX_BATCH_SIZE": "4",
             "MUSICGEN_FEATURES__STREAMING_GENERATION": "true",
             "MUSICGEN_GENERATION__STREAM_CHUNK_S": "0.5"}


def _joined(items: list[Any]) -> tuple[np.ndarray, JobResult]:
    chunks = [i for i in items if isinstance(i, AudioChunk)]
    assert [c.index for c in chunks] == list(range(len(chunks))) and len(chunks) >= 3
    assert isinstance(items[-1], JobResult) and len(items) == len(chunks) + 1
    return np.concatenate([c.to_numpy() for c in chunks], axis=1), items[-1]


def test_two_streaming_jobs_through_a_real_worker(
        workers: WorkerFactory, workdir: Path, redis_url: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The late job continues a clip and leaves it out of its output: its stream starts at the
    first new frame (the worker tells the row's schedule where its output starts)."""
    prod = producer(workdir, redis_url, monkeypatch, **STREAMING)
    clip = tmp_path / "clip.wav"
    soundfile.write(clip, 0.3 * np.sin(np.arange(38400) * 2 * np.pi * 220 / 32000), 32000)
    requests = [GenerationRequest(prompt=f"streamed piece {i}", duration=d, seed=i, stream=True,
                                  format="wav", normalization="none", guidance_scale=1.0)
                for i, d in enumerate((2.5, 1.7))]
    requests[1] = requests[1].model_copy(update={"continuation": clip,
                                                 "continuation_included": False})
    live_items: list[Any] = []
    live = prod.enqueue(requests[0])
    reader = threading.Thread(target=lambda: live_items.extend(live.stream(timeout=300)))
    reader.start()  # before any worker runs: it waits for the first chunk
    late = prod.enqueue(requests[1])
    workers.start(pool="threads", **STREAMING)
    late.wait(300)
    reader.join(300)
    late_items = list(late.stream(timeout=60))  # after the end: every chunk from the start

    for items, request in ((live_items, requests[0]), (late_items, requests[1])):
        joined, result = _joined(items)
        assert {i.attempt for i in items if isinstance(i, AudioChunk)} == {1}
        pcm, rate = soundfile.read(result.output_path, dtype="float32", always_2d=True)
        assert rate == 32000 and joined.shape == (1, round(request.duration * 32000))
        assert pcm.shape[0] == joined.shape[1]  # the file's exact sample count
        # 16-bit rounding (3e-5) and its clipping at full scale; a seam off by a frame or a
        # chunk decoded without context (4e-2) would be far past this.
        assert np.abs(np.clip(joined[0], -1, 1) - pcm[:, 0]).max() <= 1e-4
        assert np.abs(joined).max() > 0


def test_a_worker_killed_mid_stream_streams_again_under_the_next_attempt(
        workers: WorkerFactory, workdir: Path, redis_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    env = {**fast(redis_url), **STREAMING}
    prod = producer(workdir, redis_url, monkeypatch, **env)
    first = workers.start(pool="threads", faults=True, **env)
    request = GenerationRequest(prompt="FAULT:hold-after=mid-stream:120 a streamed piece",
                                duration=3.0, seed=4, stream=True, format="wav",
                                normalization="none", guidance_scale=1.0)
    handle = prod.enqueue(request)
    live_items: list[Any] = []
    reader = threading.Thread(target=lambda: live_items.extend(handle.stream(timeout=300)))
    reader.start()
    key = stream_key(handle.id)
    client = redis.Redis.from_url(redis_url)
    # 120 steps: the chunks of frames 0..75 are due (0.5 s chunks, 8 lookahead frames).
    wait_for(lambda: held(workers.tmp, "mid-stream") and client.xlen(key) >= 2, 120,
             "the job to stall after publishing chunks")
    first.kill9()
    release(workers.tmp, "mid-stream")  # the next attempt runs straight through
    workers.start(pool="threads", faults=True, **env)
    reader.join(300)
    late_items = list(handle.stream(timeout=60))

    before = [i for i in live_items if isinstance(i, AudioChunk) and i.attempt == 1]
    assert [c.index for c in before] == list(range(len(before))) and len(before) >= 2
    again = [i for i in live_items if isinstance(i, AudioChunk) and i.attempt == 2]
    assert live_items == [*before, *again, late_items[-1]]  # attempt 1, then 2 from chunk 0
    assert late_items[:-1] == again  # the late reader sees only the newest attempt
    joined, result = _joined(late_items)
    assert joined.shape == (1, round(request.duration * 32000))
    pcm, _ = soundfile.read(result.output_path, dtype="float32", always_2d=True)
    assert np.abs(np.clip(joined[0], -1, 1) - pcm[:, 0]).max() <= 1e-4
    # Attempt 1's chunks were the same audio as far as they went (same seed, same codes).
    first_part = np.concatenate([c.to_numpy() for c in before], axis=1)
    assert np.abs(first_part - joined[:, :first_part.shape[1]]).max() <= 1e-5


def test_the_gateway_streams_mp3_while_the_job_generates(
        workers: WorkerFactory, workdir: Path, redis_url: str,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``GET /v1/jobs/{id}/stream`` (a signed URL, as an ``<audio src>`` uses it): MP3 bytes
    arrive while the job is held after its first chunks, and the whole stream decodes to the
    clip's length once it ends."""
    from fastapi.testclient import TestClient

    from pipeline.gateway.app import create_app
    from pipeline.gateway.keystore import ApiKeyStore

    prod = producer(workdir, redis_url, monkeypatch, **STREAMING)
    workers.start(pool="threads", faults=True, **STREAMING)
    auth = {"Authorization": f"Bearer {ApiKeyStore(prod.quota.engine).create('sia').key}"}
    with TestClient(create_app(prod.settings, producer=prod)) as client:
        created = client.post("/v1/jobs", headers=auth, json={
            "prompt": "FAULT:hold-after=gw-stream:120 a streamed piece", "duration": 3.0,
            "seed": 5, "stream": True, "format": "wav"})
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["urls"]["stream"] == f"/v1/jobs/{job['id']}/stream"
        heard = bytearray()
        with client.stream("GET", job["signed_urls"]["stream"]) as stream:  # no header
            assert stream.status_code == 200
            assert stream.headers["content-type"] == "audio/mpeg"
            blocks = stream.iter_bytes()
            while len(heard) < 4096:  # the first chunks' frames, while the job is held
                heard += next(blocks)
            # Bytes came before the job got to its hold (chunk 0 is due at step 58): wait
            # for the hold, then nothing more can come until the release.
            wait_for(lambda: held(workers.tmp, "gw-stream"), 120, "the job to stall")
            status = client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["status"]
            assert status in ("started", "progress"), status  # still generating
            # The event stream tells of the chunks as they come: one already, while held.
            with client.stream("GET", job["signed_urls"]["events"]) as events:
                told = sse_events(events.iter_lines())
                seen = [next(told)]
                while seen[-1][0] != "chunk":
                    seen.append(next(told))
                assert seen[-1][1]["index"] == 0 and seen[-1][1]["attempt"] == 1
                release(workers.tmp, "gw-stream")
                for block in blocks:
                    heard += block
                seen.extend(told)
        chunks = [data for event, data in seen if event == "chunk"]
        assert [c["index"] for c in chunks] == list(range(len(chunks))) and len(chunks) >= 3
        assert abs(sum(c["seconds"] for c in chunks) - 3.0) < 1e-6  # the clip, exactly
        assert seen[-1][0] == "state" and seen[-1][1]["status"] == "succeeded"  # chunks first
        # A reconnect after chunk 0 (an EventSource's Last-Event-ID) is told of the rest.
        again = client.get(job["signed_urls"]["events"], headers={"Last-Event-ID": "chunk-1-0"})
        indices = [data["index"] for event, data in sse_events(again.iter_lines())
                   if event == "chunk"]
        assert indices == list(range(1, len(chunks)))
        assert client.get(f"/v1/jobs/{job['id']}", headers=auth).json()["status"] == "succeeded"
        # A job not enqueued with stream=True has no stream to give.
        plain = client.post("/v1/jobs", headers=auth, json={"prompt": "quiet", "duration": 1.0})
        refused = client.get(f"/v1/jobs/{plain.json()['id']}/stream", headers=auth)
        assert refused.status_code == 422 and refused.json()["field"] == "stream"
    mp3 = tmp_path / "heard.mp3"
    mp3.write_bytes(bytes(heard))
    probe = subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration",
                            "-of", "csv=p=0", str(mp3)], capture_output=True, text=True,
                           check=True)
    assert abs(float(probe.stdout) - 3.0) < 0.1  # MP3's frame padding, no more
