"""URLs a caller hands us that a worker will later open: webhook targets and melody references.

Checked twice: their shape here, when a request or a spec is validated (scheme allowlist, no
credentials, a host, printable), and their host against the deployment's allowlist in
``resolve()`` and again by the worker before it connects, so a caller cannot make a worker call
an internal address. Standard library only: the producer side stays light.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import SplitResult, urlsplit

if TYPE_CHECKING:
    import urllib.request

MAX_URL_CHARS = 2048
WEBHOOK_SCHEMES = ("http", "https")
# A melody by reference: object storage the workers can read, or a public HTTPS host. Plain
# http is refused: the bytes would be conditioning input that anyone on the path could swap.
MELODY_SCHEMES = ("s3", "https")


def check_url(url: str, schemes: Iterable[str]) -> SplitResult:
    """The URL split, or ``ValueError`` saying what is wrong with it (for pydantic validators)."""
    allowed = tuple(schemes)
    if not url or len(url) > MAX_URL_CHARS:
        raise ValueError(f"a URL must be 1 to {MAX_URL_CHARS} characters")
    if any(unicodedata.category(ch).startswith("C") or ch.isspace() for ch in url):
        raise ValueError("a URL must not contain spaces, control or invisible characters")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number in range
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from exc
    if parts.scheme.lower() not in allowed:
        raise ValueError(f"the URL scheme must be one of {', '.join(allowed)}, "
                         f"not {parts.scheme or 'none'!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError("a URL must not carry credentials (user:password@)")
    if not parts.hostname:
        raise ValueError("the URL names no host")
    if port == 0:
        raise ValueError("the URL's port must not be 0")
    return parts


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """``host`` is one of ``patterns``: an exact name (case-insensitive), or ``*.example.com``
    for any subdomain of example.com (never example.com itself, nor notexample.com)."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".").strip("[]")  # [::1] is written as urlsplit gives it
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]) and len(host) > len(pattern) - 1:
                return True
        elif host == pattern:
            return True
    return False


def check_host_pattern(pattern: str) -> str:
    """An allowlist entry is a bare host name, IP address or ``*.domain``: no scheme, port or
    path (those would never match a host, and would silently allow nothing)."""
    bracketed = pattern.startswith("[") and pattern.endswith("]")  # an IPv6 literal
    if not pattern or (any(ch in pattern for ch in "/:@?# ") and not bracketed):
        raise ValueError(f"{pattern!r} is not a host name (write example.com or *.example.com, "
                         "without a scheme, port or path)")
    if "*" in pattern[2:] or ("*" in pattern and not pattern.startswith("*.")):
        raise ValueError(f"{pattern!r}: a wildcard is only allowed as a leading '*.'")
    return pattern



@functools.cache
def opener() -> urllib.request.OpenerDirector:
    """``urllib`` without redirects, for every URL a caller gave us (webhooks, melody URLs): a
    server that redirects could point a worker at an address the allowlist refuses, so a 3xx
    is answered as the error it is, never followed. Built on first use: ``import pipeline``
    does not load urllib.request."""
    return opener_with()


def opener_with(*handlers: Any) -> urllib.request.OpenerDirector:
    """An opener that follows no redirect, with ``handlers`` in place of urllib's defaults of
    the same kind (the SSRF guard's HTTP and HTTPS handlers: pipeline/contract/public_addresses.py)."""
    import urllib.request

    class NoRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    return urllib.request.build_opener(NoRedirects(), *handlers)
