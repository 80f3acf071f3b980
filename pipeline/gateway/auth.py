"""Who is calling: an API key (``Authorization: Bearer mgp_...``) names the user every job is
enqueued and looked up for, so quotas apply and a key sees only its own jobs. Each key is
held to ``api.rate`` requests per window.

With ``api.auth = false`` (development only: a settings rule refuses it elsewhere) every
request acts for the user ``anonymous``. The key itself is never logged: the access log gets
its public label (``mgp_1a2b3c4d``) from ``request.state``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import MutableHeaders
from starlette.types import Message, Scope

from pipeline.errors import RateLimited, Unauthorized
from pipeline.gateway.keystore import ApiKeyStore, masked
from pipeline.gateway.url_tokens import UrlSigner
from pipeline.infra.keys import API_RATE_PREFIX
from pipeline.policies.rate_limit import GlobalRateLimit, RateWindow

ANONYMOUS = "anonymous"

bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                    description="an API key from `musicgen-pipeline keys create USER`")


@dataclass(frozen=True)
class Caller:
    """The user a request acts for, and the key's public label (None with auth off)."""

    user_id: str
    key_label: str | None


class KeyRate:
    """``api.rate`` per API key, shared by every gateway process on the same storage."""

    def __init__(self, rate: str | None, storage_uri: str) -> None:
        self.rate = rate
        self._limit = (GlobalRateLimit(rate, storage_uri=storage_uri, key_prefix=API_RATE_PREFIX)
                       if rate else None)

    def check(self, key: str) -> RateWindow | None:
        """Take one request of ``key``'s rate: where the key then stands (None without a rate);
        ``RateLimited`` (with ``retry_after``) past the rate; ``ServiceUnavailable`` when the
        storage cannot be reached."""
        if self._limit is None:
            return None
        wait = self._limit.try_acquire(key)
        if wait > 0:
            raise RateLimited(f"more than {self.rate} requests with this API key; retry in "
                              f"{math.ceil(wait)} s", None,
                              {"retry_after": wait, "rate": self.rate,
                               "limit": self._limit.item.amount})
        return self._limit.window(key)


def rate_headers(window: RateWindow) -> dict[str, str]:
    """The IETF draft's ``RateLimit-*`` fields (as GitHub and Cloudflare send them): the
    window's limit, what is left, and seconds until a slot frees."""
    return {"RateLimit-Limit": str(window.limit), "RateLimit-Remaining": str(window.remaining),
            "RateLimit-Reset": str(math.ceil(window.reset_s))}


def add_rate_headers(scope: Scope, message: Message) -> None:
    """Put the request's key's ``RateLimit-*`` headers on its response start ``message``: the
    JSON routes', the streams' and the errors' alike (``caller`` leaves the window in the
    request state; a response no key reached gets none, and a 429 says 0 left)."""
    window = (scope.get("state") or {}).get("rate_window")
    if message["type"] == "http.response.start" and window is not None:
        headers = MutableHeaders(scope=message)
        for name, value in rate_headers(window).items():
            headers[name] = value


@dataclass(frozen=True)
class Authenticator:
    """What the ``caller`` dependency needs, built once per app."""

    enabled: bool
    keys: ApiKeyStore
    rate: KeyRate
    signer: UrlSigner


def caller(request: Request,
           credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> Caller:
    """The dependency of every ``/v1/jobs`` route (sync: FastAPI runs it in its threadpool, so
    the key lookup's database read never blocks the event loop)."""
    auth: Authenticator = request.app.state.authenticator
    if not auth.enabled:
        who = Caller(ANONYMOUS, None)
    else:
        if credentials is None:
            raise Unauthorized("an API key is required: send `Authorization: Bearer <key>`",
                               "Authorization")
        request.state.key_label = masked(credentials.credentials)
        info = auth.keys.authenticate(credentials.credentials)
        who = Caller(info.user_id, info.label)
    return _rated(request, auth, who)


def caller_or_token(request: Request,
                    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
                    token: Annotated[str | None, Query(
                        max_length=512, description="a signed URL's token (the job view's "
                                                    "`signed_urls`), instead of the API key")]
                    = None) -> Caller:
    """``caller`` for one job's read-only routes (events, audio, partial), which also take the
    ``?token=`` of a signed URL (pipeline/gateway/url_tokens.py): the token acts for its user,
    on the job in the path only. An Authorization header, when sent, wins."""
    auth: Authenticator = request.app.state.authenticator
    if credentials is not None or token is None or not auth.enabled:
        return caller(request, credentials)
    user_id = auth.signer.user_of(token, str(request.path_params.get("job_id", "")))
    request.state.key_label = "signed-url"
    return _rated(request, auth, Caller(user_id, None))


def _rated(request: Request, auth: Authenticator, who: Caller) -> Caller:
    """``who``, once one request of its key's rate is taken (a signed URL's: its user's)."""
    try:
        request.state.rate_window = auth.rate.check(who.key_label or who.user_id)
    except RateLimited as over:  # the 429 says so in the same headers
        details = over.details if isinstance(over.details, dict) else {}
        request.state.rate_window = RateWindow(int(details.get("limit", 0)), 0,
                                               float(details.get("retry_after", 0.0)))
        raise
    return who
