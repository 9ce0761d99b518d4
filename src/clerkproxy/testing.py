"""
In-memory fakes for testing code that embeds the proxy.

L{MemoryFrontendAPI} serves any C{twisted.web} resource as FAPI to a real
L{FrontendAPIProxy}. The proxy uses its real pool and client protocol, but
the connection runs over Twisted's in-memory transports, with no sockets and
no TLS. L{RecordingFrontendAPI} is a ready-made stand-in for that resource.
It records what the proxy sent and answers with a canned response.

    clock = MemoryReactorClock()
    fapi = RecordingFrontendAPI()
    memory = MemoryFrontendAPI(fapi, clock)
    proxy = memory.proxy(ProxyConfig(proxy_url=..., secret_key="sk_live_x"))
    # ... drive a request into a site that mounts `proxy` ...
    memory.flush()
    assert fapi.requests[0].headers.getRawHeaders(b"Clerk-Proxy-Url") == [...]
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from ._config import ProxyConfig
from ._proxy import FrontendAPIProxy
from ._upstream import UpstreamPool

__all__ = ["MemoryFrontendAPI", "RecordedRequest", "RecordingFrontendAPI"]


@attrs.frozen
class RecordedRequest:
    """One request as the fake FAPI received it."""

    method: bytes
    uri: bytes
    headers: Headers
    body: bytes


class RecordingFrontendAPI(Resource):
    """
    Records each request and answers with C{status}, C{headers} and C{body}
    (by default C{200} and C{{}} as JSON). Change them between requests.
    """

    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.requests: list[RecordedRequest] = []
        self.status = 200
        self.headers: list[tuple[bytes, bytes]] = [
            (b"Content-Type", b"application/json")
        ]
        self.body = b"{}"

    def render(self, request: Request) -> bytes:
        content: Any = request.content
        self.requests.append(
            RecordedRequest(
                request.method,
                request.uri,
                request.requestHeaders.copy(),
                content.read(),
            )
        )
        request.setResponseCode(self.status)
        for name, value in self.headers:
            request.responseHeaders.addRawHeader(name, value)
        return self.body


@implementer(IStreamClientEndpoint)
class _MemoryEndpoint:
    def __init__(self, owner: MemoryFrontendAPI) -> None:
        self._owner = owner

    def connect(self, factory: Any) -> Deferred[Any]:
        owner = self._owner
        client = factory.buildProtocol(None)
        server = owner.site.buildProtocol(None)
        pump = iosim.connect(
            server,
            iosim.makeFakeServer(server),
            client,
            iosim.makeFakeClient(client),
            greet=False,
            clock=owner.clock,
        )
        owner._pumps.append(pump)
        owner.connectionsOpened += 1
        return succeed(client)


class MemoryFrontendAPI:
    """
    A fake FAPI reached through in-memory connections. Bytes move only when
    L{flush} is called, so a test decides exactly when FAPI "answers".

    @ivar connectionsOpened: How many connections the proxy opened to it.
    """

    def __init__(self, resource: Resource, clock: Clock) -> None:
        self.clock = clock
        self.site = Site(resource)
        self.site.log = lambda request: None  # type: ignore[method-assign]
        self.connectionsOpened = 0
        self._pumps: list[iosim.IOPump] = []

    def proxy(self, config: ProxyConfig) -> FrontendAPIProxy:
        """A proxy whose FAPI connections all lead here."""
        pool = UpstreamPool(
            self.clock,
            _MemoryEndpoint(self),
            maxConnections=config.pool_size,
            idleTimeout=config.pool_idle_timeout,
        )
        return FrontendAPIProxy(config, self.clock, upstream=pool)

    def flush(self) -> None:
        """Move bytes both ways on every connection until all are quiet."""
        for _ in range(10_000):
            moved = False
            for pump in list(self._pumps):
                moved = pump.pump(advanceClock=False) or moved
            if not moved:
                return
        raise RuntimeError("in-memory FAPI connections never went quiet")
