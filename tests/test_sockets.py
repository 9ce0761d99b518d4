"""
A client that stops reading costs bounded kernel memory: the proxy caps the
unsent bytes in each client socket's send queue (TCP_NOTSENT_LOWAT).
"""

from __future__ import annotations

import fcntl
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from conftest import Proxy, reactor
from twisted.internet.task import deferLater

from clerkproxy._sockets import limit_unsent, tcp_transport

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="TCP_NOTSENT_LOWAT is Linux's"
)

#: Linux's ioctl for the bytes in a socket's send queue not yet sent.
SIOCOUTQNSD = 0x894B


def unsent(sock: Any) -> int:
    raw = fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, struct.pack("i", 0))
    value: int = struct.unpack("i", raw)[0]
    return value


async def peak_unsent_while_stalled(proxy: Proxy) -> int:
    """
    Ask for a 32 MB answer through a socket that never reads, and return
    the most unsent bytes the proxy's side of that connection queued.
    """
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.setblocking(False)
    try:
        client.connect_ex(("127.0.0.1", proxy.port))
        await deferLater(reactor, 0.05)
        client.send(
            b"GET /__clerk/big/32000000 HTTP/1.1\r\nHost: app.example.com\r\n\r\n"
        )
        peak = 0
        for _ in range(40):  # two seconds, bounded
            await deferLater(reactor, 0.05)
            for channel in list(proxy.site.channels):
                tcp = tcp_transport(channel.transport)
                if tcp is not None:
                    peak = max(peak, unsent(tcp.getHandle()))
        return peak
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_a_stalled_reader_queues_little_in_the_kernel(
    make_proxy: Callable[..., Proxy],
) -> None:
    proxy = make_proxy()
    assert proxy.site.unsentLimit == 128 * 1024
    peak = await peak_unsent_while_stalled(proxy)
    # The limit, plus at most one write's worth past it.
    assert 0 < peak <= proxy.site.unsentLimit + 256 * 1024


@pytest_twisted.ensureDeferred
async def test_without_the_limit_the_kernel_queues_megabytes(
    make_proxy: Callable[..., Proxy],
) -> None:
    """The control: what the limit saves, so the test above can fail."""
    proxy = make_proxy()
    proxy.site.unsentLimit = 0
    assert await peak_unsent_while_stalled(proxy) > 1024 * 1024


def test_the_limit_needs_a_tcp_socket_underneath() -> None:
    assert not limit_unsent(object(), 1024)
    assert not limit_unsent(None, 1024)
