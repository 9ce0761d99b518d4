"""The FAPI connection pool and the exchange's retry and upload rules, in memory."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer

from clerkproxy._upstream import UpstreamPool

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connection attempts the test completes (or fails) by hand."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, Deferred[Any]]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.attempts.append((factory, d))
        return d

    def complete(self, index: int = -1) -> tuple[Any, StringTransport]:
        factory, d = self.attempts[index]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        return proto, transport


class Recorder:
    """An exchange that writes down what its connection tells it."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def responseStarted(
        self, code: int, phrase: bytes, headers: Any, length: Any, connection: Any
    ) -> None:
        self.events.append(("start", code, phrase, headers, length, connection))

    def responseData(self, data: bytes) -> None:
        self.events.append(("data", data))

    def responseDone(self) -> None:
        self.events.append(("done",))

    def upstreamFailed(self, reason: Any, nothingReceived: bool) -> None:
        self.events.append(("failed", reason, nothingReceived))


HEAD = b"GET / HTTP/1.1\r\nHost: fapi.test\r\n\r\n"


def serve_one(proto: Any, transport: StringTransport) -> Recorder:
    """Send a GET on C{proto} and answer it, so the connection goes idle."""
    exchange = Recorder()
    proto.send(exchange, HEAD, False, None)
    transport.clear()
    proto.dataReceived(RESPONSE)
    return exchange


def pool(
    maximum: int = 2, idle: float = 30.0
) -> tuple[UpstreamPool, FakeEndpoint, MemoryReactorClock]:
    clock = MemoryReactorClock()
    endpoint = FakeEndpoint()
    return (
        UpstreamPool(clock, endpoint, maxConnections=maximum, idleTimeout=idle),
        endpoint,
        clock,
    )


def test_idle_connections_are_reused_most_recent_first() -> None:
    p, endpoint, _ = pool()
    got: list[Any] = []
    p.acquire().addCallback(got.append)
    proto, transport = endpoint.complete()
    assert got == [proto] and not proto.reused
    serve_one(proto, transport)
    assert p.idleConnections == 1
    p.acquire().addCallback(got.append)
    assert got[-1] is proto and proto.reused
    assert p.connectionsOpened == 1 and len(endpoint.attempts) == 1


def test_the_cap_queues_requests_until_a_connection_frees() -> None:
    p, endpoint, clock = pool(maximum=1)
    first: list[Any] = []
    second: list[Any] = []
    p.acquire().addCallback(first.append)
    proto, transport = endpoint.complete()
    p.acquire().addCallback(second.append)
    assert len(endpoint.attempts) == 1 and second == []
    serve_one(proto, transport)
    clock.advance(0)
    assert second == [proto] and proto.reused


def test_a_queued_request_can_give_up_its_place() -> None:
    p, endpoint, clock = pool(maximum=1)
    p.acquire()
    proto, transport = endpoint.complete()
    waiting = p.acquire()
    errors: list[Any] = []
    waiting.addErrback(errors.append)
    waiting.cancel()
    assert errors and errors[0].check(CancelledError)
    serve_one(proto, transport)
    clock.advance(0)
    assert p.idleConnections == 1


def test_a_lost_connection_makes_room_for_the_queue() -> None:
    p, endpoint, _ = pool(maximum=1)
    p.acquire()
    proto, transport = endpoint.complete(0)
    queued: list[Any] = []
    p.acquire().addCallback(queued.append)
    proto.connectionLost(Exception("gone"))  # type: ignore[arg-type]
    assert p.openConnections == 0
    assert len(endpoint.attempts) == 2
    fresh, _ = endpoint.complete(1)
    assert queued == [fresh]


def test_failed_connects_fail_the_request_and_free_the_slot() -> None:
    p, endpoint, _ = pool(maximum=1)
    errors: list[Any] = []
    p.acquire().addErrback(errors.append)
    endpoint.attempts[0][1].errback(ConnectionRefusedError())
    assert errors and errors[0].check(ConnectionRefusedError)
    p.acquire()
    assert len(endpoint.attempts) == 2


def test_idle_connections_close_after_the_idle_timeout() -> None:
    p, endpoint, clock = pool(idle=30.0)
    p.acquire()
    p.acquire()
    a, ta = endpoint.complete(0)
    b, tb = endpoint.complete(1)
    serve_one(a, ta)
    clock.advance(20)
    serve_one(b, tb)
    clock.advance(10.5)
    assert ta.disconnecting and not tb.disconnecting
    clock.advance(20)
    assert tb.disconnecting
    assert clock.getDelayedCalls() == []


def test_dead_idle_connections_leave_the_pool() -> None:
    p, endpoint, _ = pool()
    p.acquire()
    proto, transport = endpoint.complete()
    serve_one(proto, transport)
    proto.connectionLost(Exception("server closed idle connection"))  # type: ignore[arg-type]
    assert p.idleConnections == 0 and p.openConnections == 0
    p.acquire()
    assert len(endpoint.attempts) == 2


def test_close_shuts_idle_connections_and_refuses_more() -> None:
    p, endpoint, _ = pool()
    p.acquire()
    proto, transport = endpoint.complete()
    serve_one(proto, transport)
    done = p.close()
    assert transport.disconnecting
    proto.connectionLost(Exception("closed"))  # type: ignore[arg-type]
    assert done.called
    errors: list[Any] = []
    p.acquire().addErrback(errors.append)
    assert errors and errors[0].check(CancelledError)


@pytest.mark.parametrize("maximum", [1, 3])
def test_never_more_connections_than_the_cap(maximum: int) -> None:
    p, endpoint, _ = pool(maximum=maximum)
    for _ in range(10):
        p.acquire()
    assert len(endpoint.attempts) == maximum
