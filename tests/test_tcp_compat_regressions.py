"""
Three bugs once in clerkproxy._tcp_compat, each pinned by a test that
failed while it was there.  Every test also runs with Twisted's own
C{tcp.Server}, the control.

 1. abortConnection() drops the bytes a transport holds; CoalescingServer
    sends the bytes of the turn anyway, written before the abort or after
    it: its end-of-turn flush runs before the abort's connectionLost and
    checks nothing abortConnection sets (C{_aborting}).
 2. send_direct() sends to a TCP transport that was aborted (where
    Twisted's write on the same transport sends nothing).
 3. CoalescingServer.write() ignores startTLS(): once C{TLS} is set,
    Twisted's Server.write goes through the TLS layer; ours sends the
    bytes to the socket in clear.
"""

from __future__ import annotations

import errno
from typing import Any

import pytest
import pytest_twisted
import trustme
from conftest import _server_options, connect_raw, reactor, trust_root, within
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock

from clerkproxy._tcp_compat import CoalescingServer, send_direct

CLASSES = [CoalescingServer, tcp.Server]


class _Socket:
    """A connected socket whose kernel takes everything it is sent."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def send(self, data: Any) -> int:
        self.sent.append(bytes(data))
        return len(data)

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return 1000

    def setsockopt(self, *args: Any) -> None:
        pass

    def shutdown(self, how: int) -> None:
        raise OSError(errno.ENOTCONN, "not connected")

    def close(self) -> None:
        pass


def _server(cls: type[tcp.Server]) -> tuple[Any, _Socket, MemoryReactorClock]:
    clock = MemoryReactorClock()
    sock = _Socket()
    protocol = Protocol()
    server: Any = cls(sock, protocol, ("127.0.0.1", 1), None, 1, clock)  # type: ignore[arg-type]
    protocol.makeConnection(server)
    return server, sock, clock


# -- 1. abortConnection ----------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
def test_abort_drops_the_bytes_of_the_turn(cls: type[tcp.Server]) -> None:
    server, sock, clock = _server(cls)
    server.write(b"before")
    server.abortConnection()
    server.write(b"after")
    clock.advance(0)  # the flush, then the abort's connectionLost
    assert sock.sent == []


class _WritesThenAborts(Protocol):
    def connectionMade(self) -> None:
        self.transport.write(b"before-abort ")
        self.transport.abortConnection()
        self.transport.write(b"after-abort")


@pytest.mark.parametrize("cls", CLASSES)
@pytest_twisted.ensureDeferred
async def test_an_aborted_connection_sends_the_peer_nothing(
    cls: type[tcp.Server],
) -> None:
    port = reactor.listenTCP(
        0, Factory.forProtocol(_WritesThenAborts), interface="127.0.0.1"
    )
    port.transport = cls
    try:
        client = await connect_raw(port.getHost().port)
        received = await within(client.closed)
    finally:
        await port.stopListening()
    assert received == b""


# -- 2. send_direct after abortConnection ------------------------------------------


def _write(transport: Any, data: bytes) -> None:
    transport.write(data)


@pytest.mark.parametrize("send", [send_direct, _write], ids=["send_direct", "write"])
def test_send_direct_sends_nothing_after_abort(send: Any) -> None:
    """The control is Twisted's own write on the same transport."""
    server, sock, clock = _server(tcp.Server)
    server.abortConnection()
    send(server, b"late")
    clock.advance(0)
    assert sock.sent == []


# -- 3. startTLS ---------------------------------------------------------------------


class _StartsTLS(Protocol):
    options: Any = None

    def connectionMade(self) -> None:
        self.transport.startTLS(self.options)
        self.transport.write(b"secret")


class _FirstData(Protocol):
    def __init__(self) -> None:
        self.result: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if not self.result.called:
            self.result.callback(data)
        self.transport.loseConnection()

    def connectionLost(self, reason: Any = None) -> None:
        if not self.result.called:
            self.result.errback(reason)


@pytest.mark.parametrize("cls", CLASSES)
@pytest_twisted.ensureDeferred
async def test_writes_after_startTLS_are_encrypted(
    ca: trustme.CA, cls: type[tcp.Server]
) -> None:
    """With Twisted's Server the client reads "secret" through TLS; with
    CoalescingServer "secret" goes in clear and the client's TLS fails on
    it (an SSL.Error instead of the bytes)."""

    class Server(_StartsTLS):
        options = _server_options(ca.issue_cert("localhost"))

    port = reactor.listenTCP(0, Factory.forProtocol(Server), interface="127.0.0.1")
    port.transport = cls
    try:
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trust_root(ca)),
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port),
        )
        client = _FirstData()
        await within(connectProtocol(endpoint, client))
        assert await within(client.result) == b"secret"
    finally:
        await port.stopListening()
