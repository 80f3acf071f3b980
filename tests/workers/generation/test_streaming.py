"""Streamed chunks from the engine loop (issue 25), on the real tiny model and real Redis.

Several rows stream at once through one ``StreamPublisher``; each job's chunks, read back from
its Redis Stream and joined, have exactly the samples of the job's one-call decode, and equal it
within ``SEAM_TOLERANCE`` at the seams (left context, lookahead and a 10 ms crossfade).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from pipeline.contract.streams import AudioChunk, StreamEnd, parse_entry
from pipeline.errors import GpuOutOfMemory
from pipeline.infra.keys import STREAM_MAX_ENTRIES, stream_key
from tests.pipeline.conftest import redis_db, redis_url  # noqa: F401 (fixtures)
from workers.generation import EngineLoop, HfLoop
from workers.generation.streaming import (
    JobStream,
    StreamPublisher,
    crossfade_weights,
    end_unfinished_stream,
)
from workers.runtime.batch import GenerationItem
from workers.runtime.engine import StaticEngine
from workers.runtime.engine.stream import LEFT_CONTEXT_FRAMES, LOOKAHEAD_FRAMES, decode_chunks
from workers.runtime.loaded import LoadedModel
from workers.runtime.musicgen import generate

WAIT = 120.0  # a bound on waiting, not a measured duration
# Measured on the tiny model: 1.2e-7 at most (float rounding); the bound leaves room for BLAS
# differences between machines while a seam without context (4e-2) or without its crossfade
# partner would fail it.
SEAM_TOLERANCE = 1e-5


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:  # noqa: F811
    c = redis.Redis.from_url(redis_url)
    c.ping()
    yield c
    c.close()


@pytest.fixture
def job_ids(client: redis.Redis) -> Iterator[list[str]]:
    ids: list[str] = []
    yield ids
    if ids:
        client.delete(*(stream_key(i) for i in ids))


def _publisher() -> StreamPublisher:
    return StreamPublisher(decode_chunks, left_context=LEFT_CONTEXT_FRAMES,
                           lookahead=LOOKAHEAD_FRAMES, crossfade_s=0.01)


def _read(client: redis.Redis, job_id: str) -> list[AudioChunk | StreamEnd]:
    return [parse_entry(fields) for _, fields in client.xrange(stream_key(job_id))]


def _joined(entries: list[AudioChunk | StreamEnd]) -> tuple[np.ndarray, list[int]]:
    chunks = [e for e in entries if isinstance(e, AudioChunk)]
    assert [c.index for c in chunks] == list(range(len(chunks)))
    seams = list(np.cumsum([c.samples for c in chunks])[:-1])
    return np.concatenate([c.to_numpy() for c in chunks], axis=1), seams


def test_several_rows_stream_at_once_and_join_to_the_one_call_decode(
        tiny_model: LoadedModel, client: redis.Redis, job_ids: list[str]) -> None:
    publisher = _publisher()
    calls: list[int] = []  # rows per decode call
    decode = publisher._decode

    def counting(loaded: Any, codes: list[Any]) -> list[np.ndarray]:
        calls.append(len(codes))
        return decode(loaded, codes)

    publisher._decode = counting
    loop = EngineLoop(lambda model, rows: StaticEngine(model, max_rows=rows),
                      HfLoop(generate, max_batch_size=4, batch_wait_s=0.0), max_batch_size=4)
    assert loop.prepare(tiny_model)
    durations = [2.3, 1.7, 2.9]
    jobs, tickets = [], []
    for i, duration in enumerate(durations):
        job_ids.append(f"stream-test-{uuid.uuid4().hex}")
        job = JobStream(client, job_ids[-1], attempt=1, sample_rate=tiny_model.sampling_rate,
                        channels=1, ttl_s=600)
        ticket = loop.submit(tiny_model, GenerationItem(prompt=f"row {i}", duration_s=duration,
                                                        seed=i), "k")
        ticket.stream = publisher.row(job, chunk_s=0.5, frame_rate=tiny_model.frame_rate,
                                      target_samples=round(duration * tiny_model.sampling_rate))
        jobs.append(job)
        tickets.append(ticket)
    audio = [t.future.result(WAIT) for t in tickets]
    for job, a in zip(jobs, audio, strict=True):
        publisher.finish(job, a.samples)
    assert publisher.flush(WAIT)

    assert max(calls) >= 2, calls  # chunks of rows due in one step shared an EnCodec call
    for job_id, a, duration in zip(job_ids, audio, durations, strict=True):
        entries = _read(client, job_id)
        assert entries[-1] == StreamEnd(1, True)
        joined, seams = _joined(entries)
        assert joined.shape == a.samples.shape == (1, round(duration * 32000))
        chunks = [e for e in entries if isinstance(e, AudioChunk)]
        assert len(chunks) >= 3 and chunks[0].samples == 16000  # 0.5 s chunks, then the rest
        assert [c.start_s for c in chunks] == [s / 32000 for s in [0, *seams]]
        diff = np.abs(joined - a.samples)
        assert diff.max() <= SEAM_TOLERANCE, (diff.max(), seams)
        assert client.ttl(stream_key(job_id)) > 0  # expires with the job


@pytest.mark.parametrize("included", [True, False])
def test_a_continuation_streams_from_its_output_start_on_the_engine(
        tiny_model: LoadedModel, client: redis.Redis, job_ids: list[str], included: bool) -> None:
    """A continuation's row starts with its clip's frames: streamed from them when the output
    includes the clip, from the first new frame when it does not; joined, the chunks are the
    finished clip either way (the left context of the first chunk then reaches into the clip)."""
    [made] = generate(tiny_model, [GenerationItem("a drum", 1.0, seed=3)])
    clip = made.samples[:, :30 * 640]  # 0.6 s: 30 frames
    duration = 2.1 if included else 1.5
    item = GenerationItem("a piano", duration, seed=4, continuation=(clip, 32000),
                          continuation_included=included)
    publisher = _publisher()
    loop = EngineLoop(lambda model, rows: StaticEngine(model, max_rows=rows),
                      HfLoop(generate, max_batch_size=2, batch_wait_s=0.0), max_batch_size=2)
    assert loop.prepare(tiny_model)
    job_ids.append(f"stream-test-{uuid.uuid4().hex}")
    job = JobStream(client, job_ids[-1], attempt=1, sample_rate=32000, channels=1, ttl_s=600)
    ticket = loop.submit(tiny_model, item, "k")
    ticket.stream = publisher.row(job, chunk_s=0.5, frame_rate=tiny_model.frame_rate,
                                  target_samples=round(duration * 32000),
                                  first_frame=0 if included else 30)
    audio = ticket.future.result(WAIT)
    publisher.finish(job, audio.samples)
    assert publisher.flush(WAIT)
    entries = _read(client, job_ids[-1])
    assert entries[-1] == StreamEnd(1, True)
    joined, seams = _joined(entries)
    assert joined.shape == audio.samples.shape == (1, round(duration * 32000))
    assert len(seams) >= 2  # streamed in chunks, not one at the end
    assert np.abs(joined - audio.samples).max() <= SEAM_TOLERANCE
    if included:  # the clip's own frames come first, re-decoded from its codes
        assert np.corrcoef(joined[0, 2000:18000], clip[0, 2000:18000])[0, 1] > 0.5


def test_a_chunk_decoded_without_context_would_click(tiny_model: LoadedModel) -> None:
    """The tolerance can fail: the same chunk decoded alone is far off the one-call decode."""
    codes = __import__("torch").randint(0, 2048, (4, 150))
    full = decode_chunks(tiny_model, [codes])[0]
    alone = decode_chunks(tiny_model, [codes[:, 50:100]])[0]
    assert np.abs(alone - full[:, 50 * 640:100 * 640]).max() > 100 * SEAM_TOLERANCE
    with_context = decode_chunks(tiny_model, [codes[:, 0:100 + LOOKAHEAD_FRAMES]])[0]
    assert np.abs(with_context[:, 50 * 640:100 * 640] - full[:, 50 * 640:100 * 640]).max() \
        <= SEAM_TOLERANCE


def test_a_failed_attempt_ends_its_stream_with_the_error_and_the_next_starts_over(
        client: redis.Redis, job_ids: list[str]) -> None:
    publisher = _publisher()
    job_ids.append(f"stream-test-{uuid.uuid4().hex}")
    first = JobStream(client, job_ids[0], attempt=1, sample_rate=32000, channels=1, ttl_s=60)
    publisher.row(first, chunk_s=1.0, frame_rate=50.0, target_samples=32000)
    publisher.finish(first, np.ones((1, 100), dtype=np.float32))
    publisher.fail(first, GpuOutOfMemory("out of memory", "model"))  # after its end: ignored
    second = JobStream(client, job_ids[0], attempt=2, sample_rate=32000, channels=1, ttl_s=60)
    publisher.row(second, chunk_s=1.0, frame_rate=50.0, target_samples=32000)
    publisher.fail(second, GpuOutOfMemory("out of memory", "model"))
    assert publisher.flush(WAIT)
    assert _read(client, job_ids[0]) == [  # the second attempt cleared the first
        StreamEnd(2, False, "gpu_oom", "out of memory", "model")]


def test_crossfade_weights_rise_from_0_to_1_with_equal_gain() -> None:
    w = crossfade_weights(320)
    assert w[0] < 0.01 and w[-1] > 0.99 and np.all(np.diff(w) > 0)
    assert np.allclose(w + w[::-1], 1.0, atol=1e-6)


def test_the_stream_stays_capped_under_a_reader_that_never_reads(
        client: redis.Redis, job_ids: list[str]) -> None:
    """2.5x the cap of chunks with nobody reading: Redis keeps about the cap (MAXLEN ~ trims
    whole nodes of ~100 entries), and publishing never waits for a reader. The decode is a
    stand-in here (zeros of each span's length): what is under test is the publishing."""
    def zeros(loaded: Any, spans: list[Any]) -> list[np.ndarray]:
        return [np.zeros((1, n), dtype=np.float32) for n in spans]

    publisher = StreamPublisher(zeros, left_context=2, lookahead=1, crossfade_s=0.0)
    job_ids.append(f"stream-test-{uuid.uuid4().hex}")
    job = JobStream(client, job_ids[0], attempt=1, sample_rate=32000, channels=1, ttl_s=60)
    row = publisher.row(job, chunk_s=4 / 32000, frame_rate=32000.0, target_samples=10**9)
    count = int(2.5 * STREAM_MAX_ENTRIES)
    spans = row.due(final_frames=4 * count + 1)
    assert len(spans) == count
    publisher.chunks(None, [(row, lo, start, end, hi - lo) for lo, start, end, hi in spans])
    assert publisher.flush(WAIT)
    length = client.xlen(stream_key(job_ids[0]))
    assert STREAM_MAX_ENTRIES <= length <= STREAM_MAX_ENTRIES + 200, length
    last = parse_entry(client.xrevrange(stream_key(job_ids[0]), count=1)[0][1])
    assert isinstance(last, AudioChunk) and last.index == count - 1


def test_a_stream_whose_worker_died_is_ended_once_by_the_final_failure(
        client: redis.Redis, job_ids: list[str]) -> None:
    publisher = _publisher()
    job_ids.append(f"stream-test-{uuid.uuid4().hex}")
    job = JobStream(client, job_ids[0], attempt=3, sample_rate=32000, channels=1, ttl_s=60)
    row = publisher.row(job, chunk_s=1.0, frame_rate=50.0, target_samples=32000)
    assert row.due(final_frames=10) == [] and publisher.flush(WAIT)  # the attempt has begun
    publisher._send(job, np.ones((1, 8), dtype=np.float32), None)  # a chunk, then the kill
    poison = StreamEnd(1, False, "poison_job", "delivered 4 times")
    assert end_unfinished_stream(client, job_ids[0], poison, 60)
    assert not end_unfinished_stream(client, job_ids[0], poison, 60)  # it has its end
    entries = _read(client, job_ids[0])
    assert entries[-1] == StreamEnd(3, False, "poison_job", "delivered 4 times")
    assert len(entries) == 2
    assert not end_unfinished_stream(client, f"stream-test-{uuid.uuid4().hex}", poison, 60)


def test_a_chunk_that_fails_to_decode_leaves_no_gap(
        tiny_model: LoadedModel, client: redis.Redis, job_ids: list[str]) -> None:
    """The chunks after a failed decode are skipped and the finish sends the rest from where
    the last good chunk ended: the joined stream is still the whole clip."""
    torch = __import__("torch")
    failing = {2}  # the second decode call (the second chunk) fails
    calls = [0]

    def flaky(loaded: Any, codes: list[Any]) -> list[np.ndarray]:
        calls[0] += 1
        if calls[0] in failing:
            raise RuntimeError("CUDA error: out of memory (injected)")
        return decode_chunks(loaded, codes)

    publisher = StreamPublisher(flaky, left_context=LEFT_CONTEXT_FRAMES,
                                lookahead=LOOKAHEAD_FRAMES, crossfade_s=0.01)
    job_ids.append(f"stream-test-{uuid.uuid4().hex}")
    job = JobStream(client, job_ids[0], attempt=1, sample_rate=32000, channels=1, ttl_s=60)
    codes = torch.randint(0, 2048, (4, 150))
    full = decode_chunks(tiny_model, [codes])[0]
    row = publisher.row(job, chunk_s=0.5, frame_rate=50.0, target_samples=full.shape[-1])
    for final in range(0, 151, 5):  # frames becoming final as steps go by
        due = row.due(final)
        if due:
            publisher.chunks(tiny_model, [(row, lo, s, e, codes[:, lo:hi])
                                          for lo, s, e, hi in due])
    publisher.finish(job, full)
    assert publisher.flush(WAIT)
    entries = _read(client, job_ids[0])
    assert entries[-1] == StreamEnd(1, True)
    joined, seams = _joined(entries)
    assert seams == [25 * 640]  # the first chunk, then the rest in one after the failure
    assert joined.shape == full.shape and np.abs(joined - full).max() <= SEAM_TOLERANCE
