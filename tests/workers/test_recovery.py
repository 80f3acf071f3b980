"""Re-publishing a dead worker's messages, on real Redis through kombu's own Redis transport.

Messages are published by Celery and taken with kombu's ``basic_get`` without an ack, so they
sit in kombu's ``unacked`` hash and ``unacked_index`` exactly as a worker's would.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from pipeline.config import load_layered
from pipeline.config.schema import BrokerSettings, RecoverySettings, Settings
from pipeline.infra import keys
from pipeline.infra.celery_app import PipelineCelery, make_celery
from tests.integration.conftest import redis_url, wait_for  # noqa: F401 (the fixture)
from workers.heartbeat import Heartbeat, new_worker_id
from workers.recovery import (
    dead_after,
    enabled_for,
    recover_dead_workers,
    recover_worker,
    restore_tag,
    store_for,
)

# Dead after one second of silence, so a test waits for that state in about a second.
QUICK = RecoverySettings(heartbeat_interval=0.5, missed_beats=2, scan_interval=1)


@pytest.fixture
def app(redis_url: str) -> Iterator[PipelineCelery]:  # noqa: F811 (the imported fixture)
    built = make_celery(Settings(broker=BrokerSettings(url=redis_url), recovery=QUICK))
    yield built
    built.close()


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:  # noqa: F811
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture
def channel(app: PipelineCelery) -> Iterator[Any]:
    with app.connection_for_write() as conn:
        yield conn.default_channel


def queue_name() -> str:
    return f"test.recovery.{uuid.uuid4().hex[:8]}"


def waiting(client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The messages waiting on ``queue``, over all its priority lists."""
    return [json.loads(raw) for key in keys.queue_list_keys(queue)
            for raw in client.lrange(key, 0, -1)]


def take(app: PipelineCelery, channel: Any, queue: str, n: int) -> dict[str, str]:
    """Publish ``n`` messages to ``queue`` and take them unacked: delivery tag -> task id."""
    for i in range(n):
        app.send_task("musicgen.test", args=[{"n": i}], queue=queue, priority=3)
    taken = {}
    for _ in range(n):
        message = channel.basic_get(queue, no_ack=False)
        assert message is not None
        taken[str(message.delivery_tag)] = str(message.headers["id"])
    return taken


def unacked(client: redis.Redis, channel: Any, tag: str) -> bool:
    in_hash = client.hexists(channel.unacked_key, tag)
    in_index = client.zscore(channel.unacked_index_key, tag) is not None
    assert in_hash == in_index  # the two always move together
    return bool(in_hash)


def test_an_unacked_message_goes_back_to_its_queue_once(app: PipelineCelery, channel: Any,
                                                        client: redis.Redis) -> None:
    queue = queue_name()
    (tag, job), = take(app, channel, queue, 1).items()
    assert waiting(client, queue) == [] and unacked(client, channel, tag)
    assert restore_tag(channel, tag) is True
    back = waiting(client, queue)
    assert [m["headers"]["id"] for m in back] == [job]
    assert back[0]["headers"]["redelivered"] is True  # kombu's own re-publish marks it
    # Out of unacked: the broker's visibility restore will find nothing to hand out again.
    assert not unacked(client, channel, tag)
    assert restore_tag(channel, tag) is False
    assert len(waiting(client, queue)) == 1
    assert restore_tag(channel, "no-such-tag") is False


