"""``musicgen_queue_depth{queue}`` and ``musicgen_jobs_in_flight{queue}``, read from the broker.

What an autoscaler scales on, exported from one place (``musicgen-pipeline queue-exporter``)
rather than by every worker: the figures belong to the queue, not to a process, and must exist
while no worker runs at all (scaling from zero).

On Redis a plain list length undercounts twice over: kombu keeps one LIST per priority step
(``queue``, ``queue\\x06\\x161``, ... see pipeline/infra/keys.py), and a message a worker has taken
leaves the lists for kombu's ``unacked`` HASH until it is acked (``task_acks_late``: when the
job ends). So the depth is the sum over the priority lists, and the jobs in flight are the
``unacked`` entries routed to the queue: a queue with nothing waiting but a job running still
needs its worker. On RabbitMQ the depth is the queue's ready count; the unacked count is not
visible over AMQP (KEDA's RabbitMQ trigger reads it from the management API instead), so no
in-flight figure is exported there.

The collector reads the broker on each scrape: no loop, no state, nothing stale.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from pipeline.config.schema import Settings
from pipeline.infra.brokers import BrokerKind, kind_of, redis_client, url_with_password

log = logging.getLogger(__name__)

__all__ = ["QueueCollector", "breaker_reader", "redis_in_flight"]

#: kombu.transport.redis.Channel.unacked_key: the HASH of taken, unacked messages (tag -> JSON
#: ``[payload, exchange, routing_key]``).
KOMBU_UNACKED_KEY = "unacked"


def redis_in_flight(client: Any, queues: Sequence[str]) -> dict[str, int]:
    """Messages of each of ``queues`` that a worker holds unacked (reserved or running).

    Celery routes a message to its queue's own direct exchange with the queue's name as the
    routing key (no ``task_queues`` of ours changes that), so the routing key is the queue.
    """
    counts = dict.fromkeys(queues, 0)
    for raw in client.hvals(KOMBU_UNACKED_KEY):
        try:
            routing_key = str(json.loads(raw)[2])
        except (ValueError, IndexError, TypeError):  # not kombu's: nothing of ours to count
            continue
        if routing_key in counts:
            counts[routing_key] += 1
    return counts


def breaker_reader(settings: Settings, presets: Sequence[str]) -> Callable[[], dict[str, str]]:
    """A function returning each preset's circuit-breaker state, as the producers see it (the
    breakers live in the coordination Redis; none where circuit_breaker.enabled is off)."""
    from pipeline.infra.celery_app import make_celery
    from pipeline.policies.configured import Policies

    built: list[Policies] = []  # on the first read: the app connects, and the broker may be away

    def read() -> dict[str, str]:
        if not built:
            built.append(Policies.for_app(make_celery(settings)))
        policies = built[0]
        states: dict[str, str] = {}
        for preset in presets:
            breaker = policies.breaker(preset)
            if breaker is not None:
                states[preset] = breaker.state().value
        return states

    return read


class QueueCollector:
    """A Prometheus collector of the depth and in-flight jobs of ``queues`` on the broker, and of
    the breakers ``breakers`` reads (``breaker_reader``), if given."""

    def __init__(self, settings: Settings, queues: Sequence[str],
                 breakers: Callable[[], dict[str, str]] | None = None) -> None:
        self.settings = settings
        self.queues = list(queues)
        self.kind = kind_of(settings.broker.url)
        self.breakers = breakers

    def read(self) -> tuple[dict[str, int], dict[str, int] | None]:
        """(waiting per queue, in flight per queue or None where the broker cannot tell)."""
        if self.kind is BrokerKind.amqp:
            from pipeline.infra.brokers import broker_state

            state = broker_state(self.settings, self.queues)
            if not state.reachable:
                raise ConnectionError(state.error)
            return {q: int(n or 0) for q, n in state.depths.items()}, None
        from pipeline.policies.backpressure import queue_depth

        b = self.settings.broker
        client = redis_client(url_with_password(b.url or "", b.password), self.settings)
        try:
            depths = {q: queue_depth(client, q) for q in self.queues}
            return depths, redis_in_flight(client, self.queues)
        finally:
            client.close()

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("musicgen_queue_exporter_up",
                               "1 when the last scrape could read the broker")
        try:
            depths, in_flight = self.read()
        except Exception as exc:  # a scrape that cannot look says so instead of reporting 0
            log.warning("could not read the queues: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        depth = GaugeMetricFamily("musicgen_queue_depth", "Jobs waiting in the queue, all "
                                  "priorities", labels=["queue"])
        for queue, n in depths.items():
            depth.add_metric([queue], n)
        yield depth
        if in_flight is not None:
            flight = GaugeMetricFamily("musicgen_jobs_in_flight", "Jobs of the queue a worker "
                                       "holds (taken, not yet acked)", labels=["queue"])
            for queue, n in in_flight.items():
                flight.add_metric([queue], n)
            yield flight
        if self.breakers is not None:
            yield from self._breakers(self.breakers)

    @staticmethod
    def _breakers(read: Callable[[], dict[str, str]]) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        from pipeline.policies.breaker import BreakerState

        try:
            states = read()
        except Exception as exc:
            log.warning("could not read the circuit breakers: %s", exc)
            return
        # One series per state, 1 for the current one (a state set): alerts match state="open".
        family = GaugeMetricFamily("musicgen_breaker_state", "Circuit breaker of each model: 1 "
                                   "for its current state", labels=["model", "state"])
        for model, current in states.items():
            for state in BreakerState:
                family.add_metric([model, state.value], 1 if state.value == current else 0)
        yield family

