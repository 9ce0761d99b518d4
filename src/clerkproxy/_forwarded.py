"""
Who the real client is, for C{X-Forwarded-For}.

Clerk rate-limits and scores bots by this address, so it must be the end
user's and never something a client can choose.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from ._config import IPNetwork

__all__ = ["ClientAddress", "valid_host_and_port", "valid_port"]

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

    def believes(self, peer: str | None) -> bool:
        """
        Whether C{peer} (a socket peer's host, L{None} for a UNIX socket)
        is a proxy whose C{X-Forwarded-For} is read: then the client is only
        known once a request head has arrived.
        """
        if peer is None:
            return True
        if not self._networks:
            return False
        address = _parse(peer.encode("ascii"))
        return address is not None and self._trusted(address)

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


_HOST_NAME = re.compile(
    rb"[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?"
    rb"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?)*\Z"
).match


def valid_port(text: bytes) -> bool:
    """A decimal port, 0 to 65535, without sign or leading zeros."""
    return (
        0 < len(text) <= 5
        and text.isdigit()
        and (text == b"0" or text[:1] != b"0")
        and int(text) <= 65535
    )


def valid_host_and_port(value: bytes) -> bool:
    """
    Whether C{value} is C{host[:port]} and nothing more: a DNS name
    (letters, digits, C{-} and C{_} in dot-separated labels; IPv4 addresses
    are such names too) or an IPv6 address in brackets, then an optional
    port.  What the proxy passes on as C{X-Forwarded-Host}.
    """
    if value[:1] == b"[":
        end = value.find(b"]")
        if end < 0:
            return False
        try:
            ipaddress.IPv6Address(value[1:end].decode("ascii"))
        except ValueError:
            return False
        rest = value[end + 1 :]
    else:
        colon = value.find(b":")
        name, rest = (value, b"") if colon < 0 else (value[:colon], value[colon:])
        if _HOST_NAME(name) is None:
            return False
    return not rest or (rest[:1] == b":" and valid_port(rest[1:]))
