"""
Who the real client is, for C{X-Forwarded-For}.

Clerk rate-limits and scores bots by this address, so it must be the end
user's and never something a client can choose.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from ._config import IPNetwork

__all__ = ["ClientAddress"]

_Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def _parse(value: bytes) -> _Address | None:
    text = value.strip().decode("ascii", "replace")
    if text.startswith("[") and "]" in text:  # [v6] or [v6]:port
        text = text[1 : text.index("]")]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


class ClientAddress:
    """
    Decide the one address to send as C{X-Forwarded-For}.

    With no trusted proxies this is the socket peer, with no parsing at all.
    When the peer is inside a trusted range, the client's own
    C{X-Forwarded-For} is walked from the right (the entries nearest to us,
    written by proxies we trust) and the first untrusted address wins.
    """

    __slots__ = ("_networks",)

    def __init__(self, trusted: Sequence[IPNetwork]) -> None:
        self._networks = tuple(trusted)

    def _trusted(self, address: _Address) -> bool:
        return any(address in network for network in self._networks)

    def resolve(self, peer: str | None, forwarded: Sequence[bytes] | None) -> bytes:
        """
        @param peer: The socket peer's host, or L{None} for a peer with no IP
            address (a UNIX socket), which counts as a trusted local proxy.
        @param forwarded: Every C{X-Forwarded-For} value the client sent, in
            order.
        @return: The address to send, as bytes; empty when nothing is known.
        """
        if peer is not None:
            if not self._networks:
                return peer.encode("ascii")
            address = _parse(peer.encode("ascii"))
            if address is None or not self._trusted(address):
                return peer.encode("ascii")
            fallback = str(address).encode("ascii")
        else:
            fallback = b""
        if not forwarded:
            return fallback
        hops = b",".join(forwarded).split(b",")
        for hop in reversed(hops):
            address = _parse(hop)
            if address is None:
                # Garbage from a hop we trusted: stop at the last good hop.
                return fallback
            fallback = str(address).encode("ascii")
            if not self._trusted(address):
                return fallback
        # Every hop is a trusted proxy: the leftmost is the best we know.
        return fallback
