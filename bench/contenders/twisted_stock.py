"""
Twisted's stock ReverseProxyResource, made to speak TLS to the upstream by
handing it a reactor whose connectTCP is connectSSL.  Everything else is as
Twisted ships it: HTTP/1.0, a connection per request, buffered bodies.
Usage: python twisted_stock.py PORT FAPI_HOST FAPI_PORT CA_PEM
"""

import os
import sys

from twisted.internet import reactor
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Site


class StockWithHeaders(ReverseProxyResource):
    """Only adds the three Clerk headers; getChild is overridden because the
    stock one hard-codes its class (twisted#7806)."""

    def getChild(self, path, request):
        from urllib.parse import quote as urlquote

        return StockWithHeaders(
            self.host,
            self.port,
            self.path + b"/" + urlquote(path, safe=b"").encode("utf-8"),
            self.reactor,
        )

    def render(self, request):
        request.requestHeaders.setRawHeaders(
            b"Clerk-Proxy-Url", [os.environ["CLERK_PROXY_URL"].encode()]
        )
        request.requestHeaders.setRawHeaders(
            b"Clerk-Secret-Key", [os.environ["CLERK_SECRET_KEY"].encode()]
        )
        request.requestHeaders.setRawHeaders(
            b"X-Forwarded-For", [request.getClientAddress().host.encode()]
        )
        return super().render(request)


class TLSReactor:
    def __init__(self, host, ca):
        self.options = optionsForClientTLS(
            host, trustRoot=Certificate.loadPEM(open(ca, "rb").read())
        )

    def connectTCP(self, host, port, factory, *args, **kwargs):
        return reactor.connectSSL(host, port, factory, self.options)


if __name__ == "__main__":
    port, host, fapi_port, ca = (
        int(sys.argv[1]),
        sys.argv[2],
        int(sys.argv[3]),
        sys.argv[4],
    )
    root = StockWithHeaders(host, fapi_port, b"", reactor=TLSReactor(host, ca))
    # The prefix: requests to /__clerk/... reach the root's child lookups, so
    # mount it at /__clerk by nesting.
    from twisted.web.resource import Resource

    top = Resource()
    top.putChild(b"__clerk", root)
    site = Site(top)
    site.log = lambda request: None
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)
    reactor.run()
