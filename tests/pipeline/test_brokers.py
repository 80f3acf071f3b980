"""What differs per broker (pipeline/infra/brokers.py): schemes, Celery's settings, priorities, the Redis
of our own keys, secrets; then the real RabbitMQ (a vhost of our own): queues declared with
priorities, served most urgent first, and the state ``settings check`` and ``health`` report."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kombu.connection import Connection

from pipeline.config.checks import Status, check_broker
from pipeline.config.schema import Settings
from pipeline.infra import brokers, keys
from pipeline.infra.brokers import BrokerKind, celery_priority, kind_of
from pipeline.infra.celery_app import make_celery
from tests.integration import rabbitmq

RESULTS = "redis://127.0.0.1:6379/0"


def amqp_settings(url: str = "amqp://guest@127.0.0.1:5672/mg", **broker: object) -> Settings:
    return Settings.model_validate({"broker": {"url": url, "password": "guest",
                                               "result_backend": RESULTS, **broker}})


@pytest.mark.parametrize(("url", "kind"), [
    (None, BrokerKind.embedded), ("redis://h:6379/0", BrokerKind.redis),
    ("rediss://h:6380/0", BrokerKind.redis), ("sentinel://a:26379;sentinel://b:26379", BrokerKind.sentinel),
    ("amqp://u@h:5672/v", BrokerKind.amqp), ("amqps://u@h:5671/v", BrokerKind.amqp),
    ("pyamqp://u@h//", BrokerKind.amqp), ("AMQP://u@h//", BrokerKind.amqp)])
def test_the_scheme_chooses_the_broker(url: str | None, kind: BrokerKind) -> None:
    assert kind_of(url) is kind


@pytest.mark.parametrize("url", ["kafka://h:9092", "sqs://", "h:6379"])
def test_an_unknown_scheme_is_refused_by_name(url: str) -> None:
    with pytest.raises(ValueError, match="unsupported broker scheme"):
        kind_of(url)


def test_priorities_keep_their_order_on_both_brokers() -> None:
    # Redis (kombu) serves 0 first; RabbitMQ serves the highest first, up to x-max-priority.
    redis_order = sorted(range(10), key=lambda p: celery_priority(BrokerKind.redis, p))
    amqp_order = sorted(range(10), key=lambda p: -celery_priority(BrokerKind.amqp, p))
    assert redis_order == amqp_order == list(range(9, -1, -1))
    assert {celery_priority(BrokerKind.amqp, p) for p in range(10)} == set(range(keys.AMQP_MAX_PRIORITY + 1))
    assert {celery_priority(BrokerKind.redis, p) for p in range(10)} == set(keys.KOMBU_PRIORITY_STEPS)


def test_rabbitmq_conf_priorities_no_visibility_timeout_results_on_redis() -> None:
    settings = amqp_settings(result_backend_password="r-secret", heartbeat=15)
    conf = make_celery(settings).conf
    assert conf.broker_url == "amqp://guest:guest@127.0.0.1:5672/mg"
    assert conf.result_backend == "redis://:r-secret@127.0.0.1:6379/0"  # its own password
    assert conf.task_queue_max_priority == keys.AMQP_MAX_PRIORITY == 9
    assert conf.broker_heartbeat == 15
    assert "visibility_timeout" not in conf.broker_transport_options  # a Redis matter
    assert conf.broker_transport_options["confirm_publish"] is True
    assert conf.task_acks_late and conf.task_reject_on_worker_lost  # requeue on consumer loss
    app = make_celery(settings)
    assert app.coordination_url == "redis://:r-secret@127.0.0.1:6379/0"  # our keys on the results Redis


def test_rabbitmq_quorum_queues_drop_priorities() -> None:
    conf = make_celery(amqp_settings(queue_type="quorum")).conf
    assert conf.task_default_queue_type == "quorum"
    assert conf.task_create_missing_queue_type == "quorum"  # the per-model queues
    assert conf.task_queue_max_priority is None


def test_redis_conf_is_unchanged_and_keeps_its_visibility_timeout() -> None:
    settings = Settings.model_validate({"broker": {"url": "redis://127.0.0.1:6379/3", "password": "pw"}})
    conf = make_celery(settings).conf
    assert conf.broker_url == conf.result_backend == "redis://:pw@127.0.0.1:6379/3"
    assert conf.broker_transport_options["visibility_timeout"] == 3900
    assert conf.broker_transport_options["priority_steps"] == list(range(10))
    assert conf.task_queue_max_priority is None
    assert brokers.coordination_url(settings) == "redis://:pw@127.0.0.1:6379/3"


def test_sentinel_urls_for_broker_results_and_rate_limits() -> None:
    url = "sentinel://10.0.0.1:26379/2;sentinel://10.0.0.2:26379/2"
    settings = Settings.model_validate({"broker": {"url": url, "password": "pw", "master_name": "music"}})
    conf = make_celery(settings).conf
    assert conf.broker_url == ("sentinel://:pw@10.0.0.1:26379/2;sentinel://:pw@10.0.0.2:26379/2")
    assert conf.result_backend == conf.broker_url  # Celery's sentinel result backend
    assert conf.broker_transport_options["master_name"] == "music"
    assert conf.result_backend_transport_options["master_name"] == "music"
    assert brokers.limits_storage_uri(conf.broker_url, "music") == \
        "redis+sentinel://:pw@10.0.0.1:26379,10.0.0.2:26379/music"
    assert brokers.shown_url(conf.broker_url) == \
        "sentinel://:**@10.0.0.1:26379/2;sentinel://:**@10.0.0.2:26379/2"


def test_no_password_is_printed() -> None:
    settings = amqp_settings(password="amqp-Secret-0123456789", result_backend_password="redis-Secret-0123")
    text = repr(settings) + str(settings.model_dump()) + settings.model_dump_json()
    assert "amqp-Secret" not in text and "redis-Secret" not in text
    state = brokers.BrokerState(BrokerKind.amqp, brokers.shown_url(make_celery(settings).conf.broker_url),
                                reachable=False, error="x")
    assert "amqp-Secret" not in state.line() and "**" in state.where


def test_results_url_without_a_backend_is_an_error_with_rabbitmq() -> None:
    settings = Settings.model_validate({"broker": {"url": "amqp://guest@127.0.0.1//"}})
    with pytest.raises(ValueError, match="broker.result_backend is required"):
        brokers.results_url(settings)


def test_consumer_timeout_check_warns_when_a_job_could_outlive_it() -> None:
    # worker defaults: the longest job (generation.max_duration) has a 600 s hard limit.
    ok = [r for r in check_broker(amqp_settings("amqp://guest@127.0.0.1:1/mg", connect_timeout=1),
                                  queues=[]) if r.name == "broker.consumer_timeout"]
    assert ok[0].status is Status.ok and "consumer_timeout = 1800000" in ok[0].detail
    short = amqp_settings("amqp://guest@127.0.0.1:1/mg", connect_timeout=1, consumer_timeout=300)
    [warn] = [r for r in check_broker(short, queues=[]) if r.name == "broker.consumer_timeout"]
    assert warn.status is Status.warn and "rabbitmq.conf" in warn.detail and "600 s" in warn.detail


# --- the real RabbitMQ, on a vhost of our own ------------------------------------------------

@pytest.fixture(scope="module")
def vhost() -> Iterator[str]:
    name = rabbitmq.add_vhost("mg-unit")
    yield name
    rabbitmq.delete_vhost(name)


def test_queues_carry_priorities_and_the_most_urgent_job_comes_first(vhost: str) -> None:
    settings = amqp_settings(rabbitmq.amqp_url(vhost))
    app = make_celery(settings)
    queue = "musicgen.prio-test"
    for request_priority in (1, 9, 5):
        app.send_task("musicgen.generate", args=[{"p": request_priority}], queue=queue,
                      priority=celery_priority(BrokerKind.amqp, request_priority),
                      ignore_result=True)  # no result subscription: nothing to wait for here
    assert app.queue_depth(queue) == 3
    listed = rabbitmq.ctl("list_queues", "-p", vhost, "name", "arguments", "durable").stdout
    line = next(row for row in listed.splitlines() if row.startswith(queue))
    assert '"x-max-priority",9' in line and line.rstrip().endswith("true")  # durable
    order = []
    with Connection(app.conf.broker_url) as conn:
        channel = conn.channel()
        for _ in range(3):
            message = channel.basic_get(queue, no_ack=True)
            order.append(message.headers["argsrepr"])
    assert order == ["[{'p': 9}]", "[{'p': 5}]", "[{'p': 1}]"]
    assert app.queue_depth(queue) == 0
    assert app.queue_depth("musicgen.never-declared") == 0
    app.close()


def test_state_names_the_server_and_its_depths_and_an_unreachable_one(vhost: str) -> None:
    settings = amqp_settings(rabbitmq.amqp_url(vhost))
    app = make_celery(settings)
    app.send_task("musicgen.generate", args=[{}], queue="musicgen.state-test", priority=5,
                  ignore_result=True)
    app.close()
    state = brokers.broker_state(settings, ["musicgen.state-test", "musicgen.none"])
    assert state.reachable and state.kind is BrokerKind.amqp
    assert state.version is not None and state.version.startswith("RabbitMQ 3.")
    assert state.depths == {"musicgen.state-test": 1, "musicgen.none": 0}
    assert "guest:guest" not in state.where
    down = brokers.broker_state(amqp_settings("amqp://guest@127.0.0.1:1/x", connect_timeout=1),
                                ["musicgen.tiny"])
    assert not down.reachable and down.error and down.depths == {"musicgen.tiny": None}
    rows = {r.name: r for r in check_broker(settings, queues=["musicgen.state-test"])}
    assert rows["broker"].status is Status.ok and "RabbitMQ 3." in rows["broker"].detail
    assert rows["result backend"].status is Status.ok
