"""
Where the proxy listens: C{--port} and C{--admin-port} values as endpoints.

Everything here is composed from public Twisted API: C{serverFromString}
for Twisted's own endpoint syntax, C{proxyEndpoint} for the PROXY protocol,
C{TLSMemoryBIOFactory} for TLS on any endpoint, and
C{AdoptedStreamServerEndpoint} for the sockets a worker inherits.

Our syntax on top of Twisted's:

 - a bare port number is C{tcp:PORT}, or TLS on that port when a serving
   certificate is configured;
 - C{tls:ENDPOINT} puts the serving certificate on any endpoint;
 - C{haproxy:ENDPOINT} with a certificate reads the PROXY header first,
   in clear, and then terminates TLS on the same connection.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from ._config import ConfigError
from ._sni import ServerTLS

__all__ = [
    "admin_endpoint",
    "adopted_endpoint",
    "check_admin_port",
    "check_port",
    "server_endpoint",
]


def server_endpoint(
    reactor: Any, description: str, tls: ServerTLS | None
) -> IStreamServerEndpoint:
    """A C{--port} value as an endpoint; see the module docstring."""
    if description.startswith("tls:"):
        if tls is None:
            raise ConfigError(f"--port {description!r} needs --tls-cert and --tls-key")
        return _TLSEndpoint(_plain(reactor, description[len("tls:") :]), tls)
    if description.startswith("haproxy:") and tls is not None:
        # A load balancer's PROXY header comes first, in clear; TLS (with
        # our certificate) follows it on the same connection.
        inner = _plain(reactor, description[len("haproxy:") :])
        return _TLSEndpoint(proxyEndpoint(inner), tls)
    if description.isdigit() and tls is not None:
        endpoint: IStreamServerEndpoint = SSL4ServerEndpoint(
            reactor, int(description), tls
        )
        return endpoint
    return _plain(reactor, description)


def _plain(reactor: Any, description: str) -> IStreamServerEndpoint:
    if description.isdigit():
        description = f"tcp:{description}"
    try:
        parsed: IStreamServerEndpoint = serverFromString(reactor, description)
    except Exception as e:  # parsers raise anything from KeyError to IndexError
        hint = ""
        if "systemd:" in description:
            hint = "; systemd passed no such socket (LISTEN_FDS)"
        raise ConfigError(
            f"--port {description!r} is not a usable endpoint description "
            f"({type(e).__name__}: {e}{hint})"
        ) from None
    return parsed


def admin_endpoint(reactor: Any, description: str) -> IStreamServerEndpoint:
    """
    The C{--admin-port} endpoint.  With C{--workers} only the supervisor
    listens on it; each worker answers the supervisor on a private socket.
    """
    try:
        endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
    except Exception as e:
        raise ConfigError(
            f"--admin-port {description!r} is not a usable endpoint "
            f"description ({type(e).__name__}: {e})"
        ) from None
    return endpoint


class _NoReactor:
    """
    Stands in for the reactor while a description is only checked: the
    endpoint parsers store the reactor they are given and call nothing on
    it until C{listen}, which a checked endpoint never gets to.
    """


def check_port(description: str, tls: ServerTLS | None) -> None:
    """Raise L{ConfigError} if C{description} is not a usable C{--port}."""
    server_endpoint(_NoReactor(), description, tls)


def check_admin_port(description: str) -> None:
    """Raise L{ConfigError} if C{description} is not a usable C{--admin-port}."""
    admin_endpoint(_NoReactor(), description)


def adopted_endpoint(
    reactor: Any, fd: int, family: int, kind: str, tls: ServerTLS | None
) -> IStreamServerEndpoint:
    """
    An endpoint serving an inherited listening socket C{fd}.  C{kind} is
    C{tcp}, C{tls}, C{haproxy-tcp} or C{haproxy-tls}: with C{haproxy-} the
    PROXY header comes first; with C{tls}, C{tls} is the certificate.
    """
    endpoint: IStreamServerEndpoint = AdoptedStreamServerEndpoint(reactor, fd, family)
    if kind.startswith("haproxy-"):
        endpoint = proxyEndpoint(endpoint)
    if kind.endswith("tls"):
        assert tls is not None, "a tls socket needs the serving certificate"
        endpoint = _TLSEndpoint(endpoint, tls)
    return endpoint


@implementer(IStreamServerEndpoint)
class _TLSEndpoint:
    """TLS with the reloadable serving certificate, on any stream endpoint."""

    def __init__(self, inner: IStreamServerEndpoint, tls: ServerTLS) -> None:
        self._inner = inner
        self._tls = tls

    def listen(self, factory: Any) -> Any:
        return self._inner.listen(TLSMemoryBIOFactory(self._tls, False, factory))
