"""API keys of the HTTP gateway, kept in the quota database (table ``api_keys``).

A key is ``mgp_<prefix>_<secret>``: the 8-hex-digit prefix is public (it names the key in
``keys list``, in access logs, and finds its row), the secret is 32 random bytes. Only a SHA-256
of the whole key is stored, so a copy of the database gives nobody a usable key. SHA-256 and not
a slow password hash (bcrypt, argon2) on purpose: those exist to make guessing a low-entropy
password expensive; a 256-bit random secret cannot be guessed at any hash speed, and a slow hash
would add ~100 ms to every request.

Needs SQLAlchemy only (no FastAPI): the ``keys`` command uses it without the ``api`` extra.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial

from pydantic import TypeAdapter, ValidationError
from sqlalchemy import Engine, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from pipeline.contract.jobs import UserId
from pipeline.errors import InvalidRequest, ServiceUnavailable, Unauthorized
from pipeline.quota.tables import ApiKey

SCHEME = "mgp"
_KEY = re.compile(rf"^{SCHEME}_([0-9a-f]{{8}})_([A-Za-z0-9_-]{{43}})$")
_PREFIX = re.compile(rf"^(?:{SCHEME}_)?([0-9a-f]{{8}})$")
# A revoked key keeps working in a process that admitted it this recently (other processes'
# revokes are only seen in the database); it spares every request a database round trip.
CACHE_SECONDS = 10.0
_CACHE_MAX = 4096
_USER = TypeAdapter(UserId)
_utcnow = partial(datetime.now, UTC)


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: never the key or its hash."""

    prefix: str
    user_id: str
    name: str | None
    created_at: datetime
    revoked_at: datetime | None

    @property
    def label(self) -> str:
        """How the key is named in output and logs: ``mgp_<prefix>``."""
        return f"{SCHEME}_{self.prefix}"


@dataclass(frozen=True)
class NewKey:
    """A key just created: ``key`` is shown once and never again."""

    key: str
    info: KeyInfo


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def masked(key: str) -> str:
    """A key as logs may show it: its public label, or ``mgp_?`` for anything malformed."""
    match = _KEY.match(key)
    return f"{SCHEME}_{match[1]}" if match else f"{SCHEME}_?"


def _info(row: ApiKey) -> KeyInfo:
    return KeyInfo(row.prefix, row.user_id, row.name, row.created_at, row.revoked_at)


class ApiKeyStore:
    """Create, list, revoke and check keys; safe to share between threads."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[KeyInfo, float]] = {}  # key hash -> (key, admitted until)

    def create(self, user_id: str, *, name: str | None = None) -> NewKey:
        """A new key for ``user_id``; the only time the whole key exists outside the caller."""
        try:
            user_id = _USER.validate_python(user_id)
        except ValidationError as exc:
            raise InvalidRequest(f"user_id: {exc.errors()[0]['msg']}", "user_id") from exc
        if name is not None and not 1 <= len(name) <= 64:
            raise InvalidRequest("a key's name must be 1 to 64 characters", "name")
        for _ in range(3):  # a clash of two 32-bit prefixes is rare; try a few before giving up
            prefix = secrets.token_hex(4)
            key = f"{SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
            row = ApiKey(prefix=prefix, key_hash=hash_key(key), user_id=user_id, name=name,
                         created_at=self._clock(), revoked_at=None)
            try:
                with self._db(), self._sessions.begin() as s:
                    s.add(row)
            except IntegrityError:
                continue
            return NewKey(key, _info(row))
        raise ServiceUnavailable("could not find a free key prefix; try again", "prefix")

    def list(self, user_id: str | None = None) -> list[KeyInfo]:
        """Every key (or one user's), oldest first, revoked ones included."""
        stmt = select(ApiKey).order_by(ApiKey.created_at, ApiKey.prefix)
        if user_id is not None:
            stmt = stmt.where(ApiKey.user_id == user_id)
        with self._db(), self._sessions.begin() as s:
            return [_info(row) for row in s.scalars(stmt)]

    def revoke(self, prefix: str) -> KeyInfo | None:
        """Revoke the key ``prefix`` (``mgp_1a2b3c4d`` or ``1a2b3c4d``); None if unknown.

        An already revoked key keeps its first revocation time.
        """
        match = _PREFIX.match(prefix.strip())
        if match is None:
            raise InvalidRequest(f"{prefix!r} is not a key prefix like {SCHEME}_1a2b3c4d",
                                 "prefix")
        with self._db(), self._sessions.begin() as s:
            s.execute(update(ApiKey).where(ApiKey.prefix == match[1], ApiKey.revoked_at.is_(None))
                      .values(revoked_at=self._clock()))
            row = s.get(ApiKey, match[1])
            info = _info(row) if row is not None else None
        with self._lock:  # this process stops admitting it at once
            self._cache = {h: v for h, v in self._cache.items() if v[0].prefix != match[1]}
        return info

    def authenticate(self, key: str) -> KeyInfo:
        """The key's owner, or ``Unauthorized`` (unknown, malformed or revoked: one message)."""
        digest = hash_key(key)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            return cached[0]
        match = _KEY.match(key)
        refused = Unauthorized("the API key is unknown or revoked", "Authorization")
        if match is None:
            raise refused
        with self._db(), self._sessions.begin() as s:
            row = s.get(ApiKey, match[1])
            info = _info(row) if row is not None else None
            stored = row.key_hash if row is not None else ""
        # Compared in constant time, so a response's timing says nothing about the hash.
        if info is None or info.revoked_at is not None or not hmac.compare_digest(stored, digest):
            raise refused
        with self._lock:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[digest] = (info, now + CACHE_SECONDS)
        return info

    @staticmethod
    @contextmanager
    def _db() -> Iterator[None]:
        """Database failures as the service's (503), naming only the driver's exception class:
        its message can hold hosts, users or values."""
        try:
            yield
        except IntegrityError:
            raise
        except SQLAlchemyError as exc:
            reason = type(getattr(exc, "orig", None) or exc).__name__
            hint = ("; run `musicgen-pipeline db upgrade` if the api_keys table is missing"
                    if "no such table" in str(exc) or "UndefinedTable" in reason else "")
            raise ServiceUnavailable(f"the API key database is unavailable ({reason}){hint}",
                                     None, {"retry_after": 5}) from exc