def test_two_restorers_racing_restore_each_message_once(app: PipelineCelery,
                                                        client: redis.Redis) -> None:
    queue = queue_name()
    with app.connection_for_write() as c1, app.connection_for_write() as c2:
        taken = take(app, c1.default_channel, queue, 12)
        restored: dict[str, list[str]] = {"a": [], "b": []}
        barrier = threading.Barrier(2)

        def restorer(name: str, channel: Any) -> None:
            barrier.wait()
            for tag in taken:
                if restore_tag(channel, tag):
                    restored[name].append(tag)

        threads = [threading.Thread(target=restorer, args=("a", c1.default_channel)),
                   threading.Thread(target=restorer, args=("b", c2.default_channel))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert sorted(restored["a"] + restored["b"]) == sorted(taken)  # each tag by exactly one
    assert sorted(m["headers"]["id"] for m in waiting(client, queue)) == sorted(taken.values())


def test_a_message_delivered_again_since_the_last_beat_is_left_alone(
        app: PipelineCelery, channel: Any, client: redis.Redis) -> None:
    """kombu keeps a message's tag across redeliveries: a tag newer than the dead worker's last
    beat belongs to whoever holds it now."""
    queue = queue_name()
    (tag, _), = take(app, channel, queue, 1).items()
    delivered = float(client.zscore(channel.unacked_index_key, tag))
    assert restore_tag(channel, tag, delivered_before=delivered - 60) is False
    assert unacked(client, channel, tag) and waiting(client, queue) == []
    assert restore_tag(channel, tag, delivered_before=delivered) is True


def test_a_dead_workers_jobs_are_recovered_and_a_live_one_is_never_touched(
        app: PipelineCelery, channel: Any, client: redis.Redis) -> None:
    store = store_for(app)
    queue = queue_name()
    taken = take(app, channel, queue, 3)
    dead_tags, live_tag = list(taken)[:2], list(taken)[2]
    dead = new_worker_id("dead@host")
    store.beat(dead, hostname="dead@host", held={t: taken[t] for t in dead_tags} | {"acked": "j0"},
               beat_local=time.time())
    live = Heartbeat(store, new_worker_id("live@host"), hostname="live@host",
                     interval=QUICK.heartbeat_interval, held=lambda: {live_tag: taken[live_tag]})
    live.start()
    try:
        wait_for(lambda: dead in store.silent(dead_after(app.settings)), 30,
                 "the dead worker to be silent for longer than the settings allow")
        found = recover_dead_workers(app, store)
        assert [(r.worker_id, r.restored, r.gone) for r in found] == [
            (dead, {t: taken[t] for t in dead_tags}, {"acked": "j0"})]
        assert found[0].silent_for > dead_after(app.settings)
        assert sorted(m["headers"]["id"] for m in waiting(client, queue)) == sorted(
            taken[t] for t in dead_tags)
        assert recover_dead_workers(app, store) == []  # its record is gone: nothing twice
        # The live worker has now beaten for longer than a silent one may: still untouched.
        born = store.now()
        while store.now() - born < 3 * dead_after(app.settings):
            assert recover_dead_workers(app, store, exclude=None) == []
            time.sleep(QUICK.heartbeat_interval / 2)  # paces the scans, asserts nothing by itself
        assert unacked(client, channel, live_tag)
    finally:
        live.stop()


def test_the_operator_recovers_a_named_worker(app: PipelineCelery, channel: Any,
                                              client: redis.Redis) -> None:
    store = store_for(app)
    queue = queue_name()
    (tag, job), = take(app, channel, queue, 1).items()
    worker = new_worker_id("gone@host")
    store.beat(worker, hostname="gone@host", held={tag: job}, beat_local=time.time())
    assert recover_worker(app, store, worker, dead_after(app.settings)) is None  # it just beat
    done = recover_worker(app, store, worker, -1)  # --force
    assert done is not None and done.restored == {tag: job}
    assert [m["headers"]["id"] for m in waiting(client, queue)] == [job]


def test_recovery_is_on_for_redis_only() -> None:
    assert enabled_for(Settings(broker=BrokerSettings(url="redis://127.0.0.1:6379/0")))
    assert enabled_for(Settings(broker=BrokerSettings(url="sentinel://127.0.0.1:26379")))
    assert not enabled_for(Settings(broker=BrokerSettings(
        url="amqp://guest@127.0.0.1:5672//", result_backend="redis://127.0.0.1:6379/0")))
    assert not enabled_for(Settings())  # the embedded broker: one process, nothing to recover
    assert not enabled_for(Settings(broker=BrokerSettings(url="redis://127.0.0.1:6379/0"),
                                    recovery=RecoverySettings(enabled=False)))


def test_defaults_recover_well_within_a_minute() -> None:
    settings = Settings()
    worst = dead_after(settings) + settings.recovery.scan_interval  # silence, then the next look
    assert worst <= 30 < settings.broker.visibility_timeout


def test_settings_refuse_a_silence_past_half_the_visibility_timeout() -> None:
    layered = load_layered("development", overrides={
        "broker.url": "redis://127.0.0.1:6379/0", "broker.visibility_timeout": 30,
        "worker.soft_time_limit": 20, "worker.hard_time_limit": 25,
        "worker.time_limit_per_second": 0, "recovery.missed_beats": 4})
    assert layered.settings is None
    problem = next(p for p in layered.report.errors if p.path == "recovery.heartbeat_interval")
    assert "visibility_timeout" in problem.rule


def test_the_cli_lists_workers_and_recovers_one_by_hand(app: PipelineCelery, channel: Any,
                                                        client: redis.Redis, redis_url: str,  # noqa: F811
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from pipeline.cli import app as cli

    store = store_for(app)
    queue = queue_name()
    (tag, job), = take(app, channel, queue, 1).items()
    worker = new_worker_id("ops@host")
    store.beat(worker, hostname="ops@host", held={tag: job}, beat_local=time.time(),
               engines={"tiny": "hf"})
    monkeypatch.setenv("MUSICGEN_BROKER__URL", redis_url)
    listed = CliRunner().invoke(cli, ["workers", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    row = next(r for r in json.loads(listed.output) if r["worker_id"] == worker)
    assert row["state"] == "alive" and row["jobs"] == [job] and row["hostname"] == "ops@host"
    assert row["engines"] == {"tiny": "hf"}
    text = CliRunner().invoke(cli, ["workers", "list"]).output
    assert f"holds {job}, serves tiny with hf" in text
    refused = CliRunner().invoke(cli, ["workers", "recover", worker])
    assert refused.exit_code == 1 and "--force" in refused.output  # it beat just now
    assert waiting(client, queue) == []
    forced = CliRunner().invoke(cli, ["workers", "recover", worker, "--force"])
    assert forced.exit_code == 0 and f"re-published 1 job(s): {job}" in forced.output
    assert [m["headers"]["id"] for m in waiting(client, queue)] == [job]
