"""``GET /v1/jobs/{id}/stream``: a ``stream=True`` job's audio as MP3 over chunked transfer,
encoded as the chunks arrive, so a browser's ``<audio>`` plays it while the job generates.

The worker publishes raw float32 PCM chunks (pipeline/contract/streams.py) and the asyncio
handle reads them (``AsyncJobHandle.stream``); here one ``ffmpeg`` child per listener turns them
into MP3 frames (``-flush_packets 1``: each frame leaves as soon as it is encoded). MP3 because
every browser plays it progressively from a plain HTTP response, without Media Source
Extensions. The level is the model's raw output: loudness normalization applies to the
finished file only (``/audio``).

A redelivered job starts its audio over under a new attempt (a worker died mid-job): the bytes
already sent cannot be taken back, so the response ends there, and a listener that asks again
hears the new attempt from its start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from pipeline.aio import AsyncJobHandle, AsyncProducer
from pipeline.client.streaming import no_stream
from pipeline.contract.streams import AudioChunk
from pipeline.errors import PipelineError, ServiceUnavailable

log = logging.getLogger(__name__)

MEDIA_TYPE = "audio/mpeg"
BITRATE = "128k"
READ_BYTES = 4096


def encoder_argv(sample_rate: int, channels: int, ffmpeg: str = "ffmpeg") -> list[str]:
    """float32 PCM on stdin -> MP3 frames on stdout, each written as soon as it is encoded."""
    return [ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error",
            "-f", "f32le", "-ar", str(sample_rate), "-ac", str(channels), "-i", "pipe:0",
            "-f", "mp3", "-b:a", BITRATE, "-flush_packets", "1", "pipe:1"]


async def first_chunk(chunks: AsyncIterator[AudioChunk | object]) -> AudioChunk | None:
    """The stream's first chunk (None: the job ended without one). Read before the response
    starts, so that a job without a stream, or a refused one, is an HTTP error, not a broken
    200."""
    async for item in chunks:
        if isinstance(item, AudioChunk):
            return item
        return None
    return None


async def mp3_frames(first: AudioChunk, chunks: AsyncIterator[AudioChunk | object],
                     client: AsyncProducer, job_id: str) -> AsyncIterator[bytes]:
    """The MP3 bytes of ``first`` and every chunk of its attempt after it, as ffmpeg makes
    them; the child and the stream's Redis connections are closed however the response ends
    (the job's end, its error, or the listener leaving)."""
    try:
        encoder = await asyncio.create_subprocess_exec(
            *encoder_argv(first.sample_rate, first.channels), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    except OSError as exc:
        await client.close()
        raise ServiceUnavailable("ffmpeg cannot be run on the gateway's host", None,
                                 {"cause": type(exc).__name__}) from exc
    assert encoder.stdin is not None and encoder.stdout is not None
    stdin, stdout = encoder.stdin, encoder.stdout

    async def feed() -> None:
        try:
            stdin.write(first.pcm)
            await stdin.drain()
            async for item in chunks:
                if not isinstance(item, AudioChunk):
                    break  # the result: every chunk is in
                if item.attempt != first.attempt:
                    log.info("job %s: attempt %d started over; its stream ends here", job_id,
                             item.attempt)
                    break
                stdin.write(item.pcm)
                await stdin.drain()
        except PipelineError as exc:  # the job failed mid-stream: what was heard stays heard
            log.info("job %s: its stream ends early: %s", job_id, exc.code)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the encoder went away (the listener left and we killed it)
        finally:
            with contextlib.suppress(OSError):
                stdin.close()

    feeder = asyncio.create_task(feed())
    try:
        while block := await stdout.read(READ_BYTES):
            yield block
        await feeder
    finally:
        feeder.cancel()
        if encoder.returncode is None:
            encoder.kill()
        await encoder.wait()
        await client.close()


async def open_stream(handle: AsyncJobHandle, client: AsyncProducer) -> AsyncIterator[bytes]:
    """The MP3 byte stream of ``handle``'s job, once its first chunk is here (errors before
    that are raised, for an HTTP error answer); closes ``client`` on any exit."""
    chunks = handle.stream()
    try:
        first = await first_chunk(chunks)
    except BaseException:
        await client.close()
        raise
    if first is None:
        await client.close()
        raise no_stream(handle.id)
    return mp3_frames(first, chunks, client, handle.id)
