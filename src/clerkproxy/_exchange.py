"""
One request's round trip to FAPI.

A single L{Exchange} object per request plays every role the trip needs,
so the hot path allocates one object rather than a chain of helpers:

 - C{IRequestBodyReceiver}: takes the client's body as it arrives;
 - C{IPushProducer}: registered on FAPI's socket while the body is sent,
   it pauses the client's socket while FAPI's is full;
 - L{IExchange}: told by the upstream connection about FAPI's answer,
   which it writes to the client.  The connection itself is the producer
   the client's socket pauses when the browser reads slowly.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    DNSLookupError,
)
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from ._client import UpstreamProtocolError
from ._errors import respond_error
from ._headers import downstream_headers, upstream_head
from ._interfaces import IStreamingRequest
from .interfaces import IRequestBodyReceiver

if TYPE_CHECKING:
    from ._client import UpstreamConnection
    from ._proxy import _Proxying

__all__ = ["Exchange", "FileSource"]

#: Body bytes held while no upstream connection is ready to take them.
_HOLD_LIMIT = 64 * 1024
_READ_SIZE = 64 * 1024
#: How long, and how much, an answer nobody waits for may take to drain.
_ORPHAN_GRACE = 2.0
_ORPHAN_LIMIT = 256 * 1024
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_EMPTY_BODY_LENGTH = {b"POST", b"PUT", b"PATCH"}
_NO_BODY = (204, 304)
_STATUS = {"proxy_upstream_timeout": 504, "proxy_request_too_large": 413}
# Twisted's request-line parser already allows only these; checked again
# because the bytes go onto another connection verbatim.
_METHOD_OK = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z").match
_TARGET_OK = re.compile(rb"/[!-~]*\Z").match

_log = Logger(namespace="clerkproxy.exchange")


@implementer(IPushProducer)
class FileSource:
    """A buffered request body (from a plain C{Site}) played as a stream."""

    def __init__(self, content: Any, receiver: IRequestBodyReceiver) -> None:
        self._content = content
        self._receiver = receiver
        self._paused = True
        self._done = False

    def resumeProducing(self) -> None:
        self._paused = False
        while not self._paused and not self._done:
            chunk = self._content.read(_READ_SIZE)
            if not chunk:
                self._done = True
                self._receiver.bodyDone()
                return
            self._receiver.bodyDataReceived(chunk)

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._paused = self._done = True


@implementer(IRequestBodyReceiver, IPushProducer)
class Exchange:
    """
    Relay C{request} to FAPI at C{target} and FAPI's answer back.

    @param length: The request body's length, L{None} if chunked, 0 if none.
    @param source: What to pause when FAPI cannot take more body: the
        client's transport, or a L{FileSource}.
    @param sourceRunning: Whether C{source} is producing already (a socket)
        or waits to be resumed (a file).
    """

    def __init__(
        self,
        proxy: _Proxying,
        request: Request,
        target: bytes,
        length: int | None,
        source: IPushProducer | None,
        sourceRunning: bool,
    ) -> None:
        self._proxy = proxy
        self._request = request
        self._target = target
        self._length = length
        self._hasBody = length != 0
        self._source = source
        self._sourcePaused = not sourceRunning
        self._held: list[bytes] = []
        self._heldSize = 0
        self._received = 0
        self._drained = 0
        self._bodyComplete = not self._hasBody
        self._uploadPaused = False
        self._head = b""
        self._conn: UpstreamConnection | None = None
        self._pending: Deferred[Any] | None = None
        self._grace: IDelayedCall | None = None
        self._retried = False
        self._failure: str | None = None
        self._clientGone = False
        self._responding = False

    def readBuffered(self, content: Any) -> None:
        """Take the body from Twisted's buffer (a plain C{Site}'s request)."""
        self._source = FileSource(content, self)

    # -- starting ---------------------------------------------------------

    def start(self) -> None:
        proxy = self._proxy
        request = self._request
        method = request.method
        target = self._target
        if not _METHOD_OK(method) or not _TARGET_OK(target):
            respond_error(request, 400, "proxy_bad_request")
            return
        length = self._length
        if length is None:
            framing = b"Transfer-Encoding: chunked\r\n"
        elif length or method in _EMPTY_BODY_LENGTH:
            framing = b"Content-Length: %d\r\n" % length
        else:
            framing = b""
        headers = request.requestHeaders
        peer: Any = request.getClientAddress()
        client = proxy.clientAddress.resolve(
            getattr(peer, "host", None), headers.getRawHeaders(b"X-Forwarded-For")
        )
        request.clientAddressText = client  # type: ignore[attr-defined]
        self._head = upstream_head(
            method,
            target,
            headers,
            proxy.hostHeader,
            proxy.injectedFor(request, client),
            client,
            framing,
            proxy.dropHeaders,
        )
        if IStreamingRequest.providedBy(request):
            request.watchConnection(self.clientLost)
        else:
            request.notifyFinish().addErrback(self.clientLost)
        proxy.deadlines.add(self)
        self._started = proxy.clock.seconds()
        self._connect()

    def _connect(self) -> None:
        pool = self._proxy.upstream
        conn = pool.take()
        if conn is not None:
            self._send(conn)
            return
        d = pool.acquire()
        self._pending = d
        d.addCallbacks(self._send, self._connectFailed)

    def _send(self, conn: UpstreamConnection) -> None:
        self._pending = None
        self._conn = conn
        length = self._length
        body = None if not self._hasBody else (-1 if length is None else length)
        conn.send(self, self._head, self._request.method == b"HEAD", body, self)
        if not self._hasBody:
            return
        held, self._held, self._heldSize = self._held, [], 0
        for chunk in held:
            conn.writeBody(chunk)
        if self._bodyComplete:
            conn.endBody()
        elif not self._uploadPaused:
            self._resumeSource()

    # -- failures ---------------------------------------------------------

    def _connectFailed(self, reason: Failure) -> None:
        self._pending = None
        self._failed(reason)

    def _failed(self, reason: Failure) -> None:
        self._proxy.deadlines.remove(self)
        if self._clientGone:
            return
        why = self._failure
        if why is None:
            why = "proxy_request_failed"
            self._proxy.metrics.upstreamError(_kind(reason))
            _log.warn(
                "{upstream} request failed: {error}",
                upstream=self._proxy.name,
                error=_describe(reason),
            )
        elif why == "proxy_upstream_timeout":
            self._proxy.metrics.upstreamError("timeout")
        respond_error(self._request, _STATUS.get(why, 502), why)

    def expired(self) -> None:
        """The upstream deadline passed with no answer from FAPI."""
        self._failure = "proxy_upstream_timeout"
        _log.warn(
            "{upstream} did not answer within {timeout}s",
            upstream=self._proxy.name,
            timeout=self._proxy.upstreamTimeout,
        )
        self._stopUpstream()

    def _stopUpstream(self) -> None:
        """Abandon the upstream side; its failure path then answers."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
            self._failed(Failure(ProxyGaveUpError()))
            return
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def clientLost(self, reason: object = None) -> None:
        """
        The client went away: stop everything upstream, quietly.  One
        exception: a request FAPI already has in full gets a moment to be
        answered, so that a prompt small answer leaves its connection in the
        pool rather than costing a new TLS handshake.
        """
        if self._clientGone:
            return
        self._clientGone = True
        self._proxy.deadlines.remove(self)
        self._held = []
        conn = self._conn
        if conn is not None and self._bodyComplete and not self._responding:
            self._grace = self._proxy.clock.callLater(_ORPHAN_GRACE, self._abandon)
            return
        self._abandon()

    def _abandon(self) -> None:
        self._grace = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def _abortClient(self) -> None:
        channel = getattr(self._request, "channel", None)
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()

    # -- response (IExchange) ---------------------------------------------

    def responseStarted(
        self,
        code: int,
        phrase: bytes,
        headers: dict[bytes, list[bytes]],
        length: int | None,
        connection: dict[bytes, list[bytes]],
    ) -> None:
        proxy = self._proxy
        proxy.deadlines.remove(self)
        self._responding = True
        if self._clientGone:
            return
        request: Any = self._request
        seconds = proxy.clock.seconds() - self._started
        proxy.metrics.upstream.observe(seconds)
        request.upstreamSeconds = seconds
        conn = self._conn
        request.upstreamReused = conn is not None and conn.reused
        request.setResponseCode(code, phrase or None)
        if length is not None and code not in _NO_BODY and request.method != b"HEAD":
            headers[b"Content-Length"] = [b"%d" % length]
        request.responseHeaders = downstream_headers(headers, connection)
        request.registerProducer(self._conn, True)

    def responseData(self, data: bytes) -> None:
        if not self._clientGone:
            self._request.write(data)
            return
        self._drained += len(data)
        if self._drained > _ORPHAN_LIMIT:
            self._cancelGrace()
            self._abandon()

    def responseDone(self) -> None:
        self._conn = None  # back in the pool: never touch it again
        if self._clientGone:
            self._cancelGrace()
            return
        request = self._request
        request.unregisterProducer()
        request.finish()

    def upstreamFailed(self, reason: Failure, nothingReceived: bool) -> None:
        conn, self._conn = self._conn, None
        if self._clientGone:
            self._cancelGrace()
            return
        if self._responding:
            # FAPI failed mid-body: a truncated body must look truncated.
            self._proxy.metrics.upstreamError(_kind(reason))
            _log.warn(
                "{upstream} response broke off: {error}",
                upstream=self._proxy.name,
                error=_describe(reason),
            )
            self._request.unregisterProducer()
            self._abortClient()
            return
        if (
            nothingReceived
            and not self._retried
            and self._failure is None
            and conn is not None
            and conn.reused
            and not self._hasBody
            and self._request.method in _IDEMPOTENT
        ):
            # A pooled connection FAPI had closed: try once on another.
            self._retried = True
            self._connect()
            return
        self._failed(reason)

    def _cancelGrace(self) -> None:
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None

    # -- request body, in (IRequestBodyReceiver) --------------------------

    def bodyDataReceived(self, data: bytes) -> None:
        if self._failure is not None or self._clientGone:
            return
        self._received += len(data)
        if self._received > self._proxy.maxBodySize:
            self._tooLarge()
            return
        conn = self._conn
        if conn is not None:
            conn.writeBody(data)
            if self._uploadPaused:
                # Twisted's channel may have resumed the socket behind our
                # back; FAPI still cannot take more.
                self._pauseSource()
        else:
            self._held.append(data)
            self._heldSize += len(data)
            if self._heldSize >= _HOLD_LIMIT:
                self._pauseSource()

    def bodyDone(self) -> None:
        self._bodyComplete = True
        conn = self._conn
        if conn is not None and self._failure is None:
            conn.endBody()

    def _tooLarge(self) -> None:
        self._failure = "proxy_request_too_large"
        _log.info(
            "Request body over --max-body-size ({limit} bytes)",
            limit=self._proxy.maxBodySize,
        )
        self._held = []
        if self._responding:
            self._abandon()
            self._abortClient()
        else:
            self._stopUpstream()

    # -- request body, out (IPushProducer on FAPI's socket) ----------------

    def pauseProducing(self) -> None:
        self._uploadPaused = True
        self._pauseSource()

    def resumeProducing(self) -> None:
        self._uploadPaused = False
        self._resumeSource()

    def stopProducing(self) -> None:
        self._uploadPaused = True

    def _pauseSource(self) -> None:
        if not self._sourcePaused and self._source is not None:
            self._sourcePaused = True
            self._source.pauseProducing()

    def _resumeSource(self) -> None:
        if self._sourcePaused and self._source is not None:
            self._sourcePaused = False
            self._source.resumeProducing()


