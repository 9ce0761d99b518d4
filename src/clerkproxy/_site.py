"""The C{Site} that streams request bodies to resources that want them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.resource import IResource
from twisted.web.server import Site
from zope.interface import implementer

from ._accesslog import AccessLog
from ._channel import MAX_HEAD, MAX_REQUEST_LINE, StreamingChannel
from ._deadlines import Deadlines
from ._forwarded import ClientAddress
from ._h2 import HTTP2Settings, ProtocolSelector
from ._interfaces import IStreamingSite
from ._metrics import Metrics
from ._request import StreamingRequest
from ._twisted_compat import header_values

if TYPE_CHECKING:
    from ._channel import StreamingChannel as _Channel

__all__ = ["ClientConnections", "StreamingSite", "build_site"]


class ClientConnections:
    """
    How many connections each client address has open, for
    C{--max-connections-per-client}.  The channel decides which address a
    connection counts under, and when (see L{StreamingChannel}).
    """

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self._metrics = metrics
        self._open: dict[bytes, int] = {}

    def admit(self, client: bytes) -> bool:
        """Count one more connection for C{client}, unless it has its fill."""
        count = self._open.get(client, 0)
        if count >= self.limit:
            self._metrics.connectionRejected("per_client")
            return False
        self._open[client] = count + 1
        return True

    def release(self, client: bytes) -> None:
        """One connection counted under C{client} has closed."""
        count = self._open[client] - 1
        if count:
            self._open[client] = count
        else:
            del self._open[client]

    def count(self, client: bytes) -> int:
        return self._open.get(client, 0)


@implementer(IStreamingSite)
class StreamingSite(Site):
    """
    A C{Site} whose requests stream their bodies to L{IStreamingResource}
    providers and never parse forms.

    It writes no combined-format access log: Twisted's would record every
    full URL, and Clerk's URLs carry session tokens.

    @ivar channels: The open client connections, for draining.
    @ivar draining: Set while the process shuts down: every response then
        closes its connection.
    """

    requestFactory = StreamingRequest
    draining = False
    #: HTTP/2 to clients; off unless L{configure} is given settings.
    http2 = HTTP2Settings(tls=False, h2c=False)

    def buildProtocol(self, addr: Any) -> Any:
        channel: Any = StreamingChannel()  # type: ignore[no-untyped-call]
        channel.factory = self
        channel.site = self
        channel.requestFactory = self.requestFactory
        channel.callLater = self.reactor.callLater
        channel.timeOut = self.timeOut
        http2 = self.http2
        if http2.tls or http2.h2c:
            # Picks HTTP/2 by ALPN or the client preface, per connection.
            return ProtocolSelector(self, channel)
        return channel

    maxRequestLine = MAX_REQUEST_LINE
    #: Unsent bytes a client socket's kernel send queue may hold (Linux's
    #: TCP_NOTSENT_LOWAT; 0 leaves the kernel's default): a client that
    #: stops reading then costs this much kernel memory, not megabytes.
    unsentLimit = 128 * 1024
    maxHeaderSize = MAX_HEAD
    #: Open connections per client, when they are limited.
    clientConnections: ClientConnections | None = None

    def __init__(
        self,
        resource: IResource,
        requestFactory: Any = None,
        *args: Any,
        parsePOSTFormSubmission: bool = False,
        timeout: float | None = None,
        reactor: IReactorTime | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Serve C{resource}, ready for connections as built: header and idle
        deadlines at their defaults (10 s and 60 s), fresh L{Metrics}, no
        access log.  L{configure} (which L{build_site} calls) changes them.

        @param reactor: The clock for deadlines; the global reactor, imported
            now, if not given.
        """
        Site.__init__(
            self,
            resource,
            requestFactory,
            *args,
            parsePOSTFormSubmission=parsePOSTFormSubmission,
            timeout=timeout,
            reactor=reactor,
            **kwargs,
        )
        self.channels: set[_Channel] = set()
        self.configure(self.reactor, 10.0, 60.0)

    def configure(
        self,
        clock: IReactorTime,
        headerTimeout: float,
        idleTimeout: float,
        metrics: Metrics | None = None,
        accessLog: AccessLog | None = None,
        clientAddress: ClientAddress | None = None,
        maxRequestLine: int = MAX_REQUEST_LINE,
        maxHeaderSize: int = MAX_HEAD,
        maxConnectionsPerClient: int = 0,
        http2: HTTP2Settings | None = None,
    ) -> None:
        self.maxRequestLine = maxRequestLine
        self.maxHeaderSize = maxHeaderSize
        self.headerDeadlines: Deadlines[_Channel] = Deadlines(clock, headerTimeout)
        self.idleDeadlines: Deadlines[_Channel] = Deadlines(clock, idleTimeout)
        self.metrics = metrics if metrics is not None else Metrics()
        self.metrics.clientConnections = self.channels.__len__
        self.accessLog = accessLog
        self._clock = self.clock = clock
        self.clientAddress = self._clientAddress = clientAddress or ClientAddress(())
        self.clientConnections = (
            ClientConnections(maxConnectionsPerClient, self.metrics)
            if maxConnectionsPerClient
            else None
        )
        if http2 is not None:
            self.http2 = http2
        self.h2SendDeadlines: Deadlines[Any] = Deadlines(clock, self.http2.sendTimeout)

    def requestStarted(self, request: StreamingRequest) -> None:
        """The request's head is in: it is now in flight."""
        request.startedAt = self._clock.seconds()
        request.inFlight = True
        self.metrics.inFlight += 1

    def log(self, request: http.Request) -> None:
        """Twisted calls this as each response finishes."""
        self._ended(request, request.code)

    def requestAborted(self, request: StreamingRequest) -> None:
        """The connection ended before the response did."""
        self._ended(request, 499)

    def _ended(self, request: Any, status: int) -> None:
        if not getattr(request, "inFlight", False):
            return
        request.inFlight = False
        seconds = self._clock.seconds() - request.startedAt
        metrics = self.metrics
        metrics.inFlight -= 1
        siteName = getattr(request, "siteName", None)
        protocol = request.clientproto
        if status != 499:
            metrics.finished(request.method, status, seconds, protocol)
            if siteName is not None:
                metrics.siteFinished(siteName, status)
        accessLog = self.accessLog
        if accessLog is not None:
            client = request.clientAddressText
            if client is None:
                peer = request.getClientAddress()
                client = self._clientAddress.resolve(
                    getattr(peer, "host", None),
                    header_values(request.requestHeaders, b"X-Forwarded-For"),
                )
            accessLog.write(
                when=self._clock.seconds(),
                client=client.decode("ascii", "replace"),
                method=request.method,
                target=request.uri,
                status=status,
                sent=request.sentLength,
                totalSeconds=seconds,
                upstreamSeconds=request.upstreamSeconds,
                reused=request.upstreamReused,
                protocol=protocol.decode("ascii", "replace"),
                site=siteName,
            )

    def acceptableProtocols(self) -> list[bytes]:
        """What TLS offers by ALPN: C{h2} first when HTTP/2 is on."""
        if self.http2.tls:
            return [b"h2", b"http/1.1"]
        return [b"http/1.1"]

    def drain(self) -> None:
        """Close idle connections now and the rest after their response."""
        self.draining = True
        for channel in list(self.channels):
            channel.drain()


