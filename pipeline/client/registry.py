"""Small per-job facts shared by producers and workers: id claims, cancel flags, deliveries.

An id claim makes enqueue idempotent (the same client job id twice gives one job) and records
the user who made it, so an id never hands one user's job to another; a cancel
flag stops a queued job before it starts and a running one at its next progress step (Celery's
revoke only reaches workers that are up, and only holds in their memory). The delivery counter
lets a worker see a poison job that has killed workers before.

Two backends with one interface: Redis (production) and a folder (the embedded development
broker, which has no Redis).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from pipeline.infra.keys import CANCEL_PREFIX, CLAIM_PREFIX, DELIVERY_PREFIX

# A claim that vanishes between a refused SET NX and the GET (released by a failed enqueue, or
# expired) is simply claimed again; more than a few such races in a row means something is off.
_CLAIM_TRIES = 5


class Claim(NamedTuple):
    """The answer to a claim: ``new`` when this call made it; ``owner`` the id's user and
    ``fingerprint`` the hash of the request that made it ("" for a claim written before
    requests were fingerprinted: it matches any request)."""

    new: bool
    owner: str
    fingerprint: str = ""


def _encode(owner: str, fingerprint: str) -> str:
    # One value, so the owner and the request appear together: a user id cannot hold a newline.
    return f"{owner}\n{fingerprint}" if fingerprint else owner


def _decode(value: str) -> tuple[str, str]:
    owner, _, fingerprint = value.partition("\n")
    return owner, fingerprint


class JobRegistry(Protocol):
    def claim(self, job_id: str, ttl: int, owner: str, fingerprint: str = "") -> Claim:
        """Claim the id for ``owner`` and the request ``fingerprint``; only the first caller
        gets ``new=True``, every later one learns who owns it and for which request (a claim
        written before owners were recorded reads as owner "")."""

    def release(self, job_id: str) -> None:
        """Forget a claim whose job was never queued (enqueue failed after claiming)."""

    def exists(self, job_id: str) -> bool: ...

    def owner(self, job_id: str) -> str | None:
        """The user who claimed the id; None when nobody holds it."""

    def cancel(self, job_id: str, ttl: int) -> None: ...

    def is_cancelled(self, job_id: str) -> bool: ...

    def count_delivery(self, job_id: str, ttl: int) -> int:
        """Add one delivery of this job and return how many there have been."""


class RedisJobRegistry:
    def __init__(self, client: Any) -> None:
        self.client = client

    def claim(self, job_id: str, ttl: int, owner: str, fingerprint: str = "") -> Claim:
        # SET NX + GET rather than one `SET NX GET`: that form needs Redis 7, and the loop makes
        # the pair safe against a claim released in between.
        key = CLAIM_PREFIX + job_id
        for _ in range(_CLAIM_TRIES):
            if self.client.set(key, _encode(owner, fingerprint), nx=True, ex=ttl):
                return Claim(True, owner, fingerprint)
            current = self._read(job_id)
            if current is not None:
                return Claim(False, *current)
        raise RuntimeError(f"the claim of job {job_id} kept vanishing")

    def release(self, job_id: str) -> None:
        self.client.delete(CLAIM_PREFIX + job_id)

    def exists(self, job_id: str) -> bool:
        return bool(self.client.exists(CLAIM_PREFIX + job_id))

    def owner(self, job_id: str) -> str | None:
        current = self._read(job_id)
        return None if current is None else current[0]

    def _read(self, job_id: str) -> tuple[str, str] | None:
        value = self.client.get(CLAIM_PREFIX + job_id)
        if value is None:
            return None
        return _decode(value.decode(errors="replace") if isinstance(value, bytes) else str(value))

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
    """The same facts as files; a hard link (which never replaces a file) makes the claim
    atomic on one machine, and the owner is in the file before the claim appears."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, prefix: str, job_id: str) -> Path:
        return self.folder / f"{prefix.strip(':').replace(':', '.')}.{job_id}"

    def claim(self, job_id: str, ttl: int, owner: str, fingerprint: str = "") -> Claim:
        path = self._path(CLAIM_PREFIX, job_id)
        draft = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        draft.write_text(_encode(owner, fingerprint), encoding="utf-8")
        try:
            for _ in range(_CLAIM_TRIES):
                try:
                    os.link(draft, path)
                    return Claim(True, owner, fingerprint)
                except FileExistsError:
                    current = self._read(job_id)
                    if current is not None:
                        return Claim(False, *current)
            raise RuntimeError(f"the claim of job {job_id} kept vanishing")
        finally:
            draft.unlink(missing_ok=True)

    def release(self, job_id: str) -> None:
        self._path(CLAIM_PREFIX, job_id).unlink(missing_ok=True)

    def exists(self, job_id: str) -> bool:
        return self._path(CLAIM_PREFIX, job_id).exists()

    def owner(self, job_id: str) -> str | None:
        current = self._read(job_id)
        return None if current is None else current[0]

    def _read(self, job_id: str) -> tuple[str, str] | None:
        try:
            text = self._path(CLAIM_PREFIX, job_id).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return None
        return _decode(text)

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
        from pipeline.infra.celery_app import embedded_dirs
        return FileJobRegistry(embedded_dirs(app.settings)["results"].parent / "registry")
    return RedisJobRegistry(app.redis)
