"""Small per-job facts shared by producers and workers: id claims, cancel flags, deliveries.

An id claim makes enqueue idempotent (the same client job id twice gives one job); a cancel
flag stops a queued job before it starts and a running one at its next progress step (Celery's
revoke only reaches workers that are up, and only holds in their memory). The delivery counter
lets a worker see a poison job that has killed workers before.

Two backends with one interface: Redis (production) and a folder (the embedded development
broker, which has no Redis).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Protocol

from pipeline.keys import CANCEL_PREFIX, CLAIM_PREFIX, DELIVERY_PREFIX


class JobRegistry(Protocol):
    def claim(self, job_id: str, ttl: int) -> bool:
        """True for the first caller with this id, False for every later one."""

    def release(self, job_id: str) -> None:
        """Forget a claim whose job was never queued (enqueue failed after claiming)."""

    def exists(self, job_id: str) -> bool: ...

    def cancel(self, job_id: str, ttl: int) -> None: ...

    def is_cancelled(self, job_id: str) -> bool: ...

    def count_delivery(self, job_id: str, ttl: int) -> int:
        """Add one delivery of this job and return how many there have been."""


class RedisJobRegistry:
    def __init__(self, client: Any) -> None:
        self.client = client

    def claim(self, job_id: str, ttl: int) -> bool:
        return bool(self.client.set(CLAIM_PREFIX + job_id, str(time.time()), nx=True, ex=ttl))

    def release(self, job_id: str) -> None:
        self.client.delete(CLAIM_PREFIX + job_id)

    def exists(self, job_id: str) -> bool:
        return bool(self.client.exists(CLAIM_PREFIX + job_id))

    def cancel(self, job_id: str, ttl: int) -> None:
        self.client.set(CANCEL_PREFIX + job_id, "1", ex=ttl)

    def is_cancelled(self, job_id: str) -> bool:
        return bool(self.client.exists(CANCEL_PREFIX + job_id))

    def count_delivery(self, job_id: str, ttl: int) -> int:
        pipe = self.client.pipeline()
        pipe.incr(DELIVERY_PREFIX + job_id)
        pipe.expire(DELIVERY_PREFIX + job_id, ttl)
        return int(pipe.execute()[0])


class FileJobRegistry:
    """The same facts as files; O_EXCL creation makes the claim atomic on one machine."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, prefix: str, job_id: str) -> Path:
        return self.folder / f"{prefix.strip(':').replace(':', '.')}.{job_id}"

    def claim(self, job_id: str, ttl: int) -> bool:
        try:
            fd = os.open(self._path(CLAIM_PREFIX, job_id), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        os.close(fd)
        return True

    def release(self, job_id: str) -> None:
        self._path(CLAIM_PREFIX, job_id).unlink(missing_ok=True)

    def exists(self, job_id: str) -> bool:
        return self._path(CLAIM_PREFIX, job_id).exists()

    def cancel(self, job_id: str, ttl: int) -> None:
        self._path(CANCEL_PREFIX, job_id).touch()

    def is_cancelled(self, job_id: str) -> bool:
        return self._path(CANCEL_PREFIX, job_id).exists()

    def count_delivery(self, job_id: str, ttl: int) -> int:
        path = self._path(DELIVERY_PREFIX, job_id)
        with path.open("a") as fh:  # one byte per delivery: appends are atomic
            fh.write(".")
        return path.stat().st_size


def registry_for(app: Any) -> JobRegistry:
    """The registry that matches the app's broker."""
    if app.embedded:
        from pipeline.celery_app import embedded_dirs
        return FileJobRegistry(embedded_dirs(app.settings)["results"].parent / "registry")
    return RedisJobRegistry(app.redis)
