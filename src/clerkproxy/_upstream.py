"""
A bounded pool of persistent, verified HTTP/1.1 TLS connections to FAPI.

Twisted's C{HTTPConnectionPool} caps idle connections only and has no
queue; this one caps the connections that are connecting or waiting for
FAPI's answer, queues requests beyond the cap, lets connections that a
client paces (relaying a response body, or streaming a request body) leave
the cap (so slow clients cannot starve the queue),
closes idle connections after a while with one timer for the whole pool,
and counts the connections it opens (the number steady traffic should keep
near zero).
"""

from __future__ import annotations

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
from ._upstream_tls import UpstreamTLSEndpoint, client_context

if TYPE_CHECKING:
    from ._twisted_compat import IOpenSSLTrustRoot

__all__ = ["UpstreamPool", "app_endpoint", "fapi_endpoint", "pool_counts"]

#: Seconds idle connections get to close politely when the pool closes.
_CLOSE_GRACE = 3.0


class _PoolFactory(Factory):
    """The client factory that builds pooled FAPI connections."""

    noisy = False  # one log line per FAPI connection is noise, not news

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        pool = self._pool
        return UpstreamConnection(
            onIdle=pool._connectionIdle,
            onLost=pool._connectionLost,
            onRelaying=pool._connectionRelaying,
        )


def fapi_endpoint(
    reactor: IReactorTCP,
    host: str,
    port: int,
    trustRoot: IOpenSSLTrustRoot | None,
    connectTimeout: float,
) -> IStreamClientEndpoint:
    """
    A TLS client endpoint for FAPI: certificate chain and host name
    verified, SNI sent, HTTP/1.1 offered by ALPN.  There is no way to turn
    verification off; pass C{trustRoot} for a private CA.

    TLS is the standard library's (L{UpstreamTLSEndpoint}), for the
    platform's roots and for roots from C{trustRootFromCertificates};
    Twisted's own (verified with C{service_identity}) for any other kind of
    trust root, whose certificates only pyOpenSSL can use.
    """
    tcp = HostnameEndpoint(reactor, host, port, timeout=connectTimeout)
    context = client_context(trustRoot)
    if context is not None:
        return UpstreamTLSEndpoint(reactor, tcp, context, host)
    options = optionsForClientTLS(
        host, trustRoot=trustRoot, acceptableProtocols=[b"http/1.1"]
    )
    return wrapClientTLS(options, tcp)


def app_endpoint(
    reactor: IReactorTCP, host: str, port: int, tls: bool, connectTimeout: float
) -> IStreamClientEndpoint:
    """The application's origin: plain TCP, or TLS verified against the
    platform's trust store."""
    if not tls:
        return HostnameEndpoint(reactor, host, port, timeout=connectTimeout)
    return fapi_endpoint(reactor, host, port, None, connectTimeout)


