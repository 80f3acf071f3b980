"""Backpressure: refuse new jobs while a queue's backlog is past a threshold.

A job queued behind a long backlog would only time out (or be abandoned by its caller) before a
GPU reaches it; failing fast with :class:`Backpressure` lets the caller back off or shed load.

The backlog is what kombu's Redis transport holds for the queue: one LIST per priority step
(names in :func:`pipeline.infra.keys.queue_list_keys`). Jobs a worker has already reserved (prefetched,
kept in kombu's ``unacked`` hash) are not counted: they are being worked on, not waiting.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from pipeline.errors import Backpressure
from pipeline.infra import keys


def queue_depth(redis_client: redis.Redis, queue: str, *,
                priority_steps: Sequence[int] = keys.KOMBU_PRIORITY_STEPS) -> int:
    """Jobs waiting in Celery queue ``queue``: the sum of LLEN over its priority lists.

    One pipelined round trip. ``priority_steps`` must match the broker's transport option of the
    same name (ours is every level, 0-9: pipeline/infra/keys.py). A deployment that sets kombu's
    ``global_keyprefix`` must pass the prefixed queue name.
    """
    pipe = redis_client.pipeline(transaction=False)
    for key in keys.queue_list_keys(queue, priority_steps):
        pipe.llen(key)
    return sum(int(n) for n in pipe.execute())


class BackpressurePolicy:
    """At most ``threshold`` jobs may wait in a queue; ``threshold <= 0`` disables the check."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold

    def __repr__(self) -> str:
        return f"BackpressurePolicy(threshold={self.threshold})"

    def check(self, queue: str, depth: int) -> None:
        """Raise :class:`Backpressure` if one more job would push ``queue`` past the threshold.

        ``details`` is ``{queue, depth, threshold}``. Producers racing each other may overshoot
        by a few jobs: the threshold is a guard against runaway backlogs, not an exact cap.
        """
        if self.threshold <= 0 or depth < self.threshold:
            return
        raise Backpressure(
            f"queue {queue!r} has {depth} jobs waiting (limit {self.threshold}); "
            f"new jobs would time out before a worker reached them, retry later",
            details={"queue": queue, "depth": depth, "threshold": self.threshold})
