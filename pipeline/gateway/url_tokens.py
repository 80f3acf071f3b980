"""Short-lived signed URLs for a job's event stream, audio and partial file: a browser's
``EventSource`` and ``<audio src>`` cannot send an ``Authorization`` header, so the job view
offers ``signed_urls`` that carry a ``?token=`` instead (the way S3's pre-signed URLs work).

A token is ``<expiry>.<user>.<signature>``: the expiry in epoch seconds, the user it acts for
(base64url), and an HMAC-SHA256 over the job id, the user and the expiry. It opens only that
job's read-only routes (events, audio, partial, stream), only until it expires, only as its user,
so a leaked URL gives away one job's audio for ``api.url_token_ttl_s`` at most; it can never
enqueue, cancel or list.

The key is ``api.url_token_secret`` when set; else one random key kept on the shared Redis
(``SET NX``: the first gateway process makes it, every other one reads the same, so a URL made
by one replica works on all of them); with no Redis (the embedded broker) a random key of this
process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import ServiceUnavailable, Unauthorized
from pipeline.infra.keys import URL_TOKEN_KEY

#: The routes a token opens, relative to the job's URL ("" is never one: no token reads a
#: job's view, so a leaked audio URL cannot list its request).
SIGNED_ROUTES = ("events", "audio", "partial", "stream")


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class UrlSigner:
    """Makes and checks the tokens of one key, read from ``key_source`` on first use (so a
    gateway starts while Redis is away; a route that needs the key then answers 503, as any
    route that needs Redis does)."""

    def __init__(self, key_source: Callable[[], bytes], ttl_s: int) -> None:
        self._key_source, self.ttl_s = key_source, ttl_s
        self._key: bytes | None = None

    def _signature(self, job_id: str, user_id: str, expires: int) -> str:
        if self._key is None:
            try:
                self._key = self._key_source()
            except Exception as exc:  # redis.ConnectionError and friends
                raise ServiceUnavailable("cannot read the signed URLs' key from Redis",
                                         None, {"cause": type(exc).__name__}) from exc
        message = f"{job_id}\n{user_id}\n{expires}".encode()
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest())

    def token(self, job_id: str, user_id: str, *, now: float | None = None) -> tuple[str, int]:
        """A token for ``user_id``'s job ``job_id`` and its expiry (epoch seconds)."""
        expires = int(time.time() if now is None else now) + self.ttl_s
        return (f"{expires}.{_b64(user_id.encode())}."
                f"{self._signature(job_id, user_id, expires)}", expires)

    def user_of(self, token: str, job_id: str, *, now: float | None = None) -> str:
        """The user a valid token for ``job_id`` acts for; ``Unauthorized`` (field ``token``)
        for a malformed, forged, expired or another job's token."""
        try:
            stamp, user_part, signed = token.split(".")
            expires, user_id = int(stamp), _unb64(user_part).decode()
        except (ValueError, UnicodeDecodeError) as exc:
            raise Unauthorized("the URL's token is malformed: ask the job's view for fresh "
                               "signed_urls", "token") from exc
        if not hmac.compare_digest(signed, self._signature(job_id, user_id, expires)):
            raise Unauthorized("the URL's token is not valid for this job", "token")
        if (time.time() if now is None else now) >= expires:
            raise Unauthorized("the URL's token has expired: ask the job's view for fresh "
                               "signed_urls", "token")
        return user_id

    def signed_urls(self, job_id: str, user_id: str, urls: dict[str, Any]) -> dict[str, Any]:
        """The view's ``signed_urls``: each of the job's token-able ``urls`` that it has now
        (audio once it succeeded, partial while one exists), with one token, and its expiry."""
        token, expires = self.token(job_id, user_id)
        signed: dict[str, Any] = {
            name: (f"{urls[name]}?token={token}" if urls.get(name) else None)
            for name in SIGNED_ROUTES}
        signed["expires_at"] = datetime.fromtimestamp(expires, UTC)
        return signed


def signing_key(secret: str | None, redis: Any) -> bytes:
    """``api.url_token_secret``'s bytes; else the key shared on Redis (made once, by whichever
    gateway process comes first); else, without Redis, a key of this process."""
    if secret:
        return secret.encode("utf-8")
    fresh = secrets.token_urlsafe(32)
    if redis is None:
        return fresh.encode("ascii")
    redis.set(URL_TOKEN_KEY, fresh, nx=True)
    shared = redis.get(URL_TOKEN_KEY)
    return shared if isinstance(shared, bytes) else str(shared).encode("ascii")
