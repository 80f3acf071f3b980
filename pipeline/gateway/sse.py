"""``GET /v1/jobs/{id}/events``: the job as Server-Sent Events.

A ``progress`` event each time the status, fraction or message changes, then one ``state``
event carrying the whole final job (``JobView``), and the stream ends. The handle is read every
``POLL_S`` in a worker thread (it reads Redis); a comment line every ``KEEPALIVE_S`` keeps
proxies from closing a stream whose job waits in the queue. If the backend cannot be read the
stream ends with an ``error`` event (the body of the error); a client reconnects to go on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
from fastapi.encoders import jsonable_encoder
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from pipeline.client.handle import JobHandle
from pipeline.contract.jobs import JobStatus
from pipeline.errors import PipelineError

POLL_S = 0.25
KEEPALIVE_S = 15.0


class EventStream(StreamingResponse):
    """A ``text/event-stream`` response (named so for the OpenAPI schema too)."""

    media_type = "text/event-stream"


def frame(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(jsonable_encoder(data))}\n\n".encode()


async def job_events(handle: JobHandle,
                     view_of: Callable[[JobHandle], dict[str, Any]]) -> AsyncIterator[bytes]:
    """The frames of one job's stream, from now until it is final."""
    last: tuple[Any, ...] | None = None
    quiet = 0.0
    while True:
        try:
            view = await run_in_threadpool(view_of, handle)
        except PipelineError as exc:
            yield frame("error", exc.to_dict())
            return
        status = JobStatus(view["status"])
        if status.finished:
            yield frame("state", view)
            return
        seen = (status, view["progress"]["fraction"], view["progress"]["message"])
        if seen != last:
            last, quiet = seen, 0.0
            yield frame("progress", {"id": view["id"], "status": status,
                                     "progress": view["progress"]})
        elif quiet >= KEEPALIVE_S:
            quiet = 0.0
            yield b": keepalive\n\n"
        await anyio.sleep(POLL_S)
        quiet += POLL_S


def event_stream(handle: JobHandle,
                 view_of: Callable[[JobHandle], dict[str, Any]]) -> EventStream:
    # no-cache and no proxy buffering: each event must reach the browser when it happens.
    return EventStream(job_events(handle, view_of),
                       headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
