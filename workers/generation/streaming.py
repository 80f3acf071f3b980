"""Streaming jobs' chunks: scheduled by the engine loop, decoded and published off its path.

A ``stream=True`` job's ticket carries a :class:`RowStream`. After every engine step the loop
asks each streaming row's ``RowStream`` which chunks fell due (``stream_chunk_s`` of frames the
delay pattern made final, plus the decoder's lookahead), copies their codes out of the engine
(a gather: the row may leave and its slot be reused before the decode runs) and hands every
chunk that fell due in that step to the process's :class:`StreamPublisher` in one call. The
publisher's thread decodes them with EnCodec, the chunks of one length in one call whichever
rows they come from, crossfades each seam and ``XADD``s the chunks to the jobs' Redis Streams,
so the loop itself only pays for the copies. The last chunk of a job is cut from the job's own
one-call decode when it finishes (``finish``), so the joined chunks have exactly its samples.

A publisher's queue is one FIFO for every job: a job's end entry always follows its chunks.
Redis errors are logged and skipped: a stream is a view of the job, never a reason to fail it,
and ``XADD ... MAXLEN ~`` never waits for a reader.

This module is torch-free: the decode is handed in (``workers.runtime.engine.stream``).
"""

from __future__ import annotations

import logging
import math
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.contract.streams import AudioChunk, StreamEnd, chunk_fields, end_fields
from pipeline.errors import PipelineError
from pipeline.infra.keys import STREAM_MAX_ENTRIES, stream_key

log = logging.getLogger(__name__)

# (loaded model, [(codebooks, frames) codes]) -> [(channels, samples) float32], one per chunk.
ChunkDecoder = Callable[[Any, list[Any]], list[np.ndarray]]


def crossfade_weights(length: int) -> np.ndarray:
    """Raised-cosine weights of the incoming side over ``length`` samples; the outgoing side
    gets ``1 - w``. Equal gain suits two decodes of the same frames (they are correlated)."""
    if length <= 0:
        return np.zeros(0, dtype=np.float32)
    ramp = (np.arange(length, dtype=np.float64) + 0.5) / length
    return (0.5 - 0.5 * np.cos(np.pi * ramp)).astype(np.float32)


@dataclass(eq=False)
class JobStream:
    """One attempt of one job's stream: where it goes and what the publisher has sent of it.
    The counters belong to the publisher's thread."""

    client: Any  # redis.Redis
    job_id: str
    attempt: int
    sample_rate: int
    channels: int
    ttl_s: int  # the key expires with the job's result
    sent_samples: int = 0
    index: int = 0
    tail: np.ndarray | None = None  # the last chunk's decode past its end: the next seam's fade
    ended: bool = False
    # A chunk that could not be decoded or published: the later ones are skipped (a chunk must
    # start where the last one ended) and ``finish`` sends everything from there in one.
    broken: bool = False

    @property
    def key(self) -> str:
        return stream_key(self.job_id)


