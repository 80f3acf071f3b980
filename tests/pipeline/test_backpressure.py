"""Backpressure: queue depth as kombu's Redis transport stores it, and the fail-fast policy."""

from __future__ import annotations

import pickle

import pytest
import redis
from kombu import Connection, Exchange, Queue

from pipeline.errors import Backpressure, ServiceUnavailable
from pipeline.infra import keys
from pipeline.policies import BackpressurePolicy, queue_depth


def test_depth_sums_every_priority_list(redis_client: redis.Redis, key_prefix: str) -> None:
    queue = f"{key_prefix}musicgen"
    redis_client.lpush(queue, "a", "b")
    redis_client.lpush(f"{queue}\x06\x163", "c", "d", "e")
    redis_client.lpush(f"{queue}\x06\x169", "f")
    redis_client.lpush(f"{queue}\x06\x165", "g")  # not a step of kombu's default (0, 3, 6, 9)
    redis_client.lpush(f"{queue}-other", "h")  # another queue
    assert queue_depth(redis_client, queue) == 7  # ours: one list per level
    assert queue_depth(redis_client, queue, priority_steps=(0, 3, 6, 9)) == 6
    assert queue_depth(redis_client, queue, priority_steps=[0]) == 2


def test_depth_of_a_missing_queue_is_zero(redis_client: redis.Redis, key_prefix: str) -> None:
    assert queue_depth(redis_client, f"{key_prefix}nothing-here") == 0


def test_key_names_match_kombu_transport() -> None:
    from kombu.transport import redis as kombu_redis

    from pipeline.config import Settings
    from pipeline.infra.celery_app import make_celery

    assert keys.KOMBU_PRIORITY_SEP == kombu_redis.Channel.sep
    assert keys.queue_list_keys("q", kombu_redis.PRIORITY_STEPS) == [
        "q", "q\x06\x163", "q\x06\x166", "q\x06\x169"]
    assert keys.queue_list_keys("q")[:3] == ["q", "q\x06\x161", "q\x06\x162"]
    # What the broker is told is what the depth counts.
    app = make_celery(Settings.model_validate({"broker": {"url": "redis://127.0.0.1:6379/0"}}))
    assert tuple(app.conf.broker_transport_options["priority_steps"]) == keys.KOMBU_PRIORITY_STEPS


@pytest.mark.parametrize("steps", [(0, 3, 6, 9), tuple(range(10))])
def test_depth_counts_what_kombu_really_published(redis_client: redis.Redis, redis_url: str,
                                                  key_prefix: str,
                                                  steps: tuple[int, ...]) -> None:
    name = f"{key_prefix}kombu"
    priorities = [0, 1, 3, 5, 7, 9, 9]
    try:
        with Connection(redis_url, transport_options={"priority_steps": list(steps)}) as conn:
            exchange = Exchange(name, type="direct")
            queue = Queue(name, exchange, routing_key=name, max_priority=9)
            producer = conn.Producer()
            for p in priorities:
                producer.publish({"p": p}, exchange=exchange, routing_key=name,
                                 declare=[queue], priority=p)
            kombu_size = conn.default_channel._size(name)
        lists = {k.decode() for k in redis_client.scan_iter(match=f"{name}*")}
        assert lists <= set(keys.queue_list_keys(name, steps))
        assert any(keys.KOMBU_PRIORITY_SEP in k for k in lists)  # the priority lists exist
        assert queue_depth(redis_client, name, priority_steps=steps) == len(priorities)
        assert kombu_size == len(priorities)
    finally:
        # kombu's own keys (the queue lists, `_kombu.binding.<exchange>`) carry our unique name
        own = list(redis_client.scan_iter(match=f"*{name}*"))
        if own:
            redis_client.delete(*own)
    assert list(redis_client.scan_iter(match=f"*{name}*")) == []


def test_policy_refuses_at_the_threshold() -> None:
    policy = BackpressurePolicy(threshold=50)
    policy.check("musicgen", 49)
    with pytest.raises(Backpressure) as caught:
        policy.check("musicgen", 50)
    err = caught.value
    assert isinstance(err, ServiceUnavailable)  # callers catching the parent see it too
    assert err.code == "backpressure"
    assert err.details == {"queue": "musicgen", "depth": 50, "threshold": 50}
    assert "50 jobs waiting (limit 50)" in err.message
    assert pickle.loads(pickle.dumps(err)).details == err.details


@pytest.mark.parametrize("threshold", [0, -1])
def test_threshold_zero_or_less_disables_it(threshold: int) -> None:
    def allowed(policy: BackpressurePolicy) -> list[int]:
        passed = []
        for depth in (0, 1, 50, 10**9):
            try:
                policy.check("musicgen", depth)
            except Backpressure:
                continue
            passed.append(depth)
        return passed

    assert allowed(BackpressurePolicy(1)) == [0]  # an enabled check refuses these depths...
    assert allowed(BackpressurePolicy(threshold)) == [0, 1, 50, 10**9]  # ...a disabled one none


def test_policy_with_a_real_queue(redis_client: redis.Redis, key_prefix: str) -> None:
    queue = f"{key_prefix}musicgen"
    policy = BackpressurePolicy(threshold=3)
    redis_client.lpush(queue, "a", "b")
    assert queue_depth(redis_client, queue) == 2
    policy.check(queue, queue_depth(redis_client, queue))  # two waiting: a third may join
    redis_client.lpush(f"{queue}\x06\x166", "c")  # a priority list counts as well
    with pytest.raises(Backpressure) as caught:
        policy.check(queue, queue_depth(redis_client, queue))
    assert caught.value.details == {"queue": queue, "depth": 3, "threshold": 3}
