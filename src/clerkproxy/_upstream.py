"""
A bounded pool of persistent, verified HTTP/1.1 TLS connections to FAPI.

Twisted's C{HTTPConnectionPool} caps idle connections only and has no
queue; this one caps every connection, queues requests beyond the cap,
closes idle connections after a while with one timer for the whole pool,
and counts the connections it opens (the number steady traffic should keep
near zero).
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import (
    CancelledError,
    Deferred,
    fail,
    gatherResults,
    succeed,
)
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IReactorTCP,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._client import UpstreamConnection

if TYPE_CHECKING:
    from ._twisted_compat import IOpenSSLTrustRoot

__all__ = ["UpstreamPool", "app_endpoint", "fapi_endpoint"]

#: Seconds idle connections get to close politely when the pool closes.
_CLOSE_GRACE = 3.0


class _PoolFactory(Factory):
    """The client factory that builds pooled FAPI connections."""

    noisy = False  # one log line per FAPI connection is noise, not news

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        return UpstreamConnection(self._pool)


def fapi_endpoint(
    reactor: IReactorTCP,
    host: str,
    port: int,
    trustRoot: IOpenSSLTrustRoot | None,
    connectTimeout: float,
) -> IStreamClientEndpoint:
    """
    A TLS client endpoint for FAPI: certificate chain and hostname verified
    (C{service_identity}), SNI sent, HTTP/1.1 offered by ALPN.  There is no
    way to turn verification off; pass C{trustRoot} for a private CA.
    """
    options = optionsForClientTLS(
        host, trustRoot=trustRoot, acceptableProtocols=[b"http/1.1"]
    )
    tcp = HostnameEndpoint(reactor, host, port, timeout=connectTimeout)
    return wrapClientTLS(options, tcp)


def app_endpoint(
    reactor: IReactorTCP, host: str, port: int, tls: bool, connectTimeout: float
) -> IStreamClientEndpoint:
    """The application's origin: plain TCP, or TLS verified against the
    platform's trust store."""
    tcp = HostnameEndpoint(reactor, host, port, timeout=connectTimeout)
    if not tls:
        return tcp
    options = optionsForClientTLS(host, acceptableProtocols=[b"http/1.1"])
    return wrapClientTLS(options, tcp)


class UpstreamPool:
    """
    Hands out idle-or-new connections, at most C{maxConnections} at once.

    @ivar connectionsOpened: How many connections this pool has opened.
    """

    _log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        endpoint: IStreamClientEndpoint,
        maxConnections: int = 256,
        idleTimeout: float = 30.0,
    ) -> None:
        self._clock = clock
        self._endpoint = endpoint
        self._factory = _PoolFactory(self)
        self._max = maxConnections
        self._idleTimeout = idleTimeout
        self._idle: list[UpstreamConnection] = []
        self._open: set[UpstreamConnection] = set()
        self._connecting = 0
        self._waiters: deque[Deferred[UpstreamConnection]] = deque()
        self._sweeper: IDelayedCall | None = None
        self._closed = False
        self.connectionsOpened = 0

    @property
    def idleConnections(self) -> int:
        return len(self._idle)

    @property
    def openConnections(self) -> int:
        return len(self._open)

    def take(self) -> UpstreamConnection | None:
        """The most recently used idle connection, if any: no L{Deferred}."""
        idle = self._idle
        while idle:
            proto = idle.pop()
            if proto.idle:
                proto.reused = True
                return proto
        return None

    def acquire(self) -> Deferred[UpstreamConnection]:
        """
        A connection ready for one request: the most recently used idle one
        (its C{reused} is true), a new one, or, at the cap, the next one to be
        released.  Cancelling the L{Deferred} gives up the place in the queue
        or the connection attempt.
        """
        proto = self.take()
        if proto is not None:
            return succeed(proto)
        if self._closed:
            return fail(CancelledError("pool closed"))
        if len(self._open) + self._connecting < self._max:
            return self._connect()
        waiter: Deferred[UpstreamConnection] = Deferred(self._waiters.remove)
        self._waiters.append(waiter)
        return waiter

    def _connect(self) -> Deferred[UpstreamConnection]:
        self._connecting += 1

        def connected(proto: UpstreamConnection) -> UpstreamConnection:
            self._connecting -= 1
            self._open.add(proto)
            self.connectionsOpened += 1
            return proto

        def failed(reason: Failure) -> Failure:
            self._connecting -= 1
            self._serveWaiters()
            return reason

        d: Deferred[Any] = self._endpoint.connect(self._factory)
        return d.addCallbacks(connected, failed)

    def _release(self, proto: UpstreamConnection) -> None:
        """The connection finished an exchange and can take another."""
        if self._closed:
            proto.transport.loseConnection()  # type: ignore[union-attr]
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.called:
                proto.reused = True
                waiter.callback(proto)
                return
        proto.idleSince = self._clock.seconds()
        self._idle.append(proto)
        if self._sweeper is None:
            self._sweeper = self._clock.callLater(self._idleTimeout, self._sweep)

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self._clock.seconds() - self._idleTimeout
        idle = self._idle
        stale = 0
        while stale < len(idle) and idle[stale].idleSince <= deadline:
            stale += 1
        expired, self._idle = idle[:stale], idle[stale:]
        for proto in expired:
            proto.transport.loseConnection()  # type: ignore[union-attr]
        if self._idle:
            wait = self._idle[0].idleSince + self._idleTimeout - self._clock.seconds()
            self._sweeper = self._clock.callLater(max(wait, 0.0), self._sweep)

    def _lost(self, proto: UpstreamConnection) -> None:
        self._open.discard(proto)
        try:
            self._idle.remove(proto)
        except ValueError:
            pass
        self._serveWaiters()

    def _serveWaiters(self) -> None:
        while self._waiters and len(self._open) + self._connecting < self._max:
            waiter = self._waiters.popleft()
            if waiter.called:
                continue

            def deliver(
                proto: UpstreamConnection, waiter: Deferred[UpstreamConnection] = waiter
            ) -> None:
                if waiter.called:
                    self._release(proto)
                else:
                    waiter.callback(proto)

            def fail(
                reason: Failure, waiter: Deferred[UpstreamConnection] = waiter
            ) -> None:
                if not waiter.called:
                    waiter.errback(reason)

            self._connect().addCallbacks(deliver, fail)

    def close(self) -> Deferred[Any]:
        """
        Close idle connections and refuse new work; in-flight exchanges keep
        their connections until they end.  Fires once the idle ones are shut.
        """
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self._waiters:
            self._waiters.popleft().cancel()
        idle, self._idle = self._idle, []
        done = gatherResults([proto.closed() for proto in idle])
        if not done.called:
            # A peer that never answers our TLS close must not hold up exit.
            force = self._clock.callLater(
                _CLOSE_GRACE,
                lambda: [proto.transport.abortConnection() for proto in idle],  # type: ignore[union-attr]
            )
            done.addBoth(lambda result: force.cancel() if force.active() else None)
        return done
