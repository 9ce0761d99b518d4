"""
A stand-in for Clerk's Frontend API, served over TLS on loopback.

It records every request it sees (raw header list, body, when the first body
bytes arrived) and answers according to the path, so tests can check what
the proxy sent and how it relays each kind of answer.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web import http, server
from twisted.web.resource import Resource

GZIPPED = gzip.compress(b'{"object":"environment"}' * 20)
PROBE_JS = b"""
window.addEventListener("load", function () {
  var items = ["page=" + performance.getEntriesByType("navigation")[0].nextHopProtocol];
  performance.getEntriesByType("resource").forEach(function (e) {
    items.push(e.name.split("/").pop() + "=" + e.nextHopProtocol);
  });
  document.getElementById("out").textContent = items.join(" ");
});
"""


class RecordingRequest(server.Request):
    """Notes when body bytes first arrive, before Twisted buffers them all."""

    def gotLength(self, length: int | None) -> None:
        server.Request.gotLength(self, length)
        self.channel.site.recorder.firstBodyBytes = Deferred()
        self._firstSeen = False

    def handleContentChunk(self, data: bytes) -> None:
        if not self._firstSeen:
            self._firstSeen = True
            d = self.channel.site.recorder.firstBodyBytes
            if d is not None and not d.called:
                d.callback(data)
        server.Request.handleContentChunk(self, data)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.firstBodyBytes: Deferred[bytes] | None = None
        self.stalled: list[server.Request] = []
        self.connections = 0
        self.expected: tuple[str, str] | None = None  # (proxy URL, key) FAPI knows
        self.streams: list[dict[str, Any]] = []


class FakeFAPI(Resource):
    isLeaf = True

    def __init__(self, recorder: Recorder, clock: Any) -> None:
        super().__init__()
        self.recorder = recorder
        self.clock = clock

    def render(self, request: server.Request) -> Any:
        body = request.content.read()
        raw = [
            [name.decode(), value.decode()]
            for name, values in request.requestHeaders.getAllRawHeaders()
            for value in values
        ]
        record = {
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "headers": raw,
            "body_length": len(body),
            "body": body.decode("latin-1") if len(body) < 4096 else None,
            "peer": request.getClientAddress().port,
        }
        self.recorder.seen.append(record)
        path = request.path
        if path.startswith(b"/slow"):

            def answer() -> None:
                if not request.finished and request.channel is not None:
                    request.setHeader(b"Content-Type", b"application/json")
                    request.write(b'{"slow":true}')
                    request.finish()

            self.clock.callLater(0.8, answer)
            return server.NOT_DONE_YET
        if (
            path in (b"/v1/environment", b"/v1/proxy-health")
            and self.recorder.expected is not None
        ):
            proxy_url, secret = self.recorder.expected
            got_url = request.getHeader(b"Clerk-Proxy-Url")
            got_key = request.getHeader(b"Clerk-Secret-Key")
            request.setHeader(b"Content-Type", b"application/json")
            if not got_key:
                request.setResponseCode(400)
                return b'{"errors":[{"code":"proxy_request_missing_secret_key"}]}'
            if got_key.decode() != secret:
                request.setResponseCode(401)
                return b'{"errors":[{"code":"proxy_request_invalid_secret_key"}]}'
            if got_url is None or got_url.decode() != proxy_url:
                request.setResponseCode(400)
                return b'{"errors":[{"code":"host_invalid"}]}'
            if path == b"/v1/proxy-health":
                xff = (request.getHeader(b"X-Forwarded-For") or b"").decode()
                return json.dumps(
                    {"status": "healthy", "x_forwarded_for": xff}
                ).encode()
            return b'{"object":"environment"}'
        if path.startswith(b"/stall"):
            self.recorder.stalled.append(request)
            return server.NOT_DONE_YET
        if path.startswith(b"/cookies"):
            request.responseHeaders.addRawHeader(
                b"Set-Cookie",
                b"__client=abc; Path=/__clerk; HttpOnly; Secure; SameSite=Lax",
            )
            request.responseHeaders.addRawHeader(
                b"Set-Cookie",
                b"__client_uat=1700000000; Path=/; Domain=app.test; Secure",
            )
            request.responseHeaders.addRawHeader(
                b"Set-Cookie", b"__session=x, y; Path=/"
            )
        if path.startswith(b"/no-content-type"):
            request.defaultContentType = None
            return b"untyped"
        if path == b"/npm/probe.js":
            # For the browser test: report how the page and this script came.
            request.setHeader(b"Content-Type", b"application/javascript")
            return PROBE_JS
        if path.startswith(b"/redirect"):
            request.setResponseCode(302)
            request.setHeader(
                b"Location", b"https://accounts.google.com/o/oauth2/auth?x=1"
            )
            return b""
        if path.startswith(b"/gzip"):
            request.setHeader(b"Content-Encoding", b"gzip")
            request.setHeader(b"Content-Type", b"application/json")
            return GZIPPED
        if path.startswith(b"/hop"):
            request.setHeader(b"Connection", b"X-Secret-Hop")
            request.setHeader(b"X-Secret-Hop", b"1")
            request.setHeader(b"Proxy-Authenticate", b"Basic")
            request.setHeader(b"X-End-To-End", b"kept")
        if path.startswith(b"/status/"):
            request.setResponseCode(int(path.rsplit(b"/", 1)[1]))
            if request.code in (204, 304):
                return b""
        if path.startswith(b"/big/"):
            return self._stream(request, int(path.rsplit(b"/", 1)[1]))
        if path.startswith(b"/truncate"):
            request.setHeader(b"Content-Length", b"100000")
            request.write(b"x" * 1000)
            self.clock.callLater(0.05, request.channel.transport.abortConnection)
            return server.NOT_DONE_YET
        if path.startswith(b"/chunked-truncate"):
            request.write(b"x" * 1000)  # no Content-Length: chunked
            self.clock.callLater(0.05, request.channel.transport.abortConnection)
            return server.NOT_DONE_YET
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"X-Fapi-Seen", b"yes")
        return json.dumps(record).encode()

    def _stream(self, request: server.Request, size: int) -> Any:
        """Write C{size} bytes as fast as the consumer allows."""
        request.setHeader(b"Content-Length", b"%d" % size)
        chunk = b"z" * 65536
        state = {"left": size, "paused": False}
        self.recorder.streams.append(state)

        class Producer:
            def pauseProducing(self) -> None:
                state["paused"] = True

            def resumeProducing(self) -> None:
                state["paused"] = False
                while not state["paused"] and state["left"] > 0:
                    n = min(len(chunk), state["left"])
                    state["left"] -= n
                    request.write(chunk[:n])
                if state["left"] == 0 and not request.finished:
                    request.unregisterProducer()
                    request.finish()
                    state["left"] = -1

            def stopProducing(self) -> None:
                state["left"] = -1

        producer = Producer()
        request.registerProducer(producer, True)
        producer.resumeProducing()
        return server.NOT_DONE_YET


class CountingChannel(http.HTTPChannel):
    def connectionMade(self) -> None:
        self.site.recorder.connections += 1
        http.HTTPChannel.connectionMade(self)


def make_site(recorder: Recorder, clock: Any) -> server.Site:
    site = server.Site(FakeFAPI(recorder, clock), requestFactory=RecordingRequest)
    site.recorder = recorder  # type: ignore[attr-defined]
    site.protocol = lambda: http._GenericHTTPChannelProtocol(CountingChannel())  # type: ignore[assignment]
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
