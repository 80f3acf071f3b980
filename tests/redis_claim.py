"""Claiming a database of the shared Redis for one test session (the policy tests and the
integration tests, each pytest-xdist process its own).

A database is free when it is empty, or when all it holds is debris of an earlier run of these
tests: kombu's queue bindings and the producer's replication fence, which a worker or producer
can write again after its session deleted its keys (a killed process's last declare). Only those
names, of this project's queues, count as debris; anything else means someone uses the database.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable

import redis

OWNER_KEY = "musicgen-tests:owner"
DEBRIS = ("_kombu.binding.musicgen.*", "_kombu.binding_permanent.musicgen.*",
          "_kombu.binding.test:*", "_kombu.binding_permanent.test:*",
          "musicgen:replication-fence")


def _debris(keys: Iterable[bytes]) -> list[bytes] | None:
    """The keys, if every one is debris; None otherwise."""
    found = []
    for key in keys:
        name = key.decode(errors="replace")
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in DEBRIS):
            return None
        found.append(key)
    return found


def claim(client: redis.Redis, token: str) -> bool:
    """Claim ``client``'s database with ``token`` (``SET NX``) if it is free; True if claimed."""
    if client.dbsize() > 100:  # someone's data: not worth scanning
        return False
    debris = _debris(client.scan_iter(count=1000))
    if debris is None or not client.set(OWNER_KEY, token, nx=True):
        return False
    if debris:
        client.delete(*debris)
    return True


def release(client: redis.Redis, token: str) -> None:
    """Delete every key of a database this session claimed (it was free, so all are ours)."""
    if client.get(OWNER_KEY) == token.encode():
        keys = list(client.scan_iter(count=1000))
        if keys:
            client.delete(*keys)
