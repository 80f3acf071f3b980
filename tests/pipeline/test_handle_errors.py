"""Following a job while its Redis is unreachable: a typed ``ServiceUnavailable`` (with a retry
hint), never redis-py's own exception (issue 8, D: every failure of the public API is a
``PipelineError``)."""

from __future__ import annotations

import socket
import uuid
from pathlib import Path

import pytest
import redis

from pipeline.client.handle import JobHandle
from pipeline.client.registry import RedisJobRegistry
from pipeline.config import load_settings
from pipeline.errors import ServiceUnavailable
from pipeline.infra.celery_app import make_celery


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends: nobody listens


@pytest.fixture
def handle(redis_url: str, tmp_path: Path) -> JobHandle:
    settings = load_settings("development", cwd=tmp_path,
                             overrides={"broker.url": redis_url, "model.preset": "tiny"})
    app = make_celery(settings)
    dead = redis.Redis(host="127.0.0.1", port=_closed_port(), socket_connect_timeout=0.5)
    return JobHandle(uuid.uuid4().hex, app, RedisJobRegistry(dead))


def test_status_of_a_job_whose_registry_is_down_is_service_unavailable(handle: JobHandle) -> None:
    with pytest.raises(ServiceUnavailable) as refused:
        handle.status()  # an unknown id reads PENDING, then asks the (dead) registry
    assert refused.value.details == {"retry_after": 5}
    assert isinstance(refused.value.__cause__, redis.ConnectionError)


def test_result_and_cancel_are_typed_too(handle: JobHandle) -> None:
    with pytest.raises(ServiceUnavailable):
        handle.result()
    with pytest.raises(ServiceUnavailable):
        handle.cancel()
