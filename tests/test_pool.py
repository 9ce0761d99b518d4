"""The FAPI connection pool and the exchange's retry and upload rules, in memory."""

from __future__ import annotations

from typing import Any

import pytest
from helpers import HEAD, FakeEndpoint, Recorder, serve_one
from twisted.internet.defer import CancelledError
from twisted.internet.testing import MemoryReactorClock

from clerkproxy._upstream import UpstreamPool


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


# -- the queue: a cancelled wait leaves it exactly once ---------------------------


def test_cancelling_a_wait_whose_connection_is_being_made() -> None:
    """
    A request given a connection attempt gives up before it completes: it
    hears CancelledError once, and the connection, when made, goes idle.
    """
    p, endpoint, clock = pool(maximum=1)
    p.acquire()
    busy, busy_transport = endpoint.complete(0)
    waiting = p.acquire()
    errors: list[Any] = []
    waiting.addErrback(errors.append)
    busy.connectionLost(Exception("FAPI closed it"))  # type: ignore[arg-type]
    assert len(endpoint.attempts) == 2  # an attempt for the queued request
    waiting.cancel()
    assert len(errors) == 1 and errors[0].check(CancelledError)
    assert p.queuedRequests == 0 and p.connectingConnections == 1
    fresh, fresh_transport = endpoint.complete(1)
    assert p.idleConnections == 1 and fresh_transport.value() == b""
    assert p.connectingConnections == 0 and p.busyConnections == 0
    got: list[Any] = []
    p.acquire().addCallback(got.append)
    assert got == [fresh] and fresh.reused
    assert len(errors) == 1


def test_a_connection_made_for_nobody_after_close_is_closed() -> None:
    p, endpoint, _ = pool(maximum=1)
    waiting = p.acquire()
    waiting.addErrback(lambda f: None)
    p.close()
    assert waiting.called
    proto, transport = endpoint.complete()
    assert transport.disconnecting and p.idleConnections == 0


def test_a_failed_attempt_fails_the_longest_waiting_request() -> None:
    p, endpoint, _ = pool(maximum=2)
    outcomes: list[Any] = []
    for n in range(3):
        p.acquire().addBoth(lambda r, n=n: outcomes.append((n, r)))
    assert len(endpoint.attempts) == 2
    endpoint.attempts[0][1].errback(ConnectionRefusedError())
    assert [n for n, _ in outcomes] == [0]
    assert len(endpoint.attempts) == 3  # the third request's turn
    proto, _ = endpoint.complete(1)
    assert outcomes[-1] == (1, proto)


def test_a_cancelled_wait_then_a_failed_attempt_fails_nobody_else() -> None:
    p, endpoint, _ = pool(maximum=2)
    first = p.acquire()
    second: list[Any] = []
    p.acquire().addBoth(second.append)
    first.addErrback(lambda f: None)
    first.cancel()
    endpoint.attempts[0][1].errback(ConnectionRefusedError())
    assert second == []  # the other attempt is still meant for it
    proto, _ = endpoint.complete(1)
    assert second == [proto]


# -- capacity: a relayed body leaves the cap -----------------------------------------


def start_relay(proto: Any) -> Recorder:
    """A request whose answer's body has begun and is far from done."""
    exchange = Recorder()
    proto.send(exchange, HEAD, False, None)
    proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nstart")
    return exchange


def test_relaying_connections_leave_the_cap() -> None:
    p, endpoint, _ = pool(maximum=2)
    got: list[Any] = []
    p.acquire().addCallback(got.append)
    p.acquire().addCallback(got.append)
    p.acquire().addCallback(got.append)
    assert len(endpoint.attempts) == 2
    a, ta = endpoint.complete(0)
    b, tb = endpoint.complete(1)
    start_relay(a)
    assert p.relayingConnections == 1 and p.busyConnections == 1
    assert len(endpoint.attempts) == 3  # the queued request goes ahead
    c, tc = endpoint.complete(2)
    assert got == [a, b, c]
    start_relay(b)
    assert p.relayingConnections == 2
    # The bodies end: a goes idle (one busy + one idle = the cap), b is one
    # too many and closes.
    a.dataReceived(b"x" * 995)
    assert p.idleConnections == 1 and not ta.disconnecting
    b.dataReceived(b"x" * 995)
    assert tb.disconnecting and p.idleConnections == 1
    assert p.relayingConnections == 0 and p.busyConnections == 1


def test_a_body_that_ends_unreusable_leaves_when_lost() -> None:
    p, endpoint, _ = pool(maximum=1)
    p.acquire()
    a, ta = endpoint.complete()
    exchange = Recorder()
    a.send(exchange, HEAD, False, None)
    a.dataReceived(
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 4\r\n\r\nab"
    )
    assert p.relayingConnections == 1
    a.dataReceived(b"cd")
    assert ta.disconnecting and p.relayingConnections == 1 and p.openConnections == 1
    a.connectionLost(Exception("closed"))  # type: ignore[arg-type]
    assert p.relayingConnections == 0 and p.openConnections == 0


def test_relaying_connections_close_when_the_pool_closed() -> None:
    p, endpoint, _ = pool(maximum=2)
    p.acquire()
    a, ta = endpoint.complete()
    start_relay(a)
    p.close()
    assert not ta.disconnecting  # its answer is still being relayed
    a.dataReceived(b"x" * 995)
    assert ta.disconnecting
