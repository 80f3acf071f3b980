"""The queue exporter's figures against real Redis: jobs sent by the real Celery app at several
priorities, one of them taken and held unacked by a real kombu consumer, as a worker holds it."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import Settings
from pipeline.infra import keys
from pipeline.infra.celery_app import make_celery
from pipeline.ops.queue_metrics import QueueCollector, breaker_reader
from pipeline.policies.breaker import CircuitBreaker, RedisBreakerBackend

PRIORITIES = [0, 2, 5, 5, 9]


def values(registry: CollectorRegistry, name: str) -> dict[str, float]:
    return {s.labels["queue"]: s.value for f in registry.collect() for s in f.samples
            if s.name == name}


@pytest.fixture
def queue(redis_client: redis.Redis, key_prefix: str) -> Iterator[str]:
    name = f"{key_prefix}musicgen.tiny"
    yield name
    # The unacked entry of the held message, if the test failed before acking it.
    for tag, raw in redis_client.hgetall("unacked").items():
        if name.encode() in raw:
            redis_client.hdel("unacked", tag)
            redis_client.zrem("unacked_index", tag)


def test_depth_and_in_flight_of_jobs_at_several_priorities(redis_url: str, queue: str,
                                                           key_prefix: str) -> None:
    settings = Settings.model_validate({"broker": {"url": redis_url}})
    app = make_celery(settings)
    for priority in PRIORITIES:
        app.send_task("musicgen.generate", args=[{"prompt": str(priority)}], queue=queue,
                      priority=priority)
    other = f"{key_prefix}musicgen.other"
    registry = CollectorRegistry()
    registry.register(QueueCollector(settings, [queue, other]))
    assert values(registry, "musicgen_queue_depth") == {queue: 5, other: 0}
    assert values(registry, "musicgen_jobs_in_flight") == {queue: 0, other: 0}
    with app.connection_for_read() as conn:
        held = conn.SimpleQueue(queue, no_ack=False)
        message = held.get(timeout=5)  # taken, not acked: what a running job looks like
        try:
            assert values(registry, "musicgen_queue_depth") == {queue: 4, other: 0}
            assert values(registry, "musicgen_jobs_in_flight") == {queue: 1, other: 0}
        finally:
            message.ack()
            held.close()
    assert values(registry, "musicgen_jobs_in_flight") == {queue: 0, other: 0}


def test_breaker_state_of_each_model(redis_client: redis.Redis, redis_url: str,
                                     key_prefix: str) -> None:
    """A breaker opened by real failures in the shared Redis reads as open, the others closed."""
    sick, well = f"{key_prefix}sick", f"{key_prefix}well"
    settings = Settings.model_validate({"broker": {"url": redis_url}})
    cb = settings.circuit_breaker
    breaker = CircuitBreaker(sick, threshold=cb.threshold, reset_timeout=cb.reset_timeout,
                             backend=RedisBreakerBackend(redis_client))
    for _ in range(cb.threshold):
        breaker.record_failure()
    registry = CollectorRegistry()
    registry.register(QueueCollector(settings, [], breaker_reader(settings, [sick, well])))
    try:
        states = {(s.labels["model"], s.labels["state"]): s.value for f in registry.collect()
                  for s in f.samples if s.name == "musicgen_breaker_state"}
        assert states[(sick, "open")] == 1 and states[(sick, "closed")] == 0
        assert states[(well, "closed")] == 1 and states[(well, "open")] == 0
    finally:
        redis_client.delete(keys.breaker_key(sick))


def test_the_command_serves_them_and_says_when_the_broker_is_away(redis_url: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # A port nothing listens on: the exporter must say it cannot read, not report zero.
    with subprocess.Popen([sys.executable, "-m", "pipeline.cli", "queue-exporter", "--port",
                          str(port), "--address", "127.0.0.1", "-Q", "musicgen.tiny",
                          "--set", "broker.url=redis://127.0.0.1:1/0"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            assert proc.stdout is not None
            assert "exporting" in proc.stdout.readline()  # listening from here on
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
                text = resp.read().decode()
            samples = {s.name: s.value for f in text_string_to_metric_families(text)
                       for s in f.samples}
            assert samples["musicgen_queue_exporter_up"] == 0
            assert "musicgen_queue_depth" not in samples
        finally:
            proc.terminate()
            proc.wait(10)
