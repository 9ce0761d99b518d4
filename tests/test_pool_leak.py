"""
The queued-client-leaves leak of issue 7, and the capacity design, driven
through the whole proxy in memory: real site, channel, exchange, pool and
connections; FAPI's connection attempts are Deferreds the test fires; one
injected clock.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
import standin
from conftest import connect_raw, reactor, trust_root, within
from helpers import FakeEndpoint
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import provider

from clerkproxy import FrontendAPIProxy, ProxyConfig, build_site
from clerkproxy._metrics import MetricsCollector
from clerkproxy._twisted_compat import request_line
from clerkproxy._upstream import UpstreamPool, fapi_endpoint

GET = b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\n\r\n"
# A POST whose body stops once the exchange's hold (64 KiB) is full: the
# exchange then queues for a connection, and FAPI would wait for the rest.
# (A smaller body that stops takes no connection at all.)
STALLED_POST = (
    b"POST /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
    + b"x" * 65536
)


@pytest.fixture
def logged_errors() -> Iterator[list[dict[str, Any]]]:
    """Every error or critical log event (Unhandled Error included)."""
    errors: list[dict[str, Any]] = []

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        if "log_failure" in event or event.get("log_level") in (
            LogLevel.error,
            LogLevel.critical,
        ):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield errors
    finally:
        globalLogPublisher.removeObserver(observe)


class Proxy:
    def __init__(self, poolSize: int, idleTimeout: float = 30.0) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = FakeEndpoint()
        self.pool = UpstreamPool(
            self.clock, self.endpoint, maxConnections=poolSize, idleTimeout=idleTimeout
        )
        config = ProxyConfig(
            proxy_url="https://app.test/__clerk",
            secret_key="sk_live_memory",
            fapi_url="https://fapi.test",
            upstream_timeout=60.0,
        )
        self.resource = FrontendAPIProxy(config, self.clock, upstream=self.pool)
        self.site = build_site(self.resource, self.clock)

    def client(self, request: bytes) -> tuple[Any, StringTransport]:
        protocol = self.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(request)
        return protocol, transport

    def baseline(self) -> dict[str, int]:
        p = self.pool
        return {
            "open": p.openConnections,
            "busy": p.busyConnections,
            "relaying": p.relayingConnections,
            "connecting": p.connectingConnections,
            "queued": p.queuedRequests,
        }


def test_queued_clients_that_leave_while_their_connections_are_made(
    logged_errors: list[dict[str, Any]],
) -> None:
    proxy = Proxy(poolSize=256, idleTimeout=30.0)
    endpoint, pool = proxy.endpoint, proxy.pool
    # 256 clients fill the pool ...
    first = [proxy.client(GET) for _ in range(256)]
    busy = [endpoint.complete(i) for i in range(256)]
    assert pool.busyConnections == 256
    # ... and 256 more queue a POST whose body never comes in full.
    queued = [proxy.client(STALLED_POST) for _ in range(256)]
    assert pool.queuedRequests == 256 and len(endpoint.attempts) == 256
    # FAPI closes the busy connections; new connects stall.
    for proto, _ in busy:
        proto.connectionLost(Failure(ConnectionLost()))
    for _, transport in first:
        assert transport.value().startswith(b"HTTP/1.1 502 ")
    assert len(endpoint.attempts) == 512 and pool.connectingConnections == 256
    # The queued clients go away meanwhile.
    for protocol, _ in queued:
        protocol.connectionLost(Failure(ConnectionLost()))
    assert pool.queuedRequests == 0
    # The stalled connects complete: nobody's request is sent on them.
    made = [endpoint.complete(i) for i in range(256, 512)]
    assert all(transport.value() == b"" for _, transport in made)
    assert pool.idleConnections == 256 and pool.busyConnections == 0
    # After the idle timeout they are closed, and the pool is back to baseline.
    proxy.clock.advance(31)
    assert all(transport.disconnecting for _, transport in made)
    for proto, _ in made:
        proto.connectionLost(Failure(ConnectionDone()))
    assert proxy.baseline() == {
        "open": 0,
        "busy": 0,
        "relaying": 0,
        "connecting": 0,
        "queued": 0,
    }
    # Concurrent requests are served in parallel again.
    clients = [proxy.client(GET) for _ in range(10)]
    assert len(endpoint.attempts) == 522
    fresh = [endpoint.complete(512 + n)[0] for n in range(10)]
    assert pool.busyConnections == 10 and pool.queuedRequests == 0
    for proto in fresh:
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert all(t.value().startswith(b"HTTP/1.1 200 OK") for _, t in clients)
    gc.collect()  # a Deferred dropped with a failure would log it now
    assert logged_errors == []


def test_stalled_relays_do_not_hold_the_pool(
    logged_errors: list[dict[str, Any]],
) -> None:
    """
    With a pool of two, two clients that stop reading a large answer hold
    their own connections; a third request gets a connection at once.
    """
    proxy = Proxy(poolSize=2)
    endpoint, pool = proxy.endpoint, proxy.pool
    slow = []
    for n in range(2):
        protocol, transport = proxy.client(
            b"GET /__clerk/npm/big HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        upstream, upstream_transport = endpoint.complete(n)
        upstream.dataReceived(
            b"HTTP/1.1 200 OK\r\nContent-Length: 50000000\r\n\r\n" + b"x" * 65536
        )
        transport.producer.pauseProducing()  # type: ignore[union-attr]  # socket full
        assert upstream_transport.producerState == "paused"
        slow.append((upstream, upstream_transport, transport))
    assert pool.relayingConnections == 2 and pool.busyConnections == 0
    _, ordinary = proxy.client(GET)
    assert len(endpoint.attempts) == 3  # no wait in the queue
    upstream, _ = endpoint.complete(2)
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert ordinary.value().startswith(b"HTTP/1.1 200 OK")
    assert pool.idleConnections == 1 and pool.relayingConnections == 2
    assert gauges(proxy) == {
        ("clerkproxy_upstream_connections", "connecting"): 0,
        ("clerkproxy_upstream_connections", "busy"): 0,
        ("clerkproxy_upstream_connections", "relaying"): 2,
        ("clerkproxy_upstream_connections", "idle"): 1,
        ("clerkproxy_upstream_queued_requests", None): 0,
    }
    assert logged_errors == []


def gauges(proxy: Proxy) -> dict[tuple[str, str | None], float]:
    """The pool gauges as /metrics would export them."""
    out: dict[tuple[str, str | None], float] = {}
    for family in MetricsCollector(proxy.resource.metrics).collect():
        if family.name in (
            "clerkproxy_upstream_connections",
            "clerkproxy_upstream_queued_requests",
        ):
            for sample in family.samples:
                out[(sample.name, sample.labels.get("state"))] = sample.value
    return out


# -- the same on loopback: real sockets, TLS, the stand-in FAPI ---------------------


class GatedEndpoint:
    """An endpoint whose new connections wait while the gate is shut."""

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint
        self._held: list[tuple[Any, Deferred[Any]]] = []
        self.shut = False

    def connect(self, factory: Any) -> Deferred[Any]:
        if not self.shut:
            d: Deferred[Any] = self._endpoint.connect(factory)
            return d
        held: Deferred[Any] = Deferred()
        self._held.append((factory, held))
        return held

    def open(self) -> None:
        self.shut = False
        held, self._held = self._held, []
        for factory, d in held:
            self._endpoint.connect(factory).chainDeferred(d)


async def until(
    condition: Callable[[], bool], what: str, seconds: float = 10.0
) -> None:
    """Poll the real reactor, boundedly."""
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await task.deferLater(reactor, 0.02)
    raise AssertionError(f"never happened: {what}")


@pytest_twisted.ensureDeferred
async def test_queued_clients_leaving_on_loopback(
    make_proxy: Any,
    fapi: Any,
    ca: Any,
    logged_errors: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    size = 8
    heads: list[bytes] = []  # every request head FAPI receives
    gotLength = standin.RecordingRequest.gotLength

    def recordHead(self: Any, length: int | None) -> None:
        heads.append(request_line(self.channel)[0])
        gotLength(self, length)

    monkeypatch.setattr(standin.RecordingRequest, "gotLength", recordHead)
    gate = GatedEndpoint(
        fapi_endpoint(reactor, "localhost", fapi.port.getHost().port, trust_root(ca), 5)
    )
    proxy = make_proxy(endpoint=gate, pool_size=size, pool_idle_timeout=0.5)
    pool = proxy.resource.upstream
    stalled = fapi.recorder.stalled
    # Clients fill the pool with requests FAPI sits on ...
    busy = [await connect_raw(proxy.port) for _ in range(size)]
    for client in busy:
        client.transport.write(b"GET /__clerk/stall HTTP/1.1\r\nHost: a\r\n\r\n")
    await until(lambda: len(stalled) == size, "FAPI holds the first requests")
    # ... and as many queue a POST whose body never comes in full.
    queued = [await connect_raw(proxy.port) for _ in range(size)]
    for client in queued:
        client.transport.write(STALLED_POST)
    await until(lambda: pool.queuedRequests == size, "the rest queue")
    # FAPI closes the busy connections while new connects stall ...
    gate.shut = True
    for request in list(stalled):
        request.channel.transport.abortConnection()
    stalled.clear()
    for client in busy:
        await within(client.waitFor(b"HTTP/1.1 502 "), 10)
    await until(lambda: pool.connectingConnections == size, "connects under way")
    # ... and the queued clients reset.
    for client in queued:
        client.transport.abortConnection()
    await until(lambda: pool.queuedRequests == 0, "the queue empties")
    gate.open()
    await until(lambda: pool.idleConnections == size, "the new connections idle")
    # No orphaned request reached FAPI, and after the idle timeout the pool
    # is back to its baseline.
    assert heads == [b"GET"] * size
    await until(lambda: pool.openConnections == 0, "idle connections closed")
    assert pool.counts() == dict.fromkeys(
        ("connecting", "busy", "relaying", "idle", "queued"), 0
    )
    # Concurrent requests reach FAPI in parallel again.
    again = [await connect_raw(proxy.port) for _ in range(size)]
    for client in again:
        client.transport.write(b"GET /__clerk/stall HTTP/1.1\r\nHost: a\r\n\r\n")
    await until(lambda: len(stalled) == size, "all of them reach FAPI at once")
    for request in stalled:
        request.write(b"ok")
        request.finish()
    for client in again:
        await within(client.waitFor(b"ok"), 10)
    assert logged_errors == []
