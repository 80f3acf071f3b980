"""The event stream's ``chunk`` events (pipeline/gateway/sse.py) for a ``stream=True`` job,
against real Redis: the chunks a worker published are told in order, live and after the job's
end, before the final ``state``; a reconnect's ``Last-Event-ID`` skips what the client had."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import redis
import redis.asyncio

from pipeline.aio import AsyncJobHandle
from pipeline.client.handle import JobHandle
from pipeline.contract.streams import StreamEnd
from pipeline.gateway.sse import chunk_events, job_events, with_chunks

from .test_handle_stream import WAIT, _chunk, _publish, _result, client, job  # noqa: F401

pytestmark = pytest.mark.timeout(60)


def _parse(frame: bytes) -> tuple[str | None, str | None, Any]:
    fields = dict(line.split(": ", 1) for line in frame.decode().strip().splitlines()
                  if ": " in line and not line.startswith(":"))
    data = json.loads(fields["data"]) if "data" in fields else None
    return fields.get("event"), fields.get("id"), data


def _events(handle: JobHandle, redis_url: str, last_event_id: str | None = None,
            until_chunk: int | None = None, then: Any = None) -> list[tuple[Any, Any, Any]]:
    async def read() -> list[tuple[Any, Any, Any]]:
        aio = redis.asyncio.Redis.from_url(redis_url)
        wrapped = AsyncJobHandle(handle, aio)
        told: list[tuple[Any, Any, Any]] = []
        try:
            frames = with_chunks(job_events(wrapped, last_event_id),
                                 chunk_events(wrapped, last_event_id))
            async for frame in frames:
                if frame.startswith((b"retry:", b":")):
                    continue
                told.append(_parse(frame))
                if told[-1][0] == "chunk" and told[-1][2]["index"] == until_chunk:
                    await asyncio.to_thread(then)  # the job goes on while the stream is open
            return told
        finally:
            await aio.aclose()

    return asyncio.run(asyncio.wait_for(read(), WAIT))


def test_chunks_are_told_live_then_the_final_state(job: JobHandle,  # noqa: F811
                                                   client: redis.Redis,  # noqa: F811
                                                   redis_url: str) -> None:
    _publish(client, job.id, _chunk(1, 0))

    def finish() -> None:
        _publish(client, job.id, _chunk(1, 1), _chunk(1, 2), StreamEnd(1, True))
        job._app.backend.store_result(job.id, _result(job.id), "SUCCESS")

    told = _events(job, redis_url, until_chunk=0, then=finish)
    chunks = [(event_id, data["index"]) for event, event_id, data in told if event == "chunk"]
    assert chunks == [("chunk-1-0", 0), ("chunk-1-1", 1), ("chunk-1-2", 2)]
    assert told[-1][0] == "state" and told[-1][2]["status"] == "succeeded"
    assert told[0][2]["seconds"] == pytest.approx(4 / 32000)

    again = _events(job, redis_url, last_event_id="chunk-1-0")
    assert [data["index"] for event, _, data in again if event == "chunk"] == [1, 2]
    assert again[-1][0] == "state"
