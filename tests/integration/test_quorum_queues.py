"""A subset of the failure suite on RabbitMQ quorum queues (``broker.queue_type = "quorum"``), a
vhost of the session's own on the single local node: the cases whose promise depends on how the
queue redelivers (kill -9 mid-job, the poison cap, retries with backoff). The bodies are
test_failures.py's own; only the broker differs. One node cannot show a node loss: docs/operations.md
"What is promised when things fail" says what a three-node cluster adds.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from . import rabbitmq
from .conftest import QUORUM, RESULTS_FOR
from .test_failures import (
    test_kill_9_mid_job_redelivers_to_another_worker,
    test_poison_job_stops_at_the_redelivery_cap_and_the_queue_flows,
    test_transient_fault_retries_with_backoff_and_permanent_error_is_tried_once,
    workers,
)

__all__ = ["test_kill_9_mid_job_redelivers_to_another_worker",
           "test_poison_job_stops_at_the_redelivery_cap_and_the_queue_flows",
           "test_transient_fault_retries_with_backoff_and_permanent_error_is_tried_once",
           "workers"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def quorum_vhost(redis_url: str) -> Iterator[str]:
    """A vhost of its own: RabbitMQ refuses to redeclare a classic queue as a quorum one."""
    vhost = rabbitmq.add_vhost("mg-quorum")
    url = rabbitmq.amqp_url(vhost)
    RESULTS_FOR[url] = redis_url
    QUORUM.add(url)
    yield vhost
    rabbitmq.delete_vhost(vhost)


@pytest.fixture
def quorum_url(quorum_vhost: str) -> str:
    return rabbitmq.amqp_url(quorum_vhost)


@pytest.fixture
def broker_url(quorum_url: str) -> str:
    """Replaces conftest's two-broker parameter: every case here runs on quorum queues."""
    return quorum_url


def test_the_cases_above_ran_on_quorum_queues(quorum_vhost: str) -> None:
    """Collected after the imported cases (module order), it checks the queues they declared."""
    listed = rabbitmq.ctl("list_queues", "-p", quorum_vhost, "name", "type", "--quiet")
    assert listed.returncode == 0, listed.stderr
    types = dict(line.split("\t") for line in listed.stdout.strip().splitlines())
    assert types["musicgen.tiny"] == "quorum", types
