"""
The textbook Twisted reverse proxy: Agent, a persistent HTTPConnectionPool
and deliverBody with the response transport registered as producer.
Usage: python twisted_agent.py PORT FAPI_URL CA_PEM
"""

import os
import sys

from twisted.internet import reactor
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    FileBodyProducer,
    HTTPConnectionPool,
)
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

HOP = {
    b"Connection",
    b"Keep-Alive",
    b"Proxy-Connection",
    b"Proxy-Authorization",
    b"Proxy-Authenticate",
    b"Te",
    b"TE",
    b"Trailer",
    b"Transfer-Encoding",
    b"Upgrade",
    b"Host",
    b"Content-Length",
}


class Relay(Protocol):
    def __init__(self, request):
        self.request = request

    def connectionMade(self):
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data):
        self.request.write(data)

    def connectionLost(self, reason):
        self.request.unregisterProducer()
        self.request.finish()


class Proxy(Resource):
    isLeaf = True

    def __init__(self, fapi, ca):
        super().__init__()
        self.fapi = fapi.encode()
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 256
        policy = BrowserLikePolicyForHTTPS(
            trustRoot=Certificate.loadPEM(open(ca, "rb").read())
        )
        self.agent = Agent(reactor, contextFactory=policy, pool=pool)
        self.proxy_url = os.environ["CLERK_PROXY_URL"].encode()
        self.secret = os.environ["CLERK_SECRET_KEY"].encode()

    def render(self, request):
        if not request.uri.startswith(b"/__clerk"):
            request.setResponseCode(404)
            return b""
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name not in HOP:
                headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"Clerk-Proxy-Url", [self.proxy_url])
        headers.setRawHeaders(b"Clerk-Secret-Key", [self.secret])
        headers.setRawHeaders(
            b"X-Forwarded-For", [request.getClientAddress().host.encode()]
        )
        body = None
        if request.content.seek(0, 2):
            request.content.seek(0)
            body = FileBodyProducer(request.content)
        target = self.fapi + (request.uri[len(b"/__clerk") :] or b"/")
        d = self.agent.request(request.method, target, headers, body)

        def respond(response):
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                request.responseHeaders.setRawHeaders(name, values)
            if response.length is not None and isinstance(response.length, int):
                request.setHeader(b"Content-Length", b"%d" % response.length)
            response.deliverBody(Relay(request))

        def fail(reason):
            request.setResponseCode(502)
            request.finish()

        d.addCallbacks(respond, fail)
        return NOT_DONE_YET


if __name__ == "__main__":
    port, fapi, ca = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    site = Site(Proxy(fapi, ca))
    site.log = lambda request: None
    reactor.listenTCP(port, site, interface="127.0.0.1", backlog=1024)
    reactor.run()
