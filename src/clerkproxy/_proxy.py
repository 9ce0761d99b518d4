"""The Frontend API proxy as a C{twisted.web} resource."""

from __future__ import annotations

from typing import Any

from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from ._config import ProxyConfig
from ._deadlines import Deadlines
from ._errors import respond_error
from ._exchange import Exchange, FileSource
from ._forwarded import ClientAddress
from ._headers import injected_block
from ._paths import upstream_target
from ._upstream import UpstreamPool, fapi_endpoint
from .interfaces import IRequestBodyReceiver, IStreamingResource

__all__ = ["FrontendAPIProxy"]


@implementer(IStreamingResource)
class FrontendAPIProxy(Resource):
    """
    Forwards requests under the configured prefix to Clerk's Frontend API.

    Mount it as a site's root or with C{putChild} at the segment the proxy
    URL names; either way it matches the raw request target against the
    prefix from L{ProxyConfig.proxy_url}.  Under L{clerkproxy.build_site}
    request bodies stream; under a plain C{Site} Twisted buffers them first.

    @ivar upstream: The connection pool to FAPI.
    """

    isLeaf = True

    def __init__(
        self,
        config: ProxyConfig,
        reactor: Any,
        trustRoot: IOpenSSLTrustRoot | None = None,
        upstream: UpstreamPool | None = None,
    ) -> None:
        """
        @param reactor: Provides C{IReactorTCP} and C{IReactorTime}.
        @param trustRoot: Roots for FAPI's certificate; the platform's by
            default.
        @param upstream: A pool to use instead of building one.
        """
        Resource.__init__(self)
        self.config = config
        self.clock: IReactorTime = reactor
        self.clientAddress = ClientAddress(config.trusted_proxies)
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
        self.upstream = upstream
        self.deadlines = Deadlines(reactor, config.upstream_timeout)
        self.injected = injected_block(
            config.proxy_url_header, config.secret_key.headerValue()
        )

    def _target(self, request: Request) -> bytes | None:
        config = self.config
        return upstream_target(config.prefix, config.fapi_base_path, request.uri)

    def render(self, request: Request) -> object:
        """Serve a request whose body (if any) is already buffered."""
        target = self._target(request)
        if target is None:
            respond_error(request, 404, "not_found")
            return NOT_DONE_YET
        content: Any = request.content
        length = 0
        if content is not None:
            content.seek(0, 2)
            length = content.tell()
            content.seek(0)
        if length > self.config.max_body_size:
            respond_error(request, 413, "proxy_request_too_large")
            return NOT_DONE_YET
        exchange = Exchange(self, request, target, length, None, False)
        if length:
            exchange._source = FileSource(content, exchange)
        exchange.start()
        return NOT_DONE_YET

    def renderStreaming(  # type: ignore[override]
        self, request: Request, length: int | None
    ) -> IRequestBodyReceiver | None:
        """Serve a request as soon as its headers are in."""
        target = self._target(request)
        if target is None:
            respond_error(request, 404, "not_found")
            return None
        if length is not None and length > self.config.max_body_size:
            respond_error(request, 413, "proxy_request_too_large")
            return None
        exchange = Exchange(self, request, target, length, request.transport, True)  # type: ignore[arg-type]
        exchange.start()
        return exchange
