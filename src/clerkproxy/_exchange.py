"""
One request's round trip to FAPI.

A single L{Exchange} object per request plays every role the trip needs,
so the hot path allocates one object rather than a chain of helpers:

 - C{IRequestBodyReceiver}: takes the client's body as it arrives;
 - C{IPushProducer}, in two directions, one at a time: while the body is
   sent it is registered on FAPI's socket and pauses the client's socket
   when FAPI's is full; once FAPI's answer is being relayed it is
   registered on the client's request and pauses FAPI's socket when the
   client's is full (and starts the send deadline);
 - L{IExchange}: told by the upstream connection about FAPI's answer,
   which it writes to the client.

What it needs from the resource that routed it comes in one frozen
L{Route}, built once per resource.
"""

from __future__ import annotations

import enum
import re
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from OpenSSL import SSL
from service_identity.exceptions import CertificateError, VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionAborted,
    ConnectionDone,
    ConnectionLost,
    DNSLookupError,
)
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from ._client import UpstreamProtocolError
from ._deadlines import Deadlines
from ._errors import respond_error
from ._headers import downstream_headers, upstream_head
from ._interfaces import IStreamingRequest
from ._twisted_compat import header_values, write_blocked, write_buffered
from .interfaces import IRequestBodyReceiver

if TYPE_CHECKING:
    from ._client import UpstreamConnection
    from ._config import Timeouts
    from ._forwarded import ClientAddress
    from ._metrics import Metrics
    from ._upstream import UpstreamPool

__all__ = ["Exchange", "FileSource", "Phase", "Route"]

#: Request body bytes held before an upstream connection is taken: a body
#: this small goes to FAPI in one write once it is complete; a larger one
#: streams from here on.
_HOLD_LIMIT = 64 * 1024
_READ_SIZE = 64 * 1024
#: How long, and how much, an answer nobody waits for may take to drain.
_ORPHAN_GRACE = 2.0
_ORPHAN_LIMIT = 256 * 1024
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_EMPTY_BODY_LENGTH = {b"POST", b"PUT", b"PATCH"}
_NO_BODY = (204, 304)
# Twisted's request-line parser already allows only these; checked again
# because the bytes go onto another connection verbatim.
_METHOD_OK = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z").match
_TARGET_OK = re.compile(rb"/[!-~]*\Z").match

_log = Logger(namespace="clerkproxy.exchange")


class Phase(enum.Enum):
    """Where an L{Exchange} is; see its docstring for the transitions."""

    RECEIVING = "receiving"
    CONNECTING = "connecting"
    SENDING = "sending"
    AWAITING = "awaiting"
    RELAYING = "relaying"
    ORPHANED = "orphaned"
    DONE = "done"


RECEIVING = Phase.RECEIVING
CONNECTING = Phase.CONNECTING
SENDING = Phase.SENDING
AWAITING = Phase.AWAITING
RELAYING = Phase.RELAYING
ORPHANED = Phase.ORPHANED
DONE = Phase.DONE

#: Every transition an exchange may make; anything else is a bug.
_NEXT: dict[Phase, frozenset[Phase]] = {
    RECEIVING: frozenset({CONNECTING, DONE}),
    CONNECTING: frozenset({SENDING, AWAITING, DONE}),
    SENDING: frozenset({AWAITING, RELAYING, DONE}),
    AWAITING: frozenset({CONNECTING, RELAYING, ORPHANED, DONE}),
    RELAYING: frozenset({DONE}),
    ORPHANED: frozenset({DONE}),
    DONE: frozenset(),
}