@dataclass(eq=False)
class RowStream:
    """What the engine loop keeps of a streaming ticket: the chunks' schedule in frames.

    Chunk ``k`` emits frames ``[k*chunk, (k+1)*chunk)`` and is decoded from
    ``left_context`` frames before to ``lookahead`` frames after (so it falls due once that last
    lookahead frame is final). A chunk whose samples would reach past the clip's own length
    (``target_samples``) is not scheduled: the job's finished decode covers the rest. A
    continuation whose output leaves its clip out starts at frame ``first_frame`` (the clip's
    frames: the row's codes start with them, the output does not); frame numbers stay the
    row's, so the left context reaches into the clip as the one-call decode does."""

    job: JobStream
    publisher: StreamPublisher
    chunk_frames: int
    hop: int  # samples per frame
    target_samples: int
    first_frame: int = 0
    next_frame: int = 0
    spans: list[tuple[int, int, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.next_frame = max(self.next_frame, self.first_frame)

    def due(self, final_frames: int) -> list[tuple[int, int, int, int]]:
        """The ``(lo, start, end, hi)`` frame spans to decode now, given the frames final."""
        out: list[tuple[int, int, int, int]] = []
        left, ahead = self.publisher.left_context, self.publisher.lookahead
        while True:
            start, end = self.next_frame, self.next_frame + self.chunk_frames
            if end + ahead > final_frames \
                    or (end - self.first_frame) * self.hop > self.target_samples:
                return out
            out.append((max(0, start - left), start, end, end + ahead))
            self.next_frame = end


class StreamPublisher:
    """The process's chunk decoder and publisher (one daemon thread, started on first use)."""

    def __init__(self, decode: ChunkDecoder, *, left_context: int, lookahead: int,
                 crossfade_s: float) -> None:
        self._decode = decode
        self.left_context, self.lookahead = left_context, lookahead
        self.crossfade_s = crossfade_s  # the fade at each seam, inside the lookahead's audio
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.decode_calls = 0  # EnCodec calls made for chunks (tests: chunks share calls)

    # --- any thread ----------------------------------------------------------------------------
    def row(self, job: JobStream, *, chunk_s: float, frame_rate: float,
            target_samples: int, first_frame: int = 0) -> RowStream:
        """A ticket's schedule for ``job`` (clears the stream: a new attempt starts from 0);
        ``first_frame``: the output's first frame in the row's codes (``RowStream``)."""
        self._put(lambda: self._begin(job))
        return RowStream(job, self, chunk_frames=max(1, round(chunk_s * frame_rate)),
                         hop=round(job.sample_rate / frame_rate), target_samples=target_samples,
                         first_frame=first_frame)

    def chunks(self, loaded: Any, due: list[tuple[RowStream, int, int, int, Any]]) -> None:
        """Chunks that fell due in one step, ``(row stream, lo, start, end, codes of lo..hi)``:
        decoded together, published in order."""
        self._put(lambda: self._decode_and_send(loaded, due))

    def finish(self, job: JobStream, samples: np.ndarray) -> None:
        """The job's finished ``(channels, n)`` audio: its rest as the last chunk, then the end."""
        self._put(lambda: self._finish(job, samples))

    def fail(self, job: JobStream, error: BaseException) -> None:
        """The attempt ended with ``error``: its end entry, after whatever chunks it sent."""
        if isinstance(error, PipelineError):
            end = StreamEnd(job.attempt, False, error.code, error.message, error.field)
        else:
            end = StreamEnd(job.attempt, False, "error", f"{type(error).__name__}: {error}")
        self._put(lambda: self._end(job, end))

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far is published (tests, benchmarks, shutdown)."""
        done = threading.Event()
        self._put(done.set)
        return done.wait(timeout)

    def _put(self, work: Callable[[], None]) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="stream-publisher",
                                                daemon=True)
                self._thread.start()
        self._queue.put(work)

    # --- the publisher's thread ---------------------------------------------------------------
    def _run(self) -> None:
        while True:
            work = self._queue.get()
            if work is None:
                return
            try:
                work()
            except Exception:  # a stream is best effort; the next job's chunks still go
                log.exception("could not publish a stream's chunks")

    def _begin(self, job: JobStream) -> None:
        try:
            job.client.delete(job.key)
        except Exception:
            log.warning("could not clear the stream of job %s", job.job_id, exc_info=True)

    def _decode_and_send(self, loaded: Any, due: list[tuple[RowStream, int, int, int, Any]]
                         ) -> None:
        live = [d for d in due if not (d[0].job.ended or d[0].job.broken)]
        if not live:
            return
        try:
            audio = self._decode(loaded, [codes for *_, codes in live])
        except Exception:
            log.warning("could not decode %d stream chunks; their jobs' streams send the rest "
                        "when they finish", len(live), exc_info=True)
            for row, *_ in live:
                row.job.broken = True
            return
        self.decode_calls += 1
        for (row, lo, start, end, _), samples in zip(live, audio, strict=True):
            if row.job.broken:
                continue
            hop, fade = row.hop, round(self.crossfade_s * row.job.sample_rate)
            body = samples[:, (start - lo) * hop:(end - lo) * hop]
            tail = samples[:, (end - lo) * hop:(end - lo) * hop + fade]
            self._send(row.job, body, tail)

    def _finish(self, job: JobStream, samples: np.ndarray) -> None:
        if job.ended:
            return
        rest = samples[:, job.sent_samples:]
        if rest.shape[-1]:
            self._send(job, rest, None)
        if job.sent_samples == samples.shape[-1]:
            self._end(job, StreamEnd(job.attempt, True))
        else:  # the last chunk did not go out: say so rather than end a clip that is short
            self._end(job, StreamEnd(job.attempt, False, "stream_incomplete",
                                     "the stream lost its last chunk; the finished file is whole"))

    def _send(self, job: JobStream, body: np.ndarray, tail: np.ndarray | None) -> None:
        """Publish ``body`` as the job's next chunk, its start faded in from the last tail."""
        body = np.array(body, dtype=np.float32, copy=True)
        if job.tail is not None:
            n = min(job.tail.shape[-1], body.shape[-1])
            w = crossfade_weights(n)
            body[:, :n] = job.tail[:, :n] * (1 - w) + body[:, :n] * w
        job.tail = None if tail is None else np.array(tail, dtype=np.float32, copy=True)
        chunk = AudioChunk(attempt=job.attempt, index=job.index,
                           start_s=job.sent_samples / job.sample_rate,
                           sample_rate=job.sample_rate, channels=job.channels,
                           pcm=np.ascontiguousarray(body.T).astype("<f4").tobytes())
        if not self._xadd(job, chunk_fields(chunk)):
            job.broken = True  # not sent: the next chunk would leave a gap
            return
        job.index += 1
        job.sent_samples += body.shape[-1]

    def _end(self, job: JobStream, end: StreamEnd) -> None:
        if job.ended:
            return
        job.ended = True
        self._xadd(job, end_fields(end))

    @staticmethod
    def _xadd(job: JobStream, fields: dict[str, bytes | str]) -> bool:
        try:
            pipe = job.client.pipeline(transaction=False)
            pipe.xadd(job.key, fields, maxlen=STREAM_MAX_ENTRIES, approximate=True)
            pipe.expire(job.key, max(1, math.ceil(job.ttl_s)))
            pipe.execute()
        except Exception:
            log.warning("could not publish to the stream of job %s", job.job_id, exc_info=True)
            return False
        return True


def end_unfinished_stream(client: Any, job_id: str, error: StreamEnd, ttl_s: int) -> bool:
    """End a job's stream with ``error`` unless its last entry already ends it; True if it did.

    For a job that failed for good where no attempt could say so itself (a worker killed
    mid-stream, then the poison cap, or a hard time limit that killed the pool's child): the
    settler calls this, so a reader sees the end. The end carries the last chunk's attempt
    (``error.attempt`` for a stream with no chunk). No stream, nothing is written."""
    key = stream_key(job_id)
    last = client.xrevrange(key, count=1)
    if not last:
        return False
    fields = {k.decode() if isinstance(k, bytes) else str(k): v for k, v in last[0][1].items()}
    if "end" in fields:
        return False
    attempt = int(fields.get("attempt", error.attempt))
    pipe = client.pipeline(transaction=False)
    pipe.xadd(key, end_fields(StreamEnd(attempt, False, error.code, error.message, error.field)),
              maxlen=STREAM_MAX_ENTRIES, approximate=True)
    pipe.expire(key, max(1, ttl_s))
    pipe.execute()
    return True
