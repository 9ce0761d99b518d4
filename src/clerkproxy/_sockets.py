"""
Socket options set on the TCP socket under whatever wraps it (TLS, PROXY
protocol), where Twisted offers no endpoint argument for them.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.interfaces import ITCPTransport

__all__ = ["limit_unsent", "tcp_transport"]

#: Linux's TCP_NOTSENT_LOWAT; Python names it on Linux builds only.
_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def tcp_transport(transport: Any) -> Any:
    """The TCP transport under C{transport}'s wrappers, or L{None}."""
    for _ in range(4):
        if transport is None or ITCPTransport.providedBy(transport):
            return transport
        transport = getattr(transport, "transport", None)
    return None


def limit_unsent(transport: Any, limit: int) -> bool:
    """
    Keep at most about C{limit} bytes that the peer has not been sent yet
    in the kernel's send queue of C{transport}'s socket.

    Without it, Linux grows a socket's send buffer to several MiB while
    the peer reads nothing, so every client that stops reading costs that
    much kernel memory, and a thousand of them push the whole machine into
    TCP memory pressure.  With it, writes stop being accepted once
    C{limit} unsent bytes are queued; the proxy's own backpressure then
    pauses the upstream, and throughput to a reading client is unchanged,
    because bytes in flight do not count.  Returns whether it was set.
    """
    tcp = tcp_transport(transport)
    if limit <= 0 or tcp is None:
        return False
    try:
        tcp.getHandle().setsockopt(socket.IPPROTO_TCP, _NOTSENT_LOWAT, limit)
    except (OSError, AttributeError):
        return False  # not Linux, or not a TCP socket after all
    return True