def build_site(
    resource: IResource,
    reactor: IReactorTime,
    header_timeout: float = 10.0,
    idle_timeout: float = 60.0,
    metrics: Metrics | None = None,
    access_log: AccessLog | None = None,
    client_address: ClientAddress | None = None,
    max_request_line: int = MAX_REQUEST_LINE,
    max_header_size: int = MAX_HEAD,
    max_connections_per_client: int = 0,
    http2: HTTP2Settings | None = None,
) -> StreamingSite:
    """
    A L{StreamingSite} serving C{resource}.

    @param header_timeout: Seconds a request head may take to arrive in full.
    @param idle_timeout: Seconds a keep-alive connection may wait for its
        next request.
    @param metrics: Where to count requests; by default the resource's own
        (a L{FrontendAPIProxy} has one), else a new one.
    @param access_log: Where to log each request, if anywhere.
    @param client_address: How to find the client's address for the log.
    @param http2: HTTP/2 to clients (by ALPN on TLS, and with C{h2c} on
        plain connections); off by default.
    @param max_request_line: Longest request line in bytes; 414 above it.
    @param max_header_size: Largest request head (request line and header
        lines) in bytes; 431 above it.
    @param max_connections_per_client: How many connections one client
        address may have open (0: no limit).  The address is the one
        C{client_address} finds, as for C{X-Forwarded-For}.
    """
    site = StreamingSite(resource, reactor=reactor)
    if metrics is None:
        metrics = getattr(resource, "metrics", None)
    site.configure(
        reactor,
        header_timeout,
        idle_timeout,
        metrics,
        access_log,
        client_address,
        max_request_line,
        max_header_size,
        max_connections_per_client,
        http2,
    )
    return site
