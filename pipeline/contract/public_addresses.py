"""The SSRF guard for webhooks sent to any public host (``webhooks.public_hosts``).

A deployment's own customers name their receivers, so their hosts cannot all be listed in
``webhooks.allowed_hosts``. With ``public_hosts`` on, a host that is not listed is allowed when
every address its name resolves to is a public one: never loopback, private (RFC 1918, unique
local), carrier-grade NAT, link-local (which holds the cloud metadata service), multicast,
unspecified or reserved, whether written as IPv4, IPv6 or IPv4 inside IPv6.

Checked twice, like the allowlist: when the request is enqueued (a clear ``invalid_request``)
and when the worker connects. The second check is the one that counts: the name is resolved
again, and the connection is opened to the very addresses just checked, so a name that
answered a public address at enqueue and a private one at send (DNS rebinding) reaches
nothing. Standard library only: the producer side stays light.
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import urllib.request

# Cloud instance metadata services: link-local or private already, named for a clearer refusal.
METADATA = {ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254",
                                                "100.100.100.200", "169.254.170.2")}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class HostNotPublic(ValueError):
    """A host that is, or resolves to, an address a worker must not call; the message says
    which address and why."""


def refusal(address: Address) -> str | None:
    """Why a worker must not connect to ``address``, or None for a public address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
    if address in METADATA:
        return "a cloud metadata address"
    for kind, hit in (("loopback", address.is_loopback), ("link-local", address.is_link_local),
                      ("unspecified", address.is_unspecified), ("multicast", address.is_multicast),
                      ("private", address.is_private)):
        if hit:
            return f"a {kind} address"
    if not address.is_global:  # carrier-grade NAT (100.64/10), reserved, documentation ranges
        return "not a public address"
    return None


def public_addresses(host: str, port: int | None) -> list[tuple[Any, ...]]:
    """``getaddrinfo`` of ``host`` (TCP), once every address it gives is public.

    Raises ``HostNotPublic`` naming the first address refused (one private answer among public
    ones refuses the host: a round-robin name could hand the worker that one), and ``OSError``
    (``socket.gaierror``) when the name does not resolve."""
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # no IPv6 zone
        why = refusal(address)
        if why is not None:
            raise HostNotPublic(f"host {host!r} resolves to {address}, {why}")
    return infos


def _create_connection(address: tuple[str, int], timeout: Any = socket._GLOBAL_DEFAULT_TIMEOUT,  # type: ignore[attr-defined]
                       source_address: tuple[str, int] | None = None) -> socket.socket:
    """``socket.create_connection`` that connects only to the addresses it has just checked."""
    host, port = address
    last: OSError | None = None
    for family, kind, proto, _, sockaddr in public_addresses(host, port):
        sock = socket.socket(family, kind, proto)
        try:
            if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:  # type: ignore[attr-defined]
                sock.settimeout(timeout)
            if source_address is not None:
                sock.bind(source_address)
            sock.connect(sockaddr)
            return sock
        except OSError as exc:
            sock.close()
            last = exc
    raise last if last is not None else OSError(f"no address for {host!r}")


@functools.cache
def public_opener() -> urllib.request.OpenerDirector:
    """``remote_urls.opener()`` (no redirects), whose HTTP and HTTPS connections go only to
    public addresses, checked at connect time. No proxy: through one, the address checked
    would be the proxy's, not the receiver's."""
    import http.client
    import urllib.request

    from pipeline.contract.remote_urls import opener_with

    class PublicHTTP(http.client.HTTPConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = _create_connection

    class PublicHTTPS(http.client.HTTPSConnection):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._create_connection = _create_connection

    class HTTP(urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(PublicHTTP, req)

    class HTTPS(urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            return self.do_open(PublicHTTPS, req, context=self._context)  # type: ignore[attr-defined]

    return opener_with(urllib.request.ProxyHandler({}), HTTP(), HTTPS())
