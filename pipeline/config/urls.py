"""Connection URLs: the password lives in a SecretStr setting, never in the URL setting."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr


def with_password(url: str, password: SecretStr | None) -> str:
    """``url`` with ``password`` put into its netloc (for the client library only: never log it)."""
    if password is None:
        return url
    parts = urlsplit(url)
    netloc = f"{parts.username or ''}:{password.get_secret_value()}@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
