"""The event stream's framing and resume (pipeline/gateway/sse.py), on the embedded broker with
no worker: a test stores the job's states in the result backend as a worker would."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest

from pipeline.aio import AsyncProducer
from pipeline.gateway.sse import job_events

if TYPE_CHECKING:
    from .gateway_conftest import Gateway

pytest_plugins = ["tests.pipeline.gateway_conftest"]
pytestmark = pytest.mark.timeout(60)


def _fields(chunk: bytes) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in chunk.decode().strip().splitlines())


def test_events_carry_ids_and_a_reconnect_does_not_repeat_what_it_had(gateway: Gateway) -> None:
    key = gateway.key("eve")
    assert gateway.client.post("/v1/jobs", json={"prompt": "x", "job_id": "eve-1"},
                               headers=key).status_code == 202
    backend = gateway.producer.app.backend

    async def main() -> tuple[dict[str, str], dict[str, str], bool]:
        client = AsyncProducer(gateway.producer)
        handle = client.wrap(gateway.producer.get_job("eve-1"))
        first = job_events(handle)
        assert await anext(first) == b"retry: 2000\n\n"
        queued = _fields(await anext(first))
        await first.aclose()
        again = job_events(handle, last_event_id=queued["id"])
        assert await anext(again) == b"retry: 2000\n\n"
        pending = asyncio.ensure_future(anext(again))
        await asyncio.sleep(1.0)  # nothing new while the job stays queued (keepalive: 15 s)
        quiet = not pending.done()
        backend.store_result("eve-1", {"progress": 0.5, "message": "generating"}, "PROGRESS")
        moved = _fields(await asyncio.wait_for(pending, 30))
        await again.aclose()
        await client.close()
        return queued, moved, quiet

    queued, moved, quiet = asyncio.run(main())
    assert queued["event"] == "progress" and '"status": "queued"' in queued["data"]
    assert quiet, "a reconnect repeated the progress named by Last-Event-ID"
    assert moved["event"] == "progress" and '"fraction": 0.5' in moved["data"]
    assert moved["id"] != queued["id"] and len(moved["id"]) == 16

    backend.store_result("eve-1", None, "REVOKED")  # a worker's cancel of a running job
    final = gateway.client.get("/v1/jobs/eve-1/events",
                               headers={**key, "Last-Event-ID": moved["id"]}).text
    assert final.startswith("retry: 2000\n\nid: final\nevent: state\n")
    assert '"status": "cancelled"' in final