@attrs.frozen(eq=False)
class Route:
    """
    What every exchange of one proxying resource needs, built once.

    @ivar name: The upstream's name in log messages (C{FAPI}, C{app}).
    @ivar inject: The header lines the proxy adds, given the request and
        the resolved client address.
    @ivar location: Rewrites FAPI's C{Location} values, if anything should.
    """

    name: str
    pool: UpstreamPool
    clock: IReactorTime
    metrics: Metrics
    clientAddress: ClientAddress
    hostHeader: bytes
    dropHeaders: frozenset[bytes]
    inject: Callable[[Request, bytes], bytes]
    maxBodySize: int
    timeouts: Timeouts
    location: Callable[[bytes], bytes] | None = None
    # One timer per timeout (see Deadlines); shared by the route's exchanges.
    upstreamDeadlines: Deadlines[Exchange] = attrs.field(init=False)
    bodyDeadlines: Deadlines[Exchange] = attrs.field(init=False)
    readDeadlines: Deadlines[Exchange] = attrs.field(init=False)
    sendDeadlines: Deadlines[Exchange] = attrs.field(init=False)
    orphanDeadlines: Deadlines[Exchange] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        clock, t = self.clock, self.timeouts
        setattr_ = object.__setattr__
        for name, seconds, fire in (
            ("upstreamDeadlines", t.upstream, Exchange._upstreamExpired),
            ("bodyDeadlines", t.body, Exchange._bodyExpired),
            ("readDeadlines", t.upstreamRead, Exchange._readExpired),
            ("sendDeadlines", t.send, Exchange._sendExpired),
            ("orphanDeadlines", _ORPHAN_GRACE, Exchange._orphanExpired),
        ):
            setattr_(self, name, Deadlines(clock, seconds, fire))


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

    Phases (L{Phase}) and what moves an exchange between them::

      RECEIVING   a request body is arriving and is held here; no upstream
                  connection is taken yet, so a slow client holds none.
          -> CONNECTING  the body is complete, or the hold is full (64
                       KiB: the client is paused, the rest will stream)
          -> DONE      a deadline passed (408), body over --max-body-size
                       (413), or the client left
      CONNECTING  waiting for a pooled or new connection.  A request
                  without a body starts here.
          -> SENDING   got a connection and part of the body is still due
          -> AWAITING  got a connection; the whole request is written
          -> DONE      connect failed (502), a deadline passed (504),
                       or the client left
      SENDING     the head and the hold are written, the rest of the body
                  streams from the client to FAPI.  The client paces it,
                  so the connection leaves its pool's cap.
          -> AWAITING  the body ended
          -> RELAYING  FAPI answered early: the rest of the body is dropped
                       and the connection is not reused
          -> DONE      FAPI failed (502), a deadline passed (504/408),
                       body over --max-body-size (413), or the client left
      AWAITING    the whole request is at FAPI; waiting for its head.
          -> RELAYING  FAPI's head came
          -> CONNECTING  a reused connection was dead before answering; a
                       bodiless idempotent request is tried once more
          -> ORPHANED  the client left: FAPI gets a moment to answer, so
                       that a small answer keeps its connection pooled
          -> DONE      FAPI failed (502) or a deadline passed (504)
      RELAYING    the head went to the client; the body follows.
          -> DONE      the body ended; or FAPI broke off, a deadline passed
                       or the client left (the client connection is aborted
                       so that the truncation shows)
      ORPHANED    draining an answer nobody waits for.
          -> DONE      it ended, broke off, passed 256 KiB or 2 seconds
      DONE        nothing more happens; FAPI's connection is back in the
                  pool (a clean end) or closed.

    Deadlines, each one timer for all the route's exchanges (L{Deadlines}).
    Whoever the exchange waits for has one running: the client (body) or
    FAPI and the pool (upstream), never both::

      phase       deadline (option)                             on expiry
      RECEIVING   body (--body-timeout), no byte from the client  408
      CONNECTING  upstream (--upstream-timeout), from entering    504
                  CONNECTING (not from the request's start)
      SENDING     body, while FAPI takes what the client sends;   408
                  upstream, restarted whenever FAPI's socket is   504
                  full and holds the client back
      AWAITING    upstream, running on from CONNECTING, or        504
                  restarted when a streamed body ended
      RELAYING    upstream_read (--upstream-read-timeout), no     abort
                  byte from FAPI while not paused for the client;
                  send (--send-timeout), the client took nothing  abort
                  while it held the relay back
      ORPHANED    the 2-second grace                              abort FAPI

    "abort" closes both connections: FAPI's cannot be reused half-read,
    and the client's must show the truncation.

    @param length: The request body's length, L{None} if chunked, 0 if none.
    @param source: What to pause when FAPI cannot take more body: the
        client's transport, or a L{FileSource}.
    @param sourceRunning: Whether C{source} is producing already (a socket)
        or waits to be resumed (a file).
    """

    def __init__(
        self,
        route: Route,
        request: Request,
        target: bytes,
        length: int | None,
        source: IPushProducer | None,
        sourceRunning: bool,
    ) -> None:
        self._route = route
        self._request = request
        self._target = target
        self._length = length
        self._hasBody = length != 0
        self._phase = RECEIVING if self._hasBody else CONNECTING
        # What still has request body to give: None once it is all in.
        self._source = source if self._hasBody else None
        self._sourcePaused = not sourceRunning
        # FAPI's socket is full (during the upload); it owes us a resume.
        self._uploadPaused = False
        # The client's socket is full (while relaying); FAPI's is paused.
        self._relayPaused = False
        self._sendMark: int | None = None
        # The body held while no connection is taken (RECEIVING) or while
        # one is awaited (CONNECTING): one buffer, so that a body trickled
        # a byte at a time costs a byte a byte.
        self._held = bytearray()
        self._received = 0
        self._drained = 0
        self._head = b""
        self._conn: UpstreamConnection | None = None
        self._pending: Deferred[Any] | None = None
        self._retried = False
        self._started = 0.0

    @property
    def phase(self) -> Phase:
        return self._phase

    def _enter(self, phase: Phase) -> None:
        assert phase in _NEXT[self._phase], f"{self._phase} -> {phase}"
        self._phase = phase

    def readBuffered(self, content: Any) -> None:
        """Take the body from Twisted's buffer (a plain C{Site}'s request)."""
        self._source = FileSource(content, self)

    # -- starting ---------------------------------------------------------

    def start(self) -> None:
        route = self._route
        request = self._request
        method = request.method
        target = self._target
        if not _METHOD_OK(method) or not _TARGET_OK(target):
            self._enter(DONE)
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
        client = route.clientAddress.resolve(
            getattr(peer, "host", None), header_values(headers, b"X-Forwarded-For")
        )
        request.clientAddressText = client  # type: ignore[attr-defined]
        self._head = upstream_head(
            method,
            target,
            headers,
            route.hostHeader,
            route.inject(request, client),
            client,
            framing,
            route.dropHeaders,
        )
        if IStreamingRequest.providedBy(request):
            request.watchConnection(self.clientLost)
        else:
            request.notifyFinish().addErrback(self.clientLost)
        if self._phase is CONNECTING:
            self._startUpstream()
        elif self._sourcePaused:
            self._resumeSource()  # a buffered body: read it into the hold
        else:
            route.bodyDeadlines.add(self)

    def _startUpstream(self) -> None:
        """
        The request is ready to go (whole, or its hold is full): from here
        the exchange waits for the pool and FAPI, and the upstream deadline
        runs.
        """
        if self._phase is RECEIVING:
            self._enter(CONNECTING)
        route = self._route
        route.upstreamDeadlines.add(self)
        self._started = route.clock.seconds()
        self._connect()

    def _connect(self) -> None:
        pool = self._route.pool
        conn = pool.take()
        if conn is not None:
            self._send(conn)
            return
        d = pool.acquire()
        self._pending = d
        d.addCallbacks(self._send, self._connectFailed)

    def _send(self, conn: UpstreamConnection) -> None:
        self._pending = None
        if self._phase is not CONNECTING:  # pragma: no cover - defensive
            conn.abort()
            return
        self._conn = conn
        isHead = self._request.method == b"HEAD"
        if not self._hasBody:
            conn.send(self, self._head, isHead, None)
            self._enter(AWAITING)
            return
        held, self._held = self._held, bytearray()
        if self._source is None:
            # The whole body is here: the request goes in one write, and
            # the connection has nothing to stream.
            if self._length is None:
                if held:
                    request = b"".join(
                        (self._head, b"%x\r\n" % len(held), held, b"\r\n0\r\n\r\n")
                    )
                else:
                    request = self._head + b"0\r\n\r\n"
            else:
                request = self._head + held
            conn.send(self, request, isHead, None)
            self._enter(AWAITING)
            return
        # The hold filled up: the rest streams, paced by the client.
        length = self._length
        conn.send(self, self._head, isHead, -1 if length is None else length, self)
        self._enter(SENDING)
        if held:
            conn.writeBody(bytes(held))
        conn.pacedByClient()
        if not self._uploadPaused:
            # Waiting for the client now, not for FAPI.
            self._route.upstreamDeadlines.remove(self)
            self._resumeSource()

    # -- endings ----------------------------------------------------------

    def _done(self) -> None:
        """Enter DONE: no deadline of this exchange runs any more."""
        self._enter(DONE)
        route = self._route
        route.upstreamDeadlines.remove(self)
        route.bodyDeadlines.remove(self)
        route.readDeadlines.remove(self)
        route.sendDeadlines.remove(self)
        self._held = bytearray()

    def _stopUpstream(self) -> None:
        """Close FAPI's connection, or give up waiting for one."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def _refuse(self, status: int, code: str) -> None:
        """End an exchange whose answer has not started with an error."""
        self._done()
        self._stopUpstream()
        respond_error(self._request, status, code)

    def _cut(self) -> None:
        """End a relay midway: both connections go, the truncation shows."""
        self._done()
        self._stopUpstream()
        request = self._request
        channel = getattr(request, "channel", None)
        if channel is None:  # pragma: no cover - clientLost comes first
            request.producer = None
            return
        request.unregisterProducer()
        if channel.transport is not None:
            channel.transport.abortConnection()

    def _connectFailed(self, reason: Failure) -> None:
        self._pending = None
        if self._phase is CONNECTING:
            self._failed(reason)
        # else: we cancelled the wait ourselves; the failure is ours.

    def _failed(self, reason: Failure) -> None:
        """FAPI could not be reached or failed before answering: a 502."""
        route = self._route
        route.metrics.upstreamError(_kind(reason))
        _log.warn(
            "{upstream} request failed: {error}",
            upstream=route.name,
            error=_describe(reason),
        )
        self._refuse(502, "proxy_request_failed")

    def clientLost(self, reason: object = None) -> None:
        """
        The client went away: stop everything upstream, quietly.  One
        exception: a request FAPI already has in full gets a moment to be
        answered (ORPHANED), so that a prompt small answer leaves its
        connection in the pool rather than costing a new TLS handshake.
        """
        phase = self._phase
        if phase is DONE or phase is ORPHANED:
            return
        if phase is AWAITING:
            self._enter(ORPHANED)
            route = self._route
            route.upstreamDeadlines.remove(self)
            route.orphanDeadlines.add(self)
            return
        if phase is RELAYING:
            request = self._request
            if request.channel is not None:
                request.unregisterProducer()
            else:
                # The channel is gone, so unregisterProducer cannot run;
                # drop the request's reference to us: no cycle is left.
                request.producer = None
        self._done()
        self._stopUpstream()

    # -- deadlines (called by the route's Deadlines) -----------------------

    def _upstreamExpired(self) -> None:
        route = self._route
        route.metrics.timedOut("upstream")
        route.metrics.upstreamError("timeout")
        _log.warn(
            "{upstream} did not answer within {timeout}s",
            upstream=route.name,
            timeout=route.timeouts.upstream,
        )
        self._refuse(504, "proxy_upstream_timeout")

    def _bodyExpired(self) -> None:
        # Armed only while a body is due and no answer has started.
        self._route.metrics.timedOut("body")
        self._refuse(408, "proxy_body_timeout")

    def _readExpired(self) -> None:
        route = self._route
        route.metrics.timedOut("upstream_read")
        route.metrics.upstreamError("timeout")
        _log.warn(
            "{upstream} sent no response body for {timeout}s",
            upstream=route.name,
            timeout=route.timeouts.upstreamRead,
        )
        self._cut()

    def _sendExpired(self) -> None:
        buffered = _clientBuffered(self._request)
        mark = self._sendMark
        if buffered is not None and mark is not None and buffered < mark:
            # The client took something since: it gets another period.
            self._sendMark = buffered
            self._route.sendDeadlines.add(self)
            return
        self._route.metrics.timedOut("send")
        self._cut()

    def _orphanExpired(self) -> None:
        self._done()
        self._stopUpstream()

    # -- response (IExchange) ---------------------------------------------

    def responseStarted(
        self,
        code: int,
        phrase: bytes,
        headers: dict[bytes, list[bytes]],
        length: int | None,
        connection: dict[bytes, list[bytes]],
    ) -> None:
        route = self._route
        phase = self._phase
        if phase is ORPHANED:
            return
        if phase is SENDING:
            # FAPI answered before the body ended: it has decided, so the
            # rest of the body is dropped (and the connection not reused).
            self._source = None
            route.bodyDeadlines.remove(self)
        route.upstreamDeadlines.remove(self)
        self._enter(RELAYING)
        request: Any = self._request
        seconds = route.clock.seconds() - self._started
        route.metrics.upstream.observe(seconds)
        request.upstreamSeconds = seconds
        conn = self._conn
        request.upstreamReused = conn is not None and conn.reused
        request.setResponseCode(code, phrase or None)
        if length is not None and code not in _NO_BODY and request.method != b"HEAD":
            headers[b"Content-Length"] = [b"%d" % length]
        location = route.location
        if location is not None:
            values = headers.get(b"Location")
            if values:
                headers[b"Location"] = [location(v) for v in values]
        request.responseHeaders = downstream_headers(headers, connection)
        request.registerProducer(self, True)
        route.readDeadlines.add(self)
        if write_blocked(request.channel):
            # The client's socket is still full from an earlier answer.
            self.pauseProducing()

    def responseData(self, data: bytes) -> None:
        phase = self._phase
        if phase is RELAYING:
            self._request.write(data)
            if self._relayPaused:
                # Bytes written after the client's socket filled: progress
                # is measured from here.
                self._sendMark = _clientBuffered(self._request)
            else:
                self._route.readDeadlines.add(self)
            return
        if phase is ORPHANED:
            self._drained += len(data)
            if self._drained > _ORPHAN_LIMIT:
                self._route.orphanDeadlines.remove(self)
                self._done()
                self._stopUpstream()

    def responseDone(self) -> None:
        self._conn = None  # back in the pool: never touch it again
        phase = self._phase
        if phase is ORPHANED:
            self._route.orphanDeadlines.remove(self)
            self._done()
            return
        if phase is not RELAYING:  # pragma: no cover - defensive
            return
        self._done()
        request = self._request
        request.unregisterProducer()
        request.finish()

    def upstreamFailed(self, reason: Failure, nothingReceived: bool) -> None:
        conn, self._conn = self._conn, None
        phase = self._phase
        if phase is ORPHANED:
            self._route.orphanDeadlines.remove(self)
            self._done()
            return
        if phase is DONE:  # pragma: no cover - defensive
            return
        if phase is RELAYING:
            # FAPI failed mid-body: a truncated body must look truncated.
            route = self._route
            route.metrics.upstreamError(_kind(reason))
            _log.warn(
                "{upstream} response broke off: {error}",
                upstream=route.name,
                error=_describe(reason),
            )
            self._cut()
            return
        if (
            phase is AWAITING
            and nothingReceived
            and not self._retried
            and conn is not None
            and conn.reused
            and not self._hasBody
            and self._request.method in _IDEMPOTENT
        ):
            # A pooled connection FAPI had closed: try once on another.
            self._retried = True
            self._enter(CONNECTING)
            self._connect()
            return
        self._failed(reason)

    # -- request body, in (IRequestBodyReceiver) --------------------------

    def bodyDataReceived(self, data: bytes) -> None:
        phase = self._phase
        if phase is not RECEIVING and phase is not CONNECTING and phase is not SENDING:
            return  # answered, refused or abandoned: the rest is dropped
        self._received += len(data)
        route = self._route
        if self._received > route.maxBodySize:
            _log.info(
                "Request body over --max-body-size ({limit} bytes)",
                limit=route.maxBodySize,
            )
            self._refuse(413, "proxy_request_too_large")
            return
        if self._sourcePaused:
            # Twisted's channel may have resumed the socket behind our back.
            source = self._source
            if source is not None:
                source.pauseProducing()
        else:
            route.bodyDeadlines.add(self)  # progress: the deadline restarts
        conn = self._conn
        if conn is not None:
            conn.writeBody(data)
            return
        held = self._held
        held += data
        if len(held) >= _HOLD_LIMIT and self._received != self._length:
            # Enough held: the client waits, and the body will stream.
            self._pauseSource()
            if phase is RECEIVING:
                self._startUpstream()

    def bodyDone(self) -> None:
        self._source = None
        route = self._route
        route.bodyDeadlines.remove(self)
        phase = self._phase
        if phase is RECEIVING:
            self._startUpstream()
        elif phase is SENDING:
            conn = self._conn
            assert conn is not None
            conn.endBody()  # and FAPI's socket has no producer any more
            self._uploadPaused = False
            self._enter(AWAITING)
            route.upstreamDeadlines.add(self)  # FAPI's turn

    # -- IPushProducer: FAPI's socket during the upload, the client's ------
    # -- while relaying ----------------------------------------------------

    def pauseProducing(self) -> None:
        phase = self._phase
        if phase is not RELAYING:
            if (phase is SENDING or phase is CONNECTING) and not self._uploadPaused:
                # FAPI's socket is full: FAPI holds the client back now.
                self._uploadPaused = True
                self._pauseSource()
                if phase is SENDING:
                    self._route.upstreamDeadlines.add(self)
            return
        if self._relayPaused:
            return
        self._relayPaused = True
        conn = self._conn
        if conn is not None:
            conn.pauseProducing()
        route = self._route
        route.readDeadlines.remove(self)
        self._sendMark = _clientBuffered(self._request)
        route.sendDeadlines.add(self)

    def resumeProducing(self) -> None:
        phase = self._phase
        if phase is not RELAYING:
            if (phase is SENDING or phase is CONNECTING) and self._uploadPaused:
                self._uploadPaused = False
                if phase is SENDING and self._source is not None:
                    # The client's turn again.
                    self._route.upstreamDeadlines.remove(self)
                    self._resumeSource()
            return
        if self._uploadPaused:
            # FAPI answered while its socket was full of our upload: this
            # resume is FAPI's socket draining, not the client's.  (Were it
            # the client's, the relay stays paused until FAPI's comes, and
            # the send deadline bounds that.)
            self._uploadPaused = False
            return
        if not self._relayPaused:
            return
        self._relayPaused = False
        route = self._route
        route.sendDeadlines.remove(self)
        route.readDeadlines.add(self)
        conn = self._conn
        if conn is not None:
            conn.resumeProducing()

    def stopProducing(self) -> None:
        """
        Nothing to do: a lost client reaches us through L{clientLost}, a
        lost FAPI connection through L{upstreamFailed}.
        """

    def _pauseSource(self) -> None:
        source = self._source
        if not self._sourcePaused and source is not None:
            self._sourcePaused = True
            self._route.bodyDeadlines.remove(self)
            source.pauseProducing()

    def _resumeSource(self) -> None:
        source = self._source
        if self._sourcePaused and source is not None:
            self._sourcePaused = False
            self._route.bodyDeadlines.add(self)
            source.resumeProducing()


def _clientBuffered(request: Request) -> int | None:
    """
    How many bytes written to the client its socket has not taken yet, or
    L{None} where that cannot be known.
    """
    channel = getattr(request, "channel", None)
    return write_buffered(getattr(channel, "transport", None))


def _kind(reason: Failure) -> str:
    """The C{kind} label of C{clerkproxy_upstream_errors_total}."""
    if reason.check(DNSLookupError):
        return "dns"
    if reason.check(ConnectError, ConnectionRefusedError, ConnectingCancelledError):
        return "connect"
    if reason.check(ssl.SSLError, SSL.Error, VerificationError, CertificateError):
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
        ("twisted.internet", "OpenSSL", "ssl", "clerkproxy._client")
    ):
        names.append(reason.getErrorMessage()[:160])
    return ": ".join(names)
