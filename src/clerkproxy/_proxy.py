"""
The proxying resources: FAPI under the prefix, and (at the edge, with
C{--app}) the application's origin for everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTCP
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ._config import ProxyConfig, Timeouts
from ._errors import respond_error
from ._exchange import Exchange, Route
from ._forwarded import ClientAddress, valid_host_and_port
from ._headers import APP_DROP, FAPI_DROP, injected_block
from ._interfaces import IStreamingRequest
from ._location import LocationRewrite
from ._metrics import Metrics
from ._paths import upstream_target
from ._upstream import UpstreamPool, fapi_endpoint
from .interfaces import IRequestBodyReceiver, IStreamingResource

if TYPE_CHECKING:
    from ._twisted_compat import IOpenSSLTrustRoot

__all__ = ["AppProxy", "EdgeRouter", "FrontendAPIProxy"]


@implementer(IStreamingResource)
class _Proxying(Resource):
    """
    What every proxying resource shares: rendering buffered or streaming
    requests through an L{Exchange}, and the L{Route} its exchanges take.

    @ivar upstream: The connection pool to the upstream.
    @ivar metrics: Where requests and upstream failures are counted.
    @ivar route: What each exchange needs, built once here.
    """

    isLeaf = True
    name = "upstream"
    dropHeaders: frozenset[bytes] = frozenset()

    def __init__(
        self,
        reactor: Any,
        upstream: UpstreamPool,
        clientAddress: ClientAddress,
        maxBodySize: int,
        timeouts: Timeouts,
        metrics: Metrics | None,
        hostHeader: bytes,
        location: Callable[[bytes], bytes] | None = None,
    ) -> None:
        Resource.__init__(self)
        self.upstream = upstream
        self.clientAddress = clientAddress
        self.maxBodySize = maxBodySize
        if metrics is None:
            metrics = Metrics()
            metrics.upstreamOpened = lambda: upstream.connectionsOpened
            metrics.upstreamPools = upstream.counts
        self.metrics = metrics
        self.route = Route(
            name=self.name,
            pool=upstream,
            clock=reactor,
            metrics=metrics,
            clientAddress=clientAddress,
            hostHeader=hostHeader,
            dropHeaders=self.dropHeaders,
            inject=self.injectedFor,
            maxBodySize=maxBodySize,
            timeouts=timeouts,
            location=location,
        )

    def close(self) -> Deferred[None]:
        """
        Close the upstream pool: idle connections now, the rest as their
        requests end; refuse new work.  Call it when your service stops.
        Fires once the idle connections are shut.
        """
        return self.upstream.close().addCallback(lambda _: None)

    def target(self, uri: bytes) -> bytes | None:
        """Where C{uri} goes upstream, or L{None} if it is not ours."""
        raise NotImplementedError

    def injectedFor(self, request: Request, client: bytes) -> bytes:
        """Header lines the proxy adds to this request upstream."""
        raise NotImplementedError

    def render(self, request: Request) -> object:
        """Serve a request whose body (if any) is already buffered."""
        # The answer carries the upstream's headers and nothing else: no
        # Content-Type it did not send.
        request.defaultContentType = None
        target = self.target(request.uri)
        if target is None:
            respond_error(request, 404, "not_found")
            return NOT_DONE_YET
        content: Any = request.content
        length = 0
        if content is not None:
            content.seek(0, 2)
            length = content.tell()
            content.seek(0)
        if length > self.maxBodySize:
            respond_error(request, 413, "proxy_request_too_large")
            return NOT_DONE_YET
        exchange = Exchange(self.route, request, target, length, None, False)
        if length:
            exchange.readBuffered(content)
        exchange.start()
        return NOT_DONE_YET

    def renderStreaming(  # type: ignore[override]
        self, request: Request, length: int | None
    ) -> IRequestBodyReceiver | None:
        """Serve a request as soon as its head is in."""
        request.defaultContentType = None
        target = self.target(request.uri)
        if target is None:
            respond_error(request, 404, "not_found")
            return None
        if length is not None and length > self.maxBodySize:
            respond_error(request, 413, "proxy_request_too_large")
            return None
        if length is None and IStreamingRequest.providedBy(request):
            # The channel refuses a chunk size that would go past this.
            request.maxBodySize = self.maxBodySize
        transport: Any = request.transport
        exchange = Exchange(self.route, request, target, length, transport, True)
        exchange.start()
        return exchange


class FrontendAPIProxy(_Proxying):
    """
    Forwards requests under the configured prefix to Clerk's Frontend API.

    Mount it as a site's root or with C{putChild} at the segment the proxy
    URL names; either way it matches the raw request target against the
    prefix from L{ProxyConfig.proxy_url}.  Under L{clerkproxy.build_site}
    request bodies stream; under a plain C{Site} Twisted buffers them first.
    """

    name = "FAPI"
    dropHeaders = FAPI_DROP

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any,
        trustRoot: IOpenSSLTrustRoot | None = None,
        upstream: UpstreamPool | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        """
        @param reactor: Provides C{IReactorTCP} and C{IReactorTime}.
        @param trustRoot: Roots for FAPI's certificate; the platform's by
            default.
        @param upstream: A pool to use instead of building one.
        @param metrics: Where to count; a new L{Metrics} by default.
        """
        if upstream is None:
            tcp: IReactorTCP = reactor
            upstream = UpstreamPool(
                reactor,
                fapi_endpoint(
                    tcp,
                    config.fapi_host,
                    config.fapi_port,
                    trustRoot,
                    config.connect_timeout,
                ),
                maxConnections=config.pool_size,
                idleTimeout=config.pool_idle_timeout,
            )
        self.config = config
        self._injected = injected_block(
            config.proxy_url_header, config.secret_key.headerValue()
        )
        _Proxying.__init__(
            self,
            reactor,
            upstream,
            ClientAddress(config.trusted_proxies),
            config.max_body_size,
            config.timeouts,
            metrics,
            config.fapi_host_header,
            LocationRewrite.fromConfig(config),
        )

    def target(self, uri: bytes) -> bytes | None:
        config = self.config
        return upstream_target(config.prefix, config.fapi_base_path, uri)

    def injectedFor(self, request: Request, client: bytes) -> bytes:
        return self._injected


class AppProxy(_Proxying):
    """
    Forwards everything it is given to the application's origin, with
    C{X-Forwarded-For}, C{-Proto} and C{-Host} set by the proxy and none of
    Clerk's headers: a client's C{Clerk-Secret-Key} is dropped like any
    header the proxy owns.
    """

    name = "app"
    dropHeaders = APP_DROP

    def __init__(
        self,
        reactor: Any,
        upstream: UpstreamPool,
        hostHeader: bytes,
        basePath: bytes,
        clientAddress: ClientAddress,
        maxBodySize: int,
        timeouts: Timeouts,
        metrics: Metrics | None = None,
    ) -> None:
        self._base = basePath
        _Proxying.__init__(
            self,
            reactor,
            upstream,
            clientAddress,
            maxBodySize,
            timeouts,
            metrics,
            hostHeader,
        )

    def target(self, uri: bytes) -> bytes | None:
        if uri[:1] != b"/":
            return None
        return self._base + uri if self._base else uri

    def injectedFor(self, request: Request, client: bytes) -> bytes:
        proto = b"https" if request.isSecure() else b"http"
        host = request.requestHeaders.getRawHeaders(b"Host")
        lines = b"X-Forwarded-Proto: " + proto + b"\r\n"
        # Only one Host, and only a plain host name or address with an
        # optional port: anything else is not passed on at all.
        if host and len(host) == 1 and valid_host_and_port(host[0]):
            lines += b"X-Forwarded-Host: " + host[0] + b"\r\n"
        return lines


@implementer(IStreamingResource)
class EdgeRouter(Resource):
    """
    The edge box's root: the proxy prefix goes to FAPI, everything else to
    the application (or a 404 when there is none).
    """

    isLeaf = True

    def __init__(self, fapi: FrontendAPIProxy, app: AppProxy | None) -> None:
        Resource.__init__(self)
        self.fapi = fapi
        self.app = app
        self.metrics = fapi.metrics

    def _route(self, request: Request) -> _Proxying | None:
        uri = request.uri
        if self.app is None or self.fapi.target(uri) is not None:
            return self.fapi
        if uri[:2] == b"//" and self.fapi.target(b"/" + uri.lstrip(b"/")) is not None:
            # //__clerk/...: not ours as written, but an application (or a
            # framework in front of it) that merges slashes would read it
            # as the proxy's path.  It goes nowhere.
            return None
        return self.app

    def render(self, request: Request) -> object:
        route = self._route(request)
        if route is None:
            respond_error(request, 404, "not_found")
            return NOT_DONE_YET
        return route.render(request)

    def renderStreaming(  # type: ignore[override]
        self, request: Request, length: int | None
    ) -> IRequestBodyReceiver | None:
        route = self._route(request)
        if route is None:
            respond_error(request, 404, "not_found")
            return None
        return route.renderStreaming(request, length)
