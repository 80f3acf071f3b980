"""The worker's health server in one process: /livez and /readyz from the gauges the job
processes write, /metrics beside them, and the next free port when the configured one is taken
(two workers on one host both export). The real worker is tests/integration/test_worker_health.py."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, Gauge

from workers import health


def get(port: int, path: str) -> tuple[int, dict[str, object] | str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            body = resp.read().decode()
            return resp.status, json.loads(body) if path != "/metrics" else body
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port something else listens on, whose next port is free (as far as can be known)."""
    while True:
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                busy.close()
                continue
        break
    busy.listen()
    yield port
    busy.close()


def test_live_and_ready_from_the_gauges_and_the_next_free_port(
        registry: CollectorRegistry, taken_port: int) -> None:
    beat = Gauge(health.HEARTBEAT, "", ["loop"], registry=registry)
    ready = Gauge(health.READY, "", ["model"], registry=registry)
    broker: list[str | None] = [None]
    app = health.HealthServer(registry, liveness_timeout_s=5, broker_ok=lambda: broker[0])
    server, port = health.serve(taken_port, "127.0.0.1", app, tries=2)
    try:
        assert port == taken_port + 1
        assert get(port, "/livez")[0] == 200  # no loop yet: nothing to be stuck in
        assert get(port, "/readyz") == (503, {"ok": False, "problems": [
            "no job process has loaded its model yet"]})
        ready.labels("tiny").set(1)
        assert get(port, "/readyz")[0] == 200
        broker[0] = "ConnectionError: refused"
        assert get(port, "/readyz") == (503, {"ok": False, "problems": [
            "broker: ConnectionError: refused"]})
        beat.labels("continuous").set(time.time())
        assert get(port, "/livez")[0] == 200
        beat.labels("continuous").set(time.time() - 6)  # its last tick is past the timeout
        status, body = get(port, "/livez")
        assert status == 503 and "loop continuous" in str(body)
        status, text = get(port, "/metrics")
        assert status == 200 and health.HEARTBEAT in str(text)
    finally:
        server.shutdown()
        server.server_close()


def test_no_free_port_is_an_error(registry: CollectorRegistry, taken_port: int) -> None:
    app = health.HealthServer(registry, liveness_timeout_s=5, broker_ok=lambda: None)
    with pytest.raises(OSError):
        health.serve(taken_port, "127.0.0.1", app, tries=1)