class ProxyGaveUpError(Exception):
    """The proxy itself gave up on the upstream connection."""


def _kind(reason: Failure) -> str:
    """The C{kind} label of C{clerkproxy_upstream_errors_total}."""
    if reason.check(DNSLookupError):
        return "dns"
    if reason.check(ConnectError, ConnectionRefusedError, ConnectingCancelledError):
        return "connect"
    if reason.check(SSL.Error):
        return "tls"
    if reason.check(UpstreamProtocolError):
        return "protocol"
    if reason.check(ConnectionLost, ConnectionDone, ConnectionAborted):
        return "reset"
    return "other"


def _describe(reason: Failure) -> str:
    """
    Name what went wrong without formatting any object that might hold the
    request (and so the secret key): exception class names and the short
    messages of transport and TLS errors only.
    """
    names = [reason.type.__name__ if reason.type else "Error"]
    inner = getattr(reason.value, "reasons", None)
    if inner:
        for sub in inner:
            if isinstance(sub, Failure):
                text = sub.getErrorMessage()[:120] if sub.type else ""
                names.append(f"{sub.type.__name__ if sub.type else '?'}({text})")
    elif reason.type is not None and reason.type.__module__.startswith(
        ("twisted.internet", "OpenSSL", "clerkproxy._client")
    ):
        names.append(reason.getErrorMessage()[:160])
    return ": ".join(names)
