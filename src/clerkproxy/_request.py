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
from zope.interface import implementer

from ._errors import respond_error
from ._interfaces import IStreamingChannel, IStreamingRequest, IStreamingSite
from ._twisted_compat import request_line
from .interfaces import IRequestBodyReceiver, IStreamingResource

__all__ = ["StreamingRequest"]


@implementer(IStreamingRequest)
class StreamingRequest(server.Request):
    """
    A request whose body can be relayed while it arrives.

    @ivar bodyComplete: Whether the whole request body has been read.
    @ivar maxBodySize: The most body bytes the resource takes, if it said
        (it may, in C{renderStreaming}); the channel refuses a chunk size
        that goes past it.
    """

    _receiver: IRequestBodyReceiver | None = None
    _streaming = False
    _bodiless = False
    _onLost: Callable[[], object] | None = None
    # The site's hooks, if it provides them; found once, at gotLength.
    _siteHooks: IStreamingSite | None = None
    bodyComplete = False
    maxBodySize: int | None = None
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
        site = channel.site
        if IStreamingSite.providedBy(site):
            self._siteHooks = site
            site.requestStarted(self)
        if length == 0:
            # Nothing to stream: the resource is found once the request is
            # complete, in requestReceived.
            self._bodiless = True
            server.Request.gotLength(self, length)
            return
        method, target, version = request_line(channel)
        resource = self._locate(method, target, version)
        if resource is None:
            server.Request.gotLength(self, length)
            return
        self._streaming = True
        self._receiver = resource.renderStreaming(self, length)

    def _locate(
        self, method: bytes, target: bytes, version: bytes
    ) -> IStreamingResource | None:
        """
        Find the resource for a request line, as C{process} would, and
        return it if it provides L{IStreamingResource}.  The request is
        then set up as C{requestReceived} and C{process} leave it, but for
        C{args}: a streaming resource gets the query in C{uri}, unparsed,
        and Twisted's default C{Server} and C{Date} headers are not set.
        """
        if target[:1] != b"/":
            return None
        self._setUp(method, target, version)
        channel: Any = self.channel
        try:
            resource = channel.site.getResourceFor(self)
        except Exception:
            return None  # process() will meet the same error and report it
        if not IStreamingResource.providedBy(resource):
            return None
        self.site = channel.site
        return resource

    def _setUp(self, method: bytes, target: bytes, version: bytes) -> None:
        """The request line, path and (empty) args, as Twisted would set them."""
        self.method = method
        self.uri = target
        self.clientproto = version
        self.path = target.split(b"?", 1)[0]
        self.args = {}
        self.prepath = []
        self.postpath = list(map(unquote, self.path[1:].split(b"/")))

    def handleContentChunk(self, data: bytes) -> None:
        if not self._streaming:
            server.Request.handleContentChunk(self, data)
        elif self._receiver is not None and not self.finished:
            self._receiver.bodyDataReceived(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._streaming:
            self.bodyComplete = True
            if self._receiver is not None and not self.finished:
                self._receiver.bodyDone()
            return
        if self._bodiless and path[:1] == b"/":
            # A request without a body, for a site whose root is a leaf
            # that streams (the proxy's own roots: no traversal, so nothing
            # a resource's getChild could see differently), is rendered as
            # process() would, less Twisted's query and form parsing and
            # default headers, which the proxy's answer replaces anyway.
            channel: Any = self.channel
            site = channel.site
            root = site.resource
            if getattr(root, "isLeaf", False) and IStreamingResource.providedBy(root):
                self._setUp(command, path, version)
                self.site = site
                self.sitepath = []  # type: ignore[var-annotated]
                try:
                    self.render(root)  # type: ignore[no-untyped-call]
                except Exception:
                    self.processingFailed(Failure())  # type: ignore[no-untyped-call]
                return
        server.Request.requestReceived(self, command, path, version)

    def refuseBody(self, status: int) -> bool:
        """
        The channel refuses the rest of this request's body (C{status} 400
        or 413): the receiver is told the client is gone, so that whatever
        it started upstream stops at once, and the client gets the error,
        or an aborted connection if its response had begun.

        @return: Whether this request handled it; if not, the channel
            answers by itself.
        """
        if not self._streaming or self.finished or self.channel is None:
            return False
        onLost, self._onLost = self._onLost, None
        self._receiver = None
        if onLost is not None:
            onLost()
        if self.startedWriting:
            self.channel.transport.abortConnection()  # type: ignore[union-attr]
        elif status == 413:
            respond_error(self, 413, "proxy_request_too_large")
        else:
            respond_error(self, 400, "proxy_bad_request")
        return True

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
            if IStreamingChannel.providedBy(channel):
                channel.discardInput()
        # The watcher usually refers back to this request: break the cycle
        # so that reference counting, not the cyclic collector, frees both.
        self._onLost = self._receiver = None
        server.Request.finish(self)

    def connectionLost(self, reason: Failure) -> None:
        self._receiver = None
        server.Request.connectionLost(self, reason)
        site = self._siteHooks
        if site is not None and not self.finished:
            site.requestAborted(self)
        onLost, self._onLost = self._onLost, None
        if onLost is not None:
            onLost()
