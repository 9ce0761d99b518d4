"""
A C{twisted.web} request and channel that stream request bodies.

C{twisted.web.server.Request} buffers the whole body (to memory or a temp
file) and parses forms before any resource sees it.  L{StreamingRequest}
finds the resource as soon as the headers are in; if it provides
L{IStreamingResource}, the body goes to it chunk by chunk and Twisted's
buffering and form parsing never run.  Any other resource is served exactly
as Twisted would.

This leans on three private attributes of C{HTTPChannel} (C{_command},
C{_path}, C{_version}, set from the request line before C{gotLength}); the
test suite pins them so that a Twisted upgrade that moves them fails loudly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.server import unquote  # type: ignore[attr-defined]

from .interfaces import IRequestBodyReceiver, IStreamingResource

__all__ = ["StreamingChannel", "StreamingRequest"]


class StreamingRequest(server.Request):
    """
    A request whose body can be relayed while it arrives.

    @ivar bodyComplete: Whether the whole request body has been read.
    """

    _receiver: IRequestBodyReceiver | None = None
    _streaming = False
    _onLost: Callable[[], object] | None = None
    bodyComplete = False

    def watchConnection(self, onLost: Callable[[], object]) -> None:
        """
        Call C{onLost} if the client's connection ends before the response
        does: what C{notifyFinish} offers, without a L{Deferred} per request.
        """
        self._onLost = onLost

    def gotLength(self, length: int | None) -> None:
        if length == 0:
            # Nothing to stream: the ordinary path answers bodiless requests
            # with no extra work.
            server.Request.gotLength(self, length)
            return
        channel: Any = self.channel
        target: bytes = channel._path
        if target[:1] != b"/":
            server.Request.gotLength(self, length)
            return
        self.method = channel._command
        self.uri = target
        self.clientproto = channel._version
        self.path = target.split(b"?", 1)[0]
        self.args = {}
        self.prepath = []
        self.postpath = list(map(unquote, self.path[1:].split(b"/")))
        try:
            resource = channel.site.getResourceFor(self)
        except Exception:
            resource = None  # process() will meet the same error and report it
        if not IStreamingResource.providedBy(resource):
            server.Request.gotLength(self, length)
            return
        self._streaming = True
        self.site = channel.site
        self._receiver = resource.renderStreaming(self, length)

    def handleContentChunk(self, data: bytes) -> None:
        if not self._streaming:
            server.Request.handleContentChunk(self, data)
        elif self._receiver is not None and not self.finished:
            self._receiver.bodyDataReceived(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if not self._streaming:
            server.Request.requestReceived(self, command, path, version)
            return
        self.bodyComplete = True
        if self._receiver is not None and not self.finished:
            self._receiver.bodyDone()

    def write(self, data: bytes) -> None:
        if (
            not self.startedWriting
            and self._streaming
            and not self.bodyComplete
            and self.channel is not None
        ):
            # Answering before the body is in (an early upstream answer, an
            # error): the rest of the body cannot be told apart from a next
            # request, so this connection ends with this response.
            self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            self.channel.persistent = False
        server.Request.write(self, data)

    def finish(self) -> None:
        channel = self.channel
        if self._streaming and not self.bodyComplete and channel is not None:
            channel.persistent = False
            if isinstance(channel, StreamingChannel):
                channel.discardInput()
        # The watcher usually refers back to this request: break the cycle
        # so that reference counting, not the cyclic collector, frees both.
        self._onLost = self._receiver = None
        server.Request.finish(self)

    def connectionLost(self, reason: Failure) -> None:
        self._receiver = None
        server.Request.connectionLost(self, reason)
        onLost, self._onLost = self._onLost, None
        if onLost is not None:
            onLost()


class StreamingChannel(http.HTTPChannel):
    """
    C{HTTPChannel} with stricter framing, and a way to stop reading a
    request whose answer was sent before its body ended.

    Twisted already rejects with 400: differing, repeated or signed
    C{Content-Length}, C{Content-Length} with C{Transfer-Encoding},
    whitespace before a colon, and NUL, CR or LF in a header value.  This
    adds: any transfer coding but C{chunked} (C{identity} included), and
    C{Transfer-Encoding} on an HTTP/1.0 request.  It also honours
    C{Connection: close} wherever it appears among the tokens.
    """

    _discarding = False

    def discardInput(self) -> None:
        """Ignore everything the client sends from now on."""
        self._discarding = True

    def dataReceived(self, data: bytes) -> None:
        if not self._discarding:
            http.HTTPChannel.dataReceived(self, data)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._discarding:
            http.HTTPChannel.rawDataReceived(self, data)

    def allContentReceived(self) -> None:
        if not self._discarding:
            http.HTTPChannel.allContentReceived(self)

    def _send100Continue(self) -> None:
        if not self._discarding:
            http.HTTPChannel._send100Continue(self)

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        Twisted reads only the first C{Connection} header and splits it on
        spaces, so C{Connection: keep-alive, close} or a second header
        saying C{close} go unnoticed; read every value, split on commas.
        """
        tokens: set[bytes] = set()
        for value in request.requestHeaders.getRawHeaders(b"Connection", ()):
            tokens.update(t.strip().lower() for t in value.split(b","))
        if version == b"HTTP/1.1" and b"close" not in tokens:
            return True
        if version == b"HTTP/1.1":
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        return False

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        if header == b"Transfer-Encoding" and (
            data.lower() != b"chunked" or self._version != b"HTTP/1.1"
        ):
            return self._failChooseTransferDecoder()
        ok: bool = http.HTTPChannel._maybeChooseTransferDecoder(self, header, data)
        return ok
