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
   in clear, and then terminates TLS on the same connection;
 - every listening socket we create (a bare port number, C{tcp:},
   C{tcp6:}, C{ssl:} and C{unix:} descriptions, on C{--port} and
   C{--admin-port}) gets a listen backlog of L{default_backlog} unless
   the description sets C{backlog=} itself.  Twisted's default is 50: a
   burst of new connections overflows it, and each connection dropped
   there costs its client a SYN retransmission (1 s, then 3 s).

Every C{haproxy:} endpoint, and every adopted C{haproxy-} socket, checks a
version 1 PROXY line before Twisted's parser sees it (L{ProxyLineCheck}):
Twisted's takes any text as an address.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.endpoints import (
    AdoptedStreamServerEndpoint,
    SSL4ServerEndpoint,
    serverFromString,
)
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from ._config import ConfigError
from ._forwarded import valid_port
from ._sni import ServerTLS
from ._tcp_compat import coalesce_port
from ._twisted_compat import parse_endpoint_description

__all__ = [
    "ProxyLineCheck",
    "admin_endpoint",
    "adopted_endpoint",
    "check_admin_port",
    "check_port",
    "checked_proxy_endpoint",
    "default_backlog",
    "server_endpoint",
    "valid_proxy_v1_line",
    "with_backlog",
]


#: Used where the kernel's own limit cannot be read.
_FALLBACK_BACKLOG = 1024
#: Endpoint types whose parsers take C{backlog=}; the others (systemd:,
#: adopted sockets) listen on a socket someone else made.
_BACKLOG_TYPES = frozenset({"tcp", "tcp6", "ssl", "unix"})
_SOMAXCONN = "/proc/sys/net/core/somaxconn"


def default_backlog(path: str = _SOMAXCONN) -> int:
    """
    The listen backlog for sockets whose description names none: the
    kernel's ceiling (C{net.core.somaxconn}, which Linux silently clamps
    any larger request to), as Go's C{net} package does, or 1024 where it
    cannot be read.
    """
    try:
        with open(path) as f:
            value = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_BACKLOG
    return value if 0 < value <= 65535 else _FALLBACK_BACKLOG


def with_backlog(description: str, backlog: int | None = None) -> str:
    """
    C{description} with C{:backlog=N} added if its type takes one and it
    sets none itself; any other description unchanged.
    """
    kind = description.split(":", 1)[0]
    if kind not in _BACKLOG_TYPES:
        return description
    try:
        _, kwargs = parse_endpoint_description(description)
    except Exception:
        return description  # serverFromString will say what is wrong
    if "backlog" in kwargs:
        return description
    if backlog is None:
        backlog = default_backlog()
    return f"{description}:backlog={backlog}"


def server_endpoint(
    reactor: Any, description: str, tls: ServerTLS | None
) -> IStreamServerEndpoint:
    """A C{--port} value as an endpoint; see the module docstring."""
    return _Coalescing(_server_endpoint(reactor, description, tls))


def _server_endpoint(
    reactor: Any, description: str, tls: ServerTLS | None
) -> IStreamServerEndpoint:
    if description.startswith("tls:"):
        if tls is None:
            raise ConfigError(f"--port {description!r} needs --tls-cert and --tls-key")
        return _TLSEndpoint(_plain(reactor, description[len("tls:") :]), tls)
    if description.startswith("haproxy:") and tls is not None:
        # A load balancer's PROXY header comes first, in clear; TLS (with
        # our certificate) follows it on the same connection.
        return _TLSEndpoint(_plain(reactor, description), tls)
    if description.isdigit() and tls is not None:
        endpoint: IStreamServerEndpoint = SSL4ServerEndpoint(
            reactor, int(description), tls, backlog=default_backlog()
        )
        return endpoint
    return _plain(reactor, description)


def _plain(reactor: Any, description: str) -> IStreamServerEndpoint:
    if description.startswith("haproxy:"):
        inner = _plain(reactor, description[len("haproxy:") :])
        return checked_proxy_endpoint(inner)
    if description.isdigit():
        description = f"tcp:{description}"
    try:
        parsed: IStreamServerEndpoint = serverFromString(
            reactor, with_backlog(description)
        )
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
        endpoint: IStreamServerEndpoint = serverFromString(
            reactor, with_backlog(description)
        )
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
        endpoint = checked_proxy_endpoint(endpoint)
    if kind.endswith("tls"):
        assert tls is not None, "a tls socket needs the serving certificate"
        endpoint = _TLSEndpoint(endpoint, tls)
    return _Coalescing(endpoint)


