"""
One request's round trip to FAPI.

A single L{Exchange} object per request plays every role the trip needs,
so the hot path allocates one object rather than a chain of helpers:

 - C{IRequestBodyReceiver}: takes the client's body as it arrives;
 - C{IBodyProducer}: hands that body to the upstream connection, pausing
   the client's socket while FAPI's is full;
 - C{IProtocol}: takes FAPI's response body and writes it to the client,
   whose socket pauses FAPI's while the client is slow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import (
    Request as UpstreamRequest,
)
from twisted.web._newclient import (
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from ._errors import respond_error
from ._headers import downstream_headers, upstream_headers
from .interfaces import IRequestBodyReceiver

if TYPE_CHECKING:
    from ._proxy import FrontendAPIProxy
    from ._upstream import _PooledProtocol

__all__ = ["Exchange", "FileSource"]

#: Body bytes held while no upstream connection is ready to take them.
_HOLD_LIMIT = 64 * 1024
_READ_SIZE = 64 * 1024
#: How long, and how much, an answer nobody waits for may take to drain.
_ORPHAN_GRACE = 2.0
_ORPHAN_LIMIT = 256 * 1024
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_NO_BODY = (204, 304)

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


@implementer(IRequestBodyReceiver, IBodyProducer)
class Exchange(Protocol):
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
        proxy: FrontendAPIProxy,
        request: Request,
        target: bytes,
        length: int | None,
        source: IPushProducer | None,
        sourceRunning: bool,
    ) -> None:
        self._proxy = proxy
        self._request = request
        self._target = target
        self.length = UNKNOWN_LENGTH if length is None else length
        self._hasBody = length != 0
        self._source = source
        self._sourcePaused = not sourceRunning
        self._held: list[bytes] = []
        self._heldSize = 0
        self._received = 0
        self._drained = 0
        self._consumer: IConsumer | None = None
        self._uploadDone: Deferred[None] | None = None
        self._uploadPaused = False
        self._bodyComplete = not self._hasBody
        self._pending: Deferred[Any] | None = None
        self._timer: IDelayedCall | None = None
        self._upstream: UpstreamRequest | None = None
        self._proto: _PooledProtocol | None = None
        self._retried = False
        self._failure: str | None = None
        self._clientGone = False
        self._responding = False

    # -- starting ---------------------------------------------------------

    def start(self) -> None:
        proxy = self._proxy
        config = proxy.config
        request = self._request
        peer = request.getClientAddress()
        host = getattr(peer, "host", None)
        headers = upstream_headers(
            request.requestHeaders,
            config.fapi_host_header,
            config.proxy_url_header,
            config.secret_key.headerValue(),
            proxy.clientAddress.resolve(
                host, request.requestHeaders.getRawHeaders(b"X-Forwarded-For")
            ),
        )
        try:
            self._upstream = UpstreamRequest(
                request.method,
                self._target,
                headers,
                self if self._hasBody else None,
                persistent=True,
            )
        except ValueError:
            # A method or target Twisted's client refuses to put on the wire.
            respond_error(request, 400, "proxy_bad_request")
            return
        request.notifyFinish().addErrback(self._lostClient)
        self._timer = proxy.clock.callLater(config.upstream_timeout, self._timedOut)
        self._acquire()

    def _acquire(self) -> None:
        d = self._proxy.upstream.acquire()
        self._pending = d
        d.addCallbacks(self._connected, self._failed)

    def _connected(self, proto: _PooledProtocol) -> None:
        self._pending = None
        self._proto = proto
        assert self._upstream is not None
        d = proto.request(self._upstream)
        parser = proto._parser
        self._connHeaders = parser.connHeaders if parser is not None else None
        if not d.called:
            self._pending = d
        d.addCallbacks(self._gotResponse, self._failed)

    # -- failures ---------------------------------------------------------

    def _retryable(self, reason: Failure) -> bool:
        proto = self._proto
        if self._retried or proto is None or not proto.reused or self._clientGone:
            return False
        if reason.check(RequestNotSent):
            return True
        if self._hasBody or self._request.method not in _IDEMPOTENT:
            return False
        return (
            reason.check(ResponseNeverReceived, RequestTransmissionFailed) is not None
        )

    def _failed(self, reason: Failure) -> None:
        self._pending = None
        if self._clientGone:
            self._stopTimer()
            return
        if self._failure is None and self._retryable(reason):
            self._retried = True
            self._acquire()
            return
        self._stopTimer()
        why = self._failure
        if why is None:
            why = "proxy_request_failed"
            _log.warn(
                "FAPI request failed: {error}",
                error=_describe(reason),
            )
        if self._responding or self._request.startedWriting:
            self._abortClient()
            return
        status = {"proxy_upstream_timeout": 504, "proxy_request_too_large": 413}
        respond_error(self._request, status.get(why, 502), why)

    def _timedOut(self) -> None:
        self._timer = None
        self._failure = "proxy_upstream_timeout"
        _log.warn(
            "FAPI did not answer within {timeout}s",
            timeout=self._proxy.config.upstream_timeout,
        )
        self._cancelPending()

    def _cancelPending(self) -> None:
        pending = self._pending
        if pending is not None:
            self._pending = None
            pending.cancel()

    def _stopTimer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _lostClient(self, reason: Failure) -> None:
        """
        The client went away: stop everything upstream, quietly.  One
        exception: a request FAPI already has in full gets a moment to be
        answered, so that a prompt small answer leaves its connection in the
        pool rather than costing a new TLS handshake.
        """
        self._clientGone = True
        self._stopTimer()
        self._endUpload(CancelledError())
        proto = self._proto
        if self._pending is not None and proto is not None and proto.state == "WAITING":
            self._timer = self._proxy.clock.callLater(
                _ORPHAN_GRACE, self._cancelPending
            )
            return
        self._cancelPending()
        self._stopResponse()

    def _abortClient(self) -> None:
        channel = getattr(self._request, "channel", None)
        if channel is not None and channel.transport is not None:
            channel.transport.abortConnection()

    # -- response ---------------------------------------------------------

    def _gotResponse(self, response: IResponse) -> None:
        self._pending = None
        self._stopTimer()
        request = self._request
        self._responding = True
        if self._clientGone:
            # Drain a small answer for the pool's sake, within the grace.
            self._timer = self._proxy.clock.callLater(_ORPHAN_GRACE, self._stopResponse)
            response.deliverBody(self)
            return
        request.setResponseCode(response.code, response.phrase or None)
        connHeaders = self._connHeaders
        headers = downstream_headers(
            response.headers, connHeaders if connHeaders is not None else _EMPTY
        )
        length = response.length
        if (
            length is not UNKNOWN_LENGTH
            and response.code not in _NO_BODY
            and request.method != b"HEAD"
        ):
            headers._rawHeaders[b"Content-Length"] = [b"%d" % length]
        request.responseHeaders = headers
        response.deliverBody(self)

    def connectionMade(self) -> None:
        if not self._clientGone:
            self._request.registerProducer(self.transport, True)

    def _stopResponse(self) -> None:
        """Drop FAPI's connection mid-answer; it cannot be reused anyway."""
        proto, self._proto = self._proto, None
        if proto is not None and proto.state != "CONNECTION_LOST":
            transport: Any = proto.transport
            transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if not self._clientGone:
            self._request.write(data)
            return
        self._drained += len(data)
        if self._drained > _ORPHAN_LIMIT:
            self._stopTimer()
            self._stopResponse()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        # The connection is back in the pool (or closed): never touch it again.
        self._proto = None
        if self._clientGone:
            self._stopTimer()
            return
        request = self._request
        request.unregisterProducer()
        if reason.check(ResponseDone, PotentialDataLoss):
            request.finish()
            return
        # FAPI failed mid-body: a truncated body must look truncated.
        _log.warn("FAPI response broke off: {error}", error=_describe(reason))
        self._abortClient()

    # -- request body, in (IRequestBodyReceiver) --------------------------

    def bodyDataReceived(self, data: bytes) -> None:
        if self._failure is not None:
            return
        self._received += len(data)
        if self._received > self._proxy.config.max_body_size:
            self._tooLarge()
            return
        consumer = self._consumer
        if consumer is not None:
            consumer.write(data)
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
        if self._consumer is not None and self._failure is None:
            self._endUpload(None)

    def _tooLarge(self) -> None:
        self._failure = "proxy_request_too_large"
        _log.info(
            "Request body over --max-body-size ({limit} bytes)",
            limit=self._proxy.config.max_body_size,
        )
        self._held = []
        self._endUpload(CancelledError())
        if self._responding:
            self._stopResponse()
            self._abortClient()
        elif self._pending is not None:
            self._cancelPending()
        # Otherwise the upload's failure reaches _failed through the client.

    # -- request body, out (IBodyProducer) --------------------------------

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        if self._failure is not None:
            return fail(CancelledError())
        if self._bodyComplete and not self._held and self._received == 0:
            return succeed(None)
        self._consumer = consumer
        held, self._held, self._heldSize = self._held, [], 0
        for chunk in held:
            consumer.write(chunk)
        if self._bodyComplete:
            return succeed(None)
        self._uploadDone = Deferred(lambda d: self._endUploadQuietly())
        if not self._uploadPaused:
            self._resumeSource()
        return self._uploadDone

    def pauseProducing(self) -> None:
        self._uploadPaused = True
        self._pauseSource()

    def resumeProducing(self) -> None:
        self._uploadPaused = False
        if self._consumer is not None:
            self._resumeSource()

    def stopProducing(self) -> None:
        self._consumer = None
        self._uploadDone = None

    def _endUpload(self, error: Exception | None) -> None:
        done, self._uploadDone = self._uploadDone, None
        self._consumer = None
        if done is not None and not done.called:
            if error is None:
                done.callback(None)
            else:
                done.errback(Failure(error))

    def _endUploadQuietly(self) -> None:
        self._uploadDone = None
        self._consumer = None

    def _pauseSource(self) -> None:
        if not self._sourcePaused and self._source is not None:
            self._sourcePaused = True
            self._source.pauseProducing()

    def _resumeSource(self) -> None:
        if self._sourcePaused and self._source is not None:
            self._sourcePaused = False
            self._source.resumeProducing()


def _describe(reason: Failure) -> str:
    """
    Name what went wrong without formatting any object that might hold the
    request (and so the secret key): exception class names only, nested
    ones included.
    """
    names = [reason.type.__name__ if reason.type else "Error"]
    inner = getattr(reason.value, "reasons", None)
    if inner:
        for sub in inner:
            if isinstance(sub, Failure):
                text = sub.getErrorMessage()[:120] if sub.type else ""
                names.append(f"{sub.type.__name__ if sub.type else '?'}({text})")
    return ": ".join(names)


from twisted.web.http_headers import Headers  # noqa: E402

_EMPTY = Headers()