class UpstreamPool:
    """
    Hands out idle-or-new connections; at most C{maxConnections} of them
    at once are connecting, sending a request or waiting for a response
    head (the "cap").

    Where each connection is:

     - I{connecting}: an attempt under way, not yet a connection;
     - I{busy}: handed out, sending a request or awaiting FAPI's head;
     - I{relaying}: paced by a client: FAPI's head arrived and its body
       is being relayed, or a request body larger than the exchange's
       hold streams from its client.  These have left the cap: a client
       reading or sending slowly holds its own connection but never
       keeps a queued request from FAPI;
     - I{idle}: on the stack, ready for the next request.

    The cap counts connecting plus busy.  The pool also keeps idle plus
    capped at or under C{maxConnections}: a relaying connection that ends
    cleanly goes back on the idle stack only if that still holds (it is
    closed otherwise), so the pool never opens more than C{maxConnections}
    connections beyond those relaying.

    Requests beyond the cap wait in a first-come queue.  A connection that
    becomes free (an attempt completes, a response ends) goes to the
    longest waiting request, whichever request's arrival started the
    attempt: a request that gives up its place (cancels its L{Deferred})
    leaves the queue at once, exactly once, and the connection made on its
    behalf serves the next one or goes idle.

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
        self._busy: set[UpstreamConnection] = set()
        self._relaying: set[UpstreamConnection] = set()
        self._open: set[UpstreamConnection] = set()
        self._connecting = 0
        # Unfired Deferreds in arrival order (a dict: O(1) removal).
        self._waiters: dict[Deferred[UpstreamConnection], None] = {}
        self._sweeper: IDelayedCall | None = None
        self._closed = False
        self.connectionsOpened = 0

    # -- counts, for metrics and tests -------------------------------------

    @property
    def idleConnections(self) -> int:
        """Connections on the idle stack."""
        return len(self._idle)

    @property
    def openConnections(self) -> int:
        """Connections made and not yet lost, whatever they are doing."""
        return len(self._open)

    @property
    def busyConnections(self) -> int:
        """Connections sending a request or awaiting a response head."""
        return len(self._busy)

    @property
    def relayingConnections(self) -> int:
        """Connections a client paces: relaying a response body or
        streaming a request body (outside the cap)."""
        return len(self._relaying)

    @property
    def connectingConnections(self) -> int:
        """Connection attempts under way."""
        return self._connecting

    @property
    def queuedRequests(self) -> int:
        """Requests waiting for a connection."""
        return len(self._waiters)

    def counts(self) -> dict[str, int]:
        """Connections by state, and queued requests, for metrics."""
        return {
            "connecting": self._connecting,
            "busy": len(self._busy),
            "relaying": len(self._relaying),
            "idle": len(self._idle),
            "queued": len(self._waiters),
        }

    # -- handing out ---------------------------------------------------------

    def take(self) -> UpstreamConnection | None:
        """The most recently used idle connection, if any: no L{Deferred}."""
        idle = self._idle
        while idle:
            proto = idle.pop()
            if proto.idle:
                proto.reused = True
                self._busy.add(proto)
                return proto
        return None

    def acquire(self) -> Deferred[UpstreamConnection]:
        """
        A connection ready for one request: the most recently used idle one
        (its C{reused} is true), a new one, or, at the cap, the next one to be
        freed.  Cancelling the L{Deferred} gives up the place in the queue;
        a connection being made meanwhile serves another request or goes
        idle.
        """
        proto = self.take()
        if proto is not None:
            return succeed(proto)
        if self._closed:
            return fail(CancelledError("pool closed"))
        waiter: Deferred[UpstreamConnection] = Deferred(self._giveUp)
        self._waiters[waiter] = None
        self._serveWaiters()
        return waiter

    def _giveUp(self, waiter: Deferred[UpstreamConnection]) -> None:
        # A Deferred's canceller runs only while it is unfired, and a waiter
        # leaves the queue just before it is fired: it is still queued.
        del self._waiters[waiter]

    def _nextWaiter(self) -> Deferred[UpstreamConnection]:
        waiter = next(iter(self._waiters))
        del self._waiters[waiter]
        return waiter

    def _serveWaiters(self) -> None:
        """Start attempts for queued requests no attempt is yet meant for."""
        while (
            len(self._waiters) > self._connecting
            and self._connecting + len(self._busy) < self._max
            and not self._closed
        ):
            proto = self.take()
            if proto is not None:
                proto.reused = True
                self._nextWaiter().callback(proto)
                continue
            self._connect()

    def _connect(self) -> None:
        self._connecting += 1
        d: Deferred[Any] = self._endpoint.connect(self._factory)
        d.addCallbacks(self._connected, self._connectFailed)

    def _connected(self, proto: UpstreamConnection) -> None:
        self._connecting -= 1
        if not proto.idle:
            # Lost before the attempt even reported success.
            self._serveWaiters()
            return
        self._open.add(proto)
        self.connectionsOpened += 1
        proto.reused = False
        self._free(proto)

    def _connectFailed(self, reason: Failure) -> None:
        self._connecting -= 1
        if len(self._waiters) > self._connecting:
            # One request fewer can be served by the attempts left: the
            # one that has waited longest hears why.
            self._nextWaiter().errback(reason)
        self._serveWaiters()

    def _free(self, proto: UpstreamConnection) -> None:
        """
        C{proto} is idle and in none of busy, relaying or idle: give it to
        the longest waiting request, put it on the idle stack, or close it.
        """
        if self._closed:
            proto.close()
            return
        capped = self._connecting + len(self._busy)
        if self._waiters and capped < self._max:
            self._busy.add(proto)
            self._nextWaiter().callback(proto)
            return
        if len(self._idle) + capped >= self._max:
            proto.close()
            return
        proto.idleSince = self._clock.seconds()
        self._idle.append(proto)
        if self._sweeper is None:
            self._sweeper = self._clock.callLater(self._idleTimeout, self._sweep)

    # -- what connections report ---------------------------------------------

    def _connectionRelaying(self, proto: UpstreamConnection) -> None:
        """A client paces the connection now: it leaves the cap."""
        self._busy.discard(proto)
        self._relaying.add(proto)
        self._serveWaiters()

    def _connectionIdle(self, proto: UpstreamConnection) -> None:
        """The connection finished an exchange and can take another."""
        self._busy.discard(proto)
        self._relaying.discard(proto)
        proto.reused = True
        self._free(proto)

    def _connectionLost(self, proto: UpstreamConnection) -> None:
        self._open.discard(proto)
        self._busy.discard(proto)
        self._relaying.discard(proto)
        try:
            self._idle.remove(proto)
        except ValueError:
            pass
        self._serveWaiters()

    # -- idle connections ------------------------------------------------------

    def _sweep(self) -> None:
        self._sweeper = None
        deadline = self._clock.seconds() - self._idleTimeout
        idle = self._idle
        stale = 0
        while stale < len(idle) and idle[stale].idleSince <= deadline:
            stale += 1
        expired, self._idle = idle[:stale], idle[stale:]
        for proto in expired:
            proto.close()
        if self._idle:
            wait = self._idle[0].idleSince + self._idleTimeout - self._clock.seconds()
            self._sweeper = self._clock.callLater(max(wait, 0.0), self._sweep)

    def close(self) -> Deferred[Any]:
        """
        Close idle connections and refuse new work; in-flight exchanges keep
        their connections until they end, then those close too.  Fires once
        the idle ones are shut.
        """
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for waiter in list(self._waiters):
            waiter.cancel()
        idle, self._idle = self._idle, []
        done = gatherResults([proto.closed() for proto in idle])
        if not done.called:
            # A peer that never answers our TLS close must not hold up exit.
            def abortAll() -> None:
                for proto in idle:
                    proto.abort()

            force = self._clock.callLater(_CLOSE_GRACE, abortAll)
            done.addBoth(lambda result: force.cancel() if force.active() else None)
        return done


def pool_counts(pools: list[UpstreamPool]) -> dict[str, int]:
    """L{UpstreamPool.counts} summed over C{pools}."""
    total: dict[str, int] = {}
    for pool in pools:
        for name, n in pool.counts().items():
            total[name] = total.get(name, 0) + n
    return total
