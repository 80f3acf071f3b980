"""The asyncio client: enqueue, follow and await jobs from an event loop.

    import pipeline.aio

    client = pipeline.aio.AsyncProducer()            # or AsyncProducer(producer)
    handle = await client.enqueue(pipeline.GenerationRequest(prompt="rain", duration=8))
    async for progress in handle.events(timeout=600):
        print(progress.fraction, progress.message)
    result = await handle.wait()
    await client.close()

Waiting, the part that holds a coroutine for minutes, runs on ``redis.asyncio``: a handle
subscribes to the result backend's channel for its job (``pipeline.infra.changes``) and reads the
state when told it changed, with a slower fallback read so a missed message never hangs it.
Enqueueing is one short SQL transaction (the quota) and one broker publish, through client
libraries that block (SQLAlchemy's engine, kombu): it runs in a worker thread, as does the rare
read that must ask the ledger (a job the result backend has forgotten).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

from redis.exceptions import RedisError

from pipeline.client.handle import JobHandle, Progress, progress_of, report_change
from pipeline.client.producer import Producer, producer_for
from pipeline.client.streaming import BLOCK_S, READ_COUNT, StreamFollower, entries_of, no_stream
from pipeline.config.schema import Settings
from pipeline.contract.jobs import GenerationRequest, JobResult, JobStatus
from pipeline.contract.streams import AudioChunk
from pipeline.errors import JobTimeout, ServiceUnavailable, UnsupportedOption
from pipeline.infra.brokers import BrokerKind, kind_of, results_url
from pipeline.infra.changes import FALLBACK_S, POLL_S, channel_of
from pipeline.infra.keys import stream_key

__all__ = ["AsyncJobHandle", "AsyncProducer"]


def _async_redis(settings: Settings) -> Any:
    """A ``redis.asyncio`` client on the result backend (Sentinel: on its current master)."""
    import redis.asyncio

    url = results_url(settings)
    timeout = settings.broker.connect_timeout
    if kind_of(url) is not BrokerKind.sentinel:
        return redis.asyncio.Redis.from_url(url, socket_connect_timeout=timeout)
    from redis.asyncio.sentinel import Sentinel

    from pipeline.infra.brokers import _sentinel_parts

    hosts, db, password = _sentinel_parts(url)
    sentinel = Sentinel(hosts, socket_connect_timeout=timeout,
                        sentinel_kwargs={"socket_timeout": timeout, "password": password})
    return sentinel.master_for(settings.broker.master_name, db=db, password=password,
                               socket_connect_timeout=timeout)


class AsyncProducer:
    """The asyncio face of a ``Producer`` (the process's default one if none is given). One
    per event loop: its Redis connections belong to the loop that first uses them."""

    def __init__(self, producer: Producer | None = None, *,
                 settings: Settings | None = None) -> None:
        self.producer = producer if producer is not None else producer_for(settings)
        app = self.producer.app
        self._redis = None if app.embedded else _async_redis(self.producer.settings)

    async def close(self) -> None:
        """Close this client's Redis connections (the producer stays usable)."""
        if self._redis is not None:
            await self._redis.aclose()

    def wrap(self, handle: JobHandle) -> AsyncJobHandle:
        """The asyncio face of a blocking handle (one from ``Producer.get_job``, say)."""
        return AsyncJobHandle(handle, self._redis)

    async def enqueue(self, request: GenerationRequest) -> AsyncJobHandle:
        """``Producer.enqueue``, awaited: the same checks, errors and idempotency."""
        return self.wrap(await asyncio.to_thread(self.producer.enqueue, request))

    async def enqueue_many(self, requests: Sequence[GenerationRequest]) -> list[AsyncJobHandle]:
        """``Producer.enqueue_many``, awaited: all or nothing."""
        handles = await asyncio.to_thread(self.producer.enqueue_many, requests)
        return [self.wrap(handle) for handle in handles]

    async def get_job(self, job_id: str, user_id: str | None = None) -> AsyncJobHandle:
        """``Producer.get_job``, awaited."""
        return self.wrap(await asyncio.to_thread(self.producer.get_job, job_id, user_id))


class AsyncJobHandle:
    """A job followed from an event loop; ``sync`` is the blocking handle, for the calls that
    have no awaitable form here (download, open, cancel: ``await asyncio.to_thread(...)``)."""

    def __init__(self, handle: JobHandle, redis: Any) -> None:
        self.sync = handle
        self.id = handle.id
        self.replayed = handle.replayed
        self._redis = redis
        self._channel = None if redis is None else channel_of(handle._app, handle.id)

    def __repr__(self) -> str:
        return f"AsyncJobHandle({self.id!r})"

    async def _state(self) -> tuple[str, Any]:
        raw = None
        if self._redis is not None and self._channel is not None:
            try:
                raw = await self._redis.get(self._channel)
            except (RedisError, OSError) as exc:
                raise ServiceUnavailable(f"cannot reach the result backend for job {self.id} "
                                         f"({type(exc).__name__}); try again", None,
                                         {"retry_after": 5}) from exc
        if raw is None:  # not there (or no Redis): the claim and the ledger decide, blocking
            return await asyncio.to_thread(self.sync._state)
        meta = self.sync._app.backend.decode_result(raw)
        return str(meta["status"]), meta.get("result")

    async def status(self) -> JobStatus:
        """Where the job is now (``JobHandle.status``)."""
        state, info = await self._state()
        return await asyncio.to_thread(self.sync._status_of, state, info)

    async def progress(self) -> Progress:
        """How far generation has got (``JobHandle.progress``)."""
        return progress_of(*await self._state())

    async def result(self) -> JobResult | None:
        """The result, None while the job runs (``JobHandle.result()``)."""
        state, info = await self._state()
        return await asyncio.to_thread(self.sync._ended, state, info)

    async def _watch(self, timeout: float | None,
                     poll: float | None) -> AsyncGenerator[tuple[str, Any], None]:
        """The job's (state, info): now, then after each change, until the caller stops or
        ``timeout`` passes (``JobTimeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pubsub = None
        if self._redis is not None and self._channel is not None:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        fallback = poll if poll is not None else (FALLBACK_S if pubsub is not None else POLL_S)
        try:
            if pubsub is not None:
                await pubsub.subscribe(self._channel)
                await pubsub.get_message(timeout=1.0)  # the confirmation: subscribed from here
            while True:
                yield await self._state()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise JobTimeout(f"job {self.id} did not finish within {timeout:g} s "
                                     "(it is still queued or running)", "timeout")
                pause = fallback if left is None else min(fallback, left)
                if pubsub is None:
                    await asyncio.sleep(pause)
                elif await pubsub.get_message(timeout=pause) is not None:
                    while await pubsub.get_message(timeout=0):  # one read answers them all
                        pass
        except JobTimeout:  # a TimeoutError, hence an OSError: not the backend's failure
            raise
        except (RedisError, OSError) as exc:
            raise ServiceUnavailable(f"cannot reach the result backend for job {self.id} "
                                     f"({type(exc).__name__}); try again", None,
                                     {"retry_after": 5}) from exc
        finally:
            if pubsub is not None:
                await pubsub.aclose()

    def changes(self, timeout: float | None = None, *,
                poll: float | None = None) -> AsyncGenerator[tuple[str, Any], None]:
        """The job's stored (Celery state, info): now, after each change, and at least every
        ``poll`` seconds (default: the fallback read), until the caller stops or ``timeout``
        passes (``JobTimeout``). For a caller that builds its own view of each state (the
        gateway's event stream); close it with ``contextlib.aclosing``."""
        return self._watch(timeout, poll)

    async def events(self, timeout: float | None = None, *,
                     poll: float | None = None) -> AsyncIterator[Progress]:
        """Each new progress of the job, once, until it ends (the last is ``1.0, "done"`` for
        a job that succeeded; ``wait()`` then gives the result or raises the job's error)."""
        last: Progress | None = None
        async with aclosing(self._watch(timeout, poll)) as states:
            async for state, info in states:
                now = progress_of(state, info)
                if now != last:
                    yield now
                last = now
                if state in ("SUCCESS", "FAILURE", "REVOKED"):
                    return

    async def stream(self, timeout: float | None = None
                     ) -> AsyncIterator[AudioChunk | JobResult]:
        """A ``stream=True`` job's chunks as they arrive, then its result, or its error
        (``JobHandle.stream``, whose docstring says what each ends with)."""
        if self._redis is None:
            raise UnsupportedOption("streaming needs Redis; the embedded broker has none",
                                    "stream")
        deadline = None if timeout is None else time.monotonic() + timeout
        follower, key = StreamFollower(), stream_key(self.id)
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise JobTimeout(f"job {self.id} did not finish streaming within {timeout:g} s",
                                 "timeout")
            block = BLOCK_S if left is None else max(0.001, min(BLOCK_S, left))
            try:
                entries = entries_of(await self._redis.xread(
                    {key: follower.last_id}, count=READ_COUNT, block=round(block * 1000)))
            except (RedisError, OSError) as exc:
                raise ServiceUnavailable(f"cannot reach the result backend for job {self.id} "
                                         f"({type(exc).__name__}); try again", None,
                                         {"retry_after": 5}) from exc
            chunks, end = follower.take(entries)
            for chunk in chunks:
                yield chunk
            if end is not None and end.ok:
                yield await self.wait(None if deadline is None
                                      else max(0.0, deadline - time.monotonic()))
                return
            if entries and end is None:
                continue
            state, info = await self._state()
            done = await asyncio.to_thread(self.sync._ended, state, info)  # raises its error
            if done is not None:
                if end is None and not await self._redis.exists(key):
                    raise no_stream(self.id)
                yield done
                return

    async def wait(self, timeout: float | None = None, *, poll: float | None = None,
                   on_progress: Callable[[Progress], Any] | None = None) -> JobResult:
        """Until the job ends: its result, or ``JobFailed`` / ``JobCancelled``; ``JobTimeout``
        (a ``TimeoutError``) after ``timeout`` seconds. ``on_progress`` is called on change."""
        last: Progress | None = None
        async with aclosing(self._watch(timeout, poll)) as states:
            async for state, info in states:
                done = await asyncio.to_thread(self.sync._ended, state, info)
                if done is not None:
                    return done
                last = report_change(state, info, last, on_progress)
        raise AssertionError("unreachable: _watch ends only by raising")  # pragma: no cover
