"""``GET /v1/jobs/{id}/events``: the job as Server-Sent Events.

A ``progress`` event each time the status, fraction or message changes (or a long job's
partial grows), a ``chunk`` event per chunk of a ``stream=True`` job's audio, then one
``state`` event carrying the whole final job (``JobView``), and the stream ends. Events carry ``id:``
and the stream starts with ``retry:``; a reconnect with ``Last-Event-ID`` does not repeat the
progress the client already has. The stream waits on the
asyncio client (``pipeline.aio``): it is woken by the result backend's message for the job and
reads the state then, with a fallback read every few seconds; no thread sits polling Redis for
an open stream. A comment line every ``KEEPALIVE_S`` keeps proxies from closing a stream whose
job waits in the queue. If the backend cannot be read the stream ends with an ``error`` event
(the body of the error); a client reconnects to go on.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi.encoders import jsonable_encoder
from starlette.responses import StreamingResponse

from pipeline.aio import AsyncJobHandle, AsyncProducer
from pipeline.client.handle import JobHandle
from pipeline.client.producer import Producer
from pipeline.contract.jobs import JobStatus
from pipeline.contract.streams import AudioChunk
from pipeline.errors import PipelineError
from pipeline.gateway.views import view_of_state, with_record

KEEPALIVE_S = 15.0


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response (named so for the OpenAPI schema too)."""

    media_type = "text/event-stream"


# How long a browser's EventSource waits before it reconnects (the ``retry:`` field), in ms.
RETRY_MS = 2000


def frame(event: str, data: Any, event_id: str | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(jsonable_encoder(data))}\n\n".encode()


def event_id(seen: tuple[Any, ...]) -> str:
    """The ``id:`` of a progress event: a digest of what it says (status, fraction, message).
    A job's state is not a log to replay, so resuming means not repeating what the client
    already has: a reconnect whose ``Last-Event-ID`` is the job's current progress gets no
    copy of it, only what comes next."""
    return hashlib.sha256(repr(seen).encode()).hexdigest()[:16]


async def job_events(handle: AsyncJobHandle, last_event_id: str | None = None,
                     finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                     ) -> AsyncIterator[bytes]:
    """The frames of one job's stream, from now until it is final; ``finish`` completes the
    final view as the caller's own ``GET`` would (its signed URLs)."""
    yield f"retry: {RETRY_MS}\n\n".encode()
    last: tuple[Any, ...] | None = None
    quiet_since = time.monotonic()
    # Woken at least every KEEPALIVE_S, so that a quiet job still gets its keepalive line.
    async with aclosing(handle.changes(poll=None)) as states:
        try:
            async for state, info in states:
                # Building the view may ask the claim registry (a job with no stored state):
                # a short blocking read, once per change, off the event loop.
                view = await asyncio.to_thread(view_of_state, handle.sync, state, info)
                status = JobStatus(view["status"])
                if status.finished:  # with the ledger's times, as GET /v1/jobs/{id} gives it
                    final = await asyncio.to_thread(with_record, view, handle.sync)
                    yield frame("state", final if finish is None else finish(final), "final")
                    return
                partial = view.get("partial")  # a long job's audio so far: a new window is news
                seen = (status, view["progress"]["fraction"], view["progress"]["message"],
                        None if partial is None else partial["window"])
                if seen != last:
                    last, quiet_since = seen, time.monotonic()
                    if event_id(seen) == last_event_id:
                        continue  # the client had this one before it reconnected
                    yield frame("progress", {"id": view["id"], "status": status,
                                             "progress": view["progress"], "partial": partial},
                                event_id(seen))
                elif time.monotonic() - quiet_since >= KEEPALIVE_S:
                    quiet_since = time.monotonic()
                    yield b": keepalive\n\n"
        except PipelineError as exc:
            yield frame("error", exc.to_dict())


# --- chunk events of a stream=True job ------------------------------------------------------

#: How long the final ``state`` waits for the chunk reader to reach the stream's end (the
#: worker ends the stream before the job's state says so; this only covers the read's lag).
CHUNK_DRAIN_S = 5.0


