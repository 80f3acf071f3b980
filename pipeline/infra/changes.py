"""Be told when a job's stored state changes, instead of reading it on a timer.

Celery's Redis result backend publishes every state it stores (QUEUED, STARTED, PROGRESS, the
end) on a channel named by the task's key (``RedisBackend._set``: SETEX, then PUBLISH on the
same key), so a waiter subscribed to that channel wakes on each change. A published message
can still be missed (a reconnect, a subscription made after the change), so a waiter always
reads the state itself after waking and also wakes every ``fallback`` seconds: a missed
message costs at most that long, never a hung wait. Keyspace notifications would need a
server setting this project does not own; the backend's own channel needs nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

#: How often a subscribed waiter reads the state anyway (seconds).
FALLBACK_S = 2.0
#: How often a waiter with no channel (the embedded broker's file backend) reads the state.
POLL_S = 0.25


class Changes(Protocol):
    def wait(self, timeout: float) -> None:
        """Return when the state may have changed, or after ``timeout`` seconds."""


class _Subscribed:
    def __init__(self, pubsub: Any, fallback: float) -> None:
        self.pubsub, self.fallback = pubsub, fallback

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + min(timeout, self.fallback)
        while (left := deadline - time.monotonic()) > 0:
            if self.pubsub.get_message(ignore_subscribe_messages=True, timeout=left) is not None:
                # Drain what else arrived: one read of the state answers them all.
                while self.pubsub.get_message(ignore_subscribe_messages=True, timeout=0):
                    pass
                return


class _Polled:
    def __init__(self, interval: float) -> None:
        self.interval = interval

    def wait(self, timeout: float) -> None:
        time.sleep(max(0.0, min(timeout, self.interval)))


def channel_of(app: Any, job_id: str) -> bytes | None:
    """The channel the app's result backend publishes ``job_id``'s states on; None for a
    backend that publishes nothing (not Redis)."""
    backend = app.backend
    if app.embedded or not hasattr(backend, "client") or not hasattr(backend, "get_key_for_task"):
        return None
    key: bytes = backend.get_key_for_task(job_id)
    return key


@contextmanager
def changes_of(app: Any, job_id: str, *, fallback: float | None = None) -> Iterator[Changes]:
    """Subscribe to ``job_id``'s state changes for the block. Subscribe first, then read the
    state: a change between the two is then a message, not a lost wake-up."""
    channel = channel_of(app, job_id)
    if channel is None:
        yield _Polled(POLL_S if fallback is None else fallback)
        return
    pubsub = app.backend.client.pubsub(ignore_subscribe_messages=True)
    try:
        pubsub.subscribe(channel)
        # Read the confirmation: once it is in, the server publishes to us (a state read
        # after this sees any change made before it; any later one arrives as a message).
        pubsub.get_message(timeout=1.0)
        yield _Subscribed(pubsub, FALLBACK_S if fallback is None else fallback)
    finally:
        pubsub.close()