@implementer(IStreamServerEndpoint)
class _Coalescing:
    """
    Listens through C{inner}, and has the TCP port it gets hand out
    connections whose writes are gathered into one C{send} per reactor
    turn (L{coalesce_port}).
    """

    def __init__(self, inner: IStreamServerEndpoint) -> None:
        self._inner = inner

    def listen(self, factory: Any) -> Any:
        return self._inner.listen(factory).addCallback(coalesce_port)


@implementer(IStreamServerEndpoint)
class _TLSEndpoint:
    """TLS with the reloadable serving certificate, on any stream endpoint."""

    def __init__(self, inner: IStreamServerEndpoint, tls: ServerTLS) -> None:
        self._inner = inner
        self._tls = tls

    def listen(self, factory: Any) -> Any:
        return self._inner.listen(TLSMemoryBIOFactory(self._tls, False, factory))


# -- PROXY protocol, version 1 -------------------------------------------------

#: The longest version 1 line, CRLF included, that the specification allows.
_V1_MAX = 107


def valid_proxy_v1_line(line: bytes) -> bool:
    """
    Whether C{line} (without its CRLF) is a version 1 PROXY header that
    names real addresses: C{PROXY TCP4 src dst sport dport} with two IPv4
    addresses, the same with C{TCP6} and two IPv6 addresses, or
    C{PROXY UNKNOWN ...} (the balancer does not know; the socket peer
    stands).  Single spaces, decimal ports without leading zeros.
    """
    if line.startswith(b"PROXY UNKNOWN"):
        return line == b"PROXY UNKNOWN" or line[13:14] == b" "
    parts = line.split(b" ")
    if len(parts) != 6 or parts[0] != b"PROXY":
        return False
    family = {b"TCP4": ipaddress.IPv4Address, b"TCP6": ipaddress.IPv6Address}.get(
        parts[1]
    )
    if family is None:
        return False
    try:
        for text in parts[2:4]:
            family(text.decode("ascii"))
    except ValueError:  # UnicodeDecodeError and AddressValueError included
        return False
    return valid_port(parts[4]) and valid_port(parts[5])


class ProxyLineCheck(ProtocolWrapper):
    """
    Sits between the socket and Twisted's PROXY protocol wrapper.  A
    connection that starts with a version 1 line has that line checked with
    L{valid_proxy_v1_line}; a bad one closes the connection before anything
    reads it.  Afterwards, and for version 2 headers (binary addresses,
    which are always addresses), bytes pass straight through.
    """

    _checking = True
    _held = b""

    def dataReceived(self, data: bytes) -> None:
        if not self._checking:
            self.wrappedProtocol.dataReceived(data)
            return
        held = self._held + data
        if held[:6] != b"PROXY "[: len(held)]:
            # Not version 1: Twisted's wrapper decides (version 2, or close).
            self._checking = False
            self._held = b""
            self.wrappedProtocol.dataReceived(held)
            return
        end = held.find(b"\r\n")
        if end < 0:
            if len(held) >= _V1_MAX:
                self._refuse()
            else:
                self._held = held
            return
        if end + 2 > _V1_MAX or not valid_proxy_v1_line(held[:end]):
            self._refuse()
            return
        self._checking = False
        self._held = b""
        self.wrappedProtocol.dataReceived(held)

    def _refuse(self) -> None:
        self._checking = False
        self._held = b""
        self.dataReceived = lambda data: None  # type: ignore[method-assign]
        transport: Any = self.transport
        transport.abortConnection()


class _ProxyLineCheckFactory(WrappingFactory):
    protocol = ProxyLineCheck


@implementer(IStreamServerEndpoint)
class _ProxyLineCheckEndpoint:
    def __init__(self, inner: IStreamServerEndpoint) -> None:
        self._inner = inner

    def listen(self, factory: Any) -> Any:
        wrapped = _ProxyLineCheckFactory(factory)  # type: ignore[no-untyped-call]
        return self._inner.listen(wrapped)


def checked_proxy_endpoint(inner: IStreamServerEndpoint) -> IStreamServerEndpoint:
    """
    C{inner} speaking the PROXY protocol (Twisted's C{proxyEndpoint}), with
    version 1 lines checked before Twisted's parser reads them.
    """
    endpoint: IStreamServerEndpoint = proxyEndpoint(_ProxyLineCheckEndpoint(inner))
    return endpoint