def chunk_id(chunk: AudioChunk) -> str:
    return f"chunk-{chunk.attempt}-{chunk.index}"


def _chunk_position(last_event_id: str | None) -> tuple[int, int] | None:
    """(attempt, index) of a ``chunk-A-I`` event id a reconnecting client had, else None."""
    parts = (last_event_id or "").split("-")
    if len(parts) == 3 and parts[0] == "chunk" and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]), int(parts[2])
    return None


async def chunk_events(handle: AsyncJobHandle, last_event_id: str | None = None,
                       ) -> AsyncIterator[bytes]:
    """A ``chunk`` event per chunk of the job's audio stream (what it holds, not its PCM:
    ``/stream`` serves the audio), from the first or after the one ``last_event_id`` names. A
    new attempt starts again at index 0 (a worker died mid-job). The job's own end or error is
    the ``state`` event's to say, so the read's errors end this quietly."""
    after = _chunk_position(last_event_id)
    try:
        async for item in handle.stream():
            if not isinstance(item, AudioChunk):
                return
            if after is not None and (item.attempt, item.index) <= after:
                continue
            yield frame("chunk", {"attempt": item.attempt, "index": item.index,
                                  "start_s": item.start_s, "seconds": item.duration_s,
                                  "sample_rate": item.sample_rate, "channels": item.channels},
                        chunk_id(item))
    except PipelineError:
        return


async def with_chunks(states: AsyncIterator[bytes], chunks: AsyncIterator[bytes],
                      ) -> AsyncIterator[bytes]:
    """``states`` (the job's frames, ``retry:`` first) and ``chunks`` interleaved as they come;
    the final ``state`` waits (``CHUNK_DRAIN_S`` at most) for the chunks before it, so a client
    has every chunk event once it sees the job's end."""
    first = await anext(states, None)  # retry: goes first
    if first is not None:
        yield first
    queue: asyncio.Queue[tuple[str, bytes | None]] = asyncio.Queue()

    async def pump(tag: str, source: AsyncIterator[bytes]) -> None:
        try:
            async for item in source:
                await queue.put((tag, item))
        finally:
            await queue.put((tag, None))

    reader = asyncio.create_task(pump("chunk", chunks))
    watcher = asyncio.create_task(pump("state", states))
    try:
        while True:
            tag, item = await queue.get()
            if item is None:
                if tag == "state":
                    return
                continue
            if tag == "state" and item.startswith(b"id: final"):
                await asyncio.wait({reader}, timeout=CHUNK_DRAIN_S)
                while not queue.empty():
                    more_tag, more = queue.get_nowait()
                    if more_tag == "chunk" and more is not None:
                        yield more
                yield item
                return  # the final state ends the stream (its end marker may be drained above)
            yield item
    finally:
        for task in (reader, watcher):
            task.cancel()
        await asyncio.gather(reader, watcher, return_exceptions=True)


async def _closing(client: AsyncProducer, frames: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``frames``, then the stream's Redis connections closed (also when the client left)."""
    try:
        async for chunk in frames:
            yield chunk
    finally:
        await client.close()


def event_stream(producer: Producer, handle: JobHandle, last_event_id: str | None = None,
                 finish: Callable[[dict[str, Any]], dict[str, Any]] | None = None, *,
                 chunks: bool = False) -> EventStream:
    """The stream of ``handle``'s job, resumed after ``last_event_id`` (the header a browser
    sends when it reconnects), with ``chunk`` events when the job streams its audio
    (``chunks``). Each stream has its own asyncio client: its Redis connections belong to the
    event loop that serves it (a subscription holds one anyway)."""
    client = AsyncProducer(producer)
    job = client.wrap(handle)
    events = job_events(job, last_event_id, finish)
    if chunks:
        events = with_chunks(events, chunk_events(job, last_event_id))
    frames = _closing(client, events)
    # no-cache and no proxy buffering: each event must reach the browser when it happens.
    return EventStream(frames, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
