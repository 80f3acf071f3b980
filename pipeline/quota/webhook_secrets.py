"""Each user's own webhook signing secret, for receivers run by the deployment's customers.

A delivery for a user who has one is signed with it (and, for ``OVERLAP`` after a rotation,
with the secret it replaced too: Standard Webhooks sends space-separated signatures and a
receiver accepts any that matches), so one customer's receiver never holds the secret that
signs another's events. A user without one gets the deployment's ``webhooks.secret`` (internal
receivers). ``keys create`` makes a user's secret with their first key and shows it once;
``keys rotate-webhook-secret USER`` replaces it.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import partial

from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from pipeline.quota.tables import WebhookSecret

# How long the replaced secret still signs after a rotation: time for a receiver to switch.
OVERLAP = timedelta(hours=24)
_utcnow = partial(datetime.now, UTC)


def new_secret() -> str:
    """``whsec_`` and 32 random bytes in base64, the Standard Webhooks form."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


class WebhookSecrets:
    """Create, rotate and read users' signing secrets; safe to share between threads."""

    def __init__(self, engine: Engine, *, clock: Callable[[], datetime] = _utcnow) -> None:
        self._sessions = sessionmaker(engine, expire_on_commit=False)
        self._clock = clock

    def ensure(self, user_id: str) -> str | None:
        """Give ``user_id`` a secret if it has none: the new secret (to show once), or None
        when it already had one (it is never shown again)."""
        with self._sessions.begin() as s:
            if s.get(WebhookSecret, user_id) is not None:
                return None
            secret = new_secret()
            s.add(WebhookSecret(user_id=user_id, secret=secret, previous=None,
                                previous_until=None, rotated_at=self._clock()))
        return secret

    def rotate(self, user_id: str, *, overlap: timedelta = OVERLAP) -> str:
        """A new secret for ``user_id`` (the old one still signs for ``overlap``)."""
        now, secret = self._clock(), new_secret()
        with self._sessions.begin() as s:
            row = s.get(WebhookSecret, user_id)
            if row is None:
                s.add(WebhookSecret(user_id=user_id, secret=secret, previous=None,
                                    previous_until=None, rotated_at=now))
            else:
                row.previous, row.previous_until = row.secret, now + overlap
                row.secret, row.rotated_at = secret, now
        return secret

    def signing(self, user_id: str) -> list[str]:
        """The secrets a delivery for ``user_id`` is signed with now, newest first; empty when
        the user has none (the deployment's secret signs then)."""
        with self._sessions.begin() as s:
            row = s.get(WebhookSecret, user_id)
            if row is None:
                return []
            keep = row.previous is not None and row.previous_until is not None \
                and self._clock() < row.previous_until
            return [row.secret, *([row.previous] if keep and row.previous else [])]
