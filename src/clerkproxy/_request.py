"""
A C{twisted.web} request and channel that stream request bodies.

C{twisted.web.server.Request} buffers the whole body (to memory or a temp
file) and parses forms before any resource sees it.  L{StreamingRequest}
finds the resource as soon as the headers are in; if it provides
L{IStreamingResource}, the body goes to it chunk by chunk and Twisted's
buffering and form parsing never run.  Any other resource is served exactly
as Twisted would.

The request line is read from C{HTTPChannel}'s private attributes before
C{gotLength}, through L{clerkproxy._twisted_compat}, where every private
Twisted name the project uses is kept and pinned by a test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes as unquote

from twisted.python.failure import Failure
from twisted.web import server

from ._twisted_compat import request_line
from .interfaces import IRequestBodyReceiver, IStreamingResource

__all__ = ["StreamingRequest"]


class StreamingRequest(server.Request):
    """
    A request whose body can be relayed while it arrives.

    @ivar bodyComplete: Whether the whole request body has been read.
    """

    _receiver: IRequestBodyReceiver | None = None
    _streaming = False
    _onLost: Callable[[], object] | None = None
    bodyComplete = False
    # Filled in along the way, for metrics and the access log.
    startedAt = 0.0
    inFlight = False
    clientAddressText: bytes | None = None
    upstreamSeconds: float | None = None
    upstreamReused: bool | None = None
    siteName: str | None = None  # with --config, the site that served it

    def watchConnection(self, onLost: Callable[[], object]) -> None:
        """
        Call C{onLost} if the client's connection ends before the response
        does: what C{notifyFinish} offers, without a L{Deferred} per request.
        """
        self._onLost = onLost

    def gotLength(self, length: int | None) -> None:
        channel: Any = self.channel
        started = getattr(channel.site, "requestStarted", None)
        if started is not None:
            started(self)
        if length == 0:
            # Nothing to stream: the ordinary path answers bodiless requests
            # with no extra work.
            server.Request.gotLength(self, length)
            return
        method, target, version = request_line(channel)
        if target[:1] != b"/":
            server.Request.gotLength(self, length)
            return
        self.method = method
        self.uri = target
        self.clientproto = version
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
        channel = self.channel
        if not self.startedWriting and channel is not None:
            if self._streaming and not self.bodyComplete:
                # Answering before the body is in (an early upstream
                # answer, an error): the rest of the body cannot be told
                # apart from a next request, so the connection ends here.
                channel.persistent = False
            if not channel.persistent:
                # Said even when a resource replaced the response headers.
                self.responseHeaders.setRawHeaders(b"Connection", [b"close"])
        server.Request.write(self, data)

    def finish(self) -> None:
        channel = self.channel
        if self._streaming and not self.bodyComplete and channel is not None:
            channel.persistent = False
            discard = getattr(channel, "discardInput", None)
            if discard is not None:
                discard()
        # The watcher usually refers back to this request: break the cycle
        # so that reference counting, not the cyclic collector, frees both.
        self._onLost = self._receiver = None
        server.Request.finish(self)

    def connectionLost(self, reason: Failure) -> None:
        self._receiver = None
        channel: Any = self.channel
        site = channel.site if channel is not None else None
        server.Request.connectionLost(self, reason)
        aborted = getattr(site, "requestAborted", None)
        if aborted is not None and not self.finished:
            aborted(self)
        onLost, self._onLost = self._onLost, None
        if onLost is not None:
            onLost()
