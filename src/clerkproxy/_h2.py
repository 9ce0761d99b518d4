"""
HTTP/2 to clients: a connection protocol on the C{h2} library, and one
request object per stream that the proxy's resources serve through the same
L{Exchange} as an HTTP/1.1 request.

How a stream flows:

 1. L{ProtocolSelector} hands the connection to L{H2Connection} when TLS
    negotiated C{h2} by ALPN, or (with C{--h2c}) when a plain connection
    opens with the HTTP/2 client preface.
 2. L{H2Connection.dataReceived} walks the frame headers of what arrived
    (nine bytes each) before C{h2} parses the frames.  That is where the
    per-connection limits live: the size of a header block across
    C{HEADERS} and C{CONTINUATION}, the rate of C{SETTINGS}, C{PING},
    C{PRIORITY}, empty C{DATA} and unknown frames, and a request body
    longer or shorter than its C{content-length}.
 3. C{h2}'s C{RequestReceived} builds an L{H2Request}.  The request is
    started (its resource's C{renderStreaming} called) only once everything
    that arrived in the same read has been handled, so a C{HEADERS} frame
    followed by its C{RST_STREAM} (Rapid Reset) never reaches FAPI.
 4. Request body: C{DATA} is handed to the exchange as it arrives, and
    acknowledged with C{WINDOW_UPDATE} only then.  When FAPI's socket is
    full the exchange pauses the stream (L{H2Stream.pauseProducing}); from
    then on C{DATA} is held, unacknowledged, so the client's window closes
    and only that stream stops.
 5. Response body: the exchange writes FAPI's bytes to the request; they go
    out as far as the stream's and the connection's windows allow.  More
    than C{_STREAM_BUFFER} bytes queued on a stream pauses FAPI's socket for
    that stream only; a C{WINDOW_UPDATE} sends and resumes.  A stream that
    makes no progress for the send deadline is reset.
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes as unquote

import attrs
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    ISSLTransport,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from ._errors import respond_error
from ._interfaces import IStreamingRequest
from .interfaces import IRequestBodyReceiver, IStreamingResource

if TYPE_CHECKING:
    from ._site import StreamingSite

__all__ = ["PREFACE", "H2Connection", "H2Request", "HTTP2Settings", "ProtocolSelector"]

#: What every HTTP/2 connection opens with (RFC 9113 section 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

_log = Logger(namespace="clerkproxy.h2")

_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS = 0, 1, 2, 3, 4
_PING, _CONTINUATION = 6, 9
_END_STREAM, _ACK, _END_HEADERS, _PADDED = 0x1, 0x1, 0x4, 0x8
#: The largest frame payload we accept (the protocol's default, which we
#: never raise).
_MAX_FRAME = 16384
#: Flow-control window for the whole connection; each stream has the
#: protocol's default 65,535 bytes.  Request bytes the proxy has not yet
#: handed on count against both, so this bounds what one connection can
#: make the proxy hold.
_CONNECTION_WINDOW = 1 << 20
#: Response bytes queued on one stream before FAPI's socket is paused.
_STREAM_BUFFER = 64 * 1024
#: More CONTINUATION frames than this in one header block closes the
#: connection, whatever their size.
_MAX_CONTINUATIONS = 32
#: The most HPACK table our responses' encoder keeps, whatever a client allows.
_ENCODER_TABLE_SIZE = 4096
#: How long a connection told to go away may take to read its last bytes.
_CLOSE_GRACE = 5.0
#: Response header fields that HTTP/2 forbids (RFC 9113 section 8.2.2).
_CONNECTION_SPECIFIC = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
        b"te",
    }
)
_NAME_OK = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z").match
# What RFC 9113 section 8.2.1 makes a connection error (h2's own inbound
# checks, which we switch off and do here in one pass): a name with a
# control, space, upper-case, non-ASCII byte or a colon past the first; a
# value with NUL, CR or LF, or with whitespace at either end.
_H2_NAME_BAD = re.compile(rb"\A\Z|[\x00-\x20A-Z\x7f-\xff]|(?<=.):", re.S).search
_H2_VALUE_BAD = re.compile(rb"[\x00\n\r]|\A[ \t]|[ \t]\Z").search
#: Connection-specific request fields: a connection error (section 8.2.2).
_H2_CONNECTION_FIELDS = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"transfer-encoding",
        b"upgrade",
    }
)
_REQUEST_PSEUDO = frozenset(
    {b":method", b":scheme", b":authority", b":path", b":protocol"}
)
_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search
_NO_BODY_CODES = (204, 304)


@attrs.frozen
class HTTP2Settings:
    """
    HTTP/2 to clients: whether it is offered, and its limits per connection.

    @ivar tls: Offer C{h2} by ALPN on TLS listeners.
    @ivar h2c: Accept HTTP/2 with prior knowledge on plain listeners.
    @ivar maxConcurrentStreams: Advertised and enforced per connection.
    @ivar sendTimeout: Seconds a stream with response bytes waiting may go
        without the client accepting any (C{--send-timeout}).  The exchange
        has the same deadline while it holds FAPI back for the stream;
        this one also covers bytes queued after the exchange is done.
    @ivar resetBurst: Streams a client may reset before their response
        ended, at once, before the connection is refused.
    @ivar resetRate: ... and per second after that.
    @ivar controlBurst: C{SETTINGS}, C{PING}, C{PRIORITY}, empty C{DATA}
        and unknown frames (each kind counted apart) allowed at once...
    @ivar controlRate: ... and per second after that.
    """

    tls: bool = True
    h2c: bool = False
    maxConcurrentStreams: int = 100
    sendTimeout: float = 60.0
    resetBurst: int = 200
    resetRate: float = 20.0
    controlBurst: int = 200
    controlRate: float = 20.0


class _Bucket:
    """A token bucket: C{burst} at once, refilled at C{rate} per second."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, burst: int, rate: float, now: float) -> None:
        self.burst = burst
        self.rate = rate
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        elapsed = now - self.stamp
        tokens = self.tokens
        if elapsed > 0:
            tokens = min(self.burst, tokens + elapsed * self.rate)
            self.stamp = now
        if tokens < 1:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1
        return True


class ProtocolSelector(Protocol):
    """
    One client connection until its protocol is known: HTTP/2 when TLS
    negotiated C{h2}, or (with C{h2c}) when the connection opens with the
    client preface; HTTP/1.1 otherwise.

    The HTTP/1.1 channel is connected from the start, so its header deadline
    covers a client that sends nothing; it is detached if HTTP/2 wins.
    """

    def __init__(self, site: StreamingSite, channel: Any) -> None:
        self._site = site
        self._protocol: Any = channel
        self._choosing = True
        self._held = b""

    def makeConnection(self, transport: Any) -> None:
        self.connected = 1
        self.transport = transport
        self._protocol.makeConnection(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._choosing:
            settings = self._site.http2
            use = False
            if (
                settings.tls
                and getattr(self.transport, "negotiatedProtocol", None) == b"h2"
            ):
                use = True
            elif settings.h2c:
                data = self._held + data
                n = min(len(data), len(PREFACE))
                if data[:n] == PREFACE[:n]:
                    if n < len(PREFACE):
                        self._held = data
                        return
                    use = True
                self._held = b""
            self._choosing = False
            if use:
                self._protocol.detach()
                self._protocol = H2Connection(self._site, settings)
                self._protocol.makeConnection(self.transport)
        self._protocol.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._protocol.connectionLost(reason)


# Stream states.
_PENDING, _OPEN, _CLOSED = range(3)


@implementer(IPushProducer)
class H2Stream:
    """
    One stream of an L{H2Connection}: the request's C{channel} and
    C{transport}.  Pausing it withholds C{WINDOW_UPDATE} for this stream
    only; aborting it resets this stream only.
    """

    def __init__(self, connection: H2Connection, streamID: int) -> None:
        self.connection = connection
        self.streamID = streamID
        self.state = _PENDING
        self.request: H2Request | None = None
        self.receiver: IRequestBodyReceiver | None = None
        # Request body: declared length, bytes seen so far, bytes held.
        self.expected: int | None = None
        self.received = 0
        self.inQueue: deque[tuple[bytes, int]] = deque()
        self.inEnded = False
        self.paused = False
        # Response.
        self.outQueue: deque[bytes] = deque()
        self.outSize = 0
        self.outEnd = False
        self.responseEnded = False
        self.producer: IPushProducer | None = None
        self.producerPaused = False

    @property
    def transport(self) -> H2Stream:
        """What C{request.channel.transport} names: this stream."""
        return self

    # -- IPushProducer, for the request body ------------------------------

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        if self.state == _OPEN:
            self.connection._deliver(self)

    def stopProducing(self) -> None:
        self.abortConnection()

    # -- what a request's transport offers --------------------------------

    def abortConnection(self) -> None:
        """Reset this stream: whatever the client got stays visibly cut."""
        self.connection._resetStream(self, ErrorCodes.INTERNAL_ERROR)

    def loseConnection(self) -> None:
        self.abortConnection()

    def getPeer(self) -> IAddress:
        transport: Any = self.connection.transport
        peer: IAddress = transport.getPeer()
        return peer

    def getHost(self) -> IAddress:
        transport: Any = self.connection.transport
        host: IAddress = transport.getHost()
        return host

    def expired(self) -> None:
        """The send deadline: the client accepted nothing for too long."""
        connection = self.connection
        connection._site.metrics.timedOut("send")
        connection._resetStream(self, ErrorCodes.CANCEL)
        connection._flush()


@implementer(IStreamingRequest)
class H2Request:
    """
    One HTTP/2 request, offering what the proxy's resources and
    L{Exchange} use of a C{twisted.web} request, and no more: the request
    line and headers, the response's code, headers and body, producers,
    the client's address, and being told when the client goes away.

    @ivar transport: The stream, which pauses and resets only itself.
    @ivar channel: The same stream (C{request.channel.transport} is what
        an exchange aborts to cut a response short).
    """

    clientproto = b"HTTP/2"
    code = 200
    code_message = b"OK"
    sentLength = 0
    startedWriting = False
    finished = False
    content = None
    # Filled in along the way, for metrics and the access log.
    startedAt = 0.0
    inFlight = False
    clientAddressText: bytes | None = None
    upstreamSeconds: float | None = None
    upstreamReused: bool | None = None
    maxBodySize: int | None = None
    #: The response's content-length, once its headers are sent.
    _declaredLength: int | None = None

    def __init__(
        self, stream: H2Stream, method: bytes, uri: bytes, headers: Headers
    ) -> None:
        self.channel: H2Stream | None = stream
        self.transport = stream
        self.method = method
        self.uri = uri
        self.path = uri.split(b"?", 1)[0]
        self.requestHeaders = headers
        self.responseHeaders = Headers()
        self.args: dict[bytes, list[bytes]] = {}
        self.prepath: list[bytes] = []
        #: Filled in only for a resource tree to traverse (see _start).
        self.postpath: list[bytes] = []
        self._onLost: Callable[[], object] | None = None
        self._notifications: list[Deferred[None]] = []
        self._producer: IPushProducer | None = None

    # -- the request ------------------------------------------------------

    def getHeader(self, name: bytes) -> bytes | None:
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def getClientAddress(self) -> IAddress:
        return self.transport.getPeer()

    def getHost(self) -> IAddress:
        return self.transport.getHost()

    def isSecure(self) -> bool:
        return self.transport.connection.secure

    def watchConnection(self, onLost: Callable[[], object]) -> None:
        """Call C{onLost} if the stream ends before the response does."""
        self._onLost = onLost

    def refuseBody(self, status: int) -> bool:
        """
        Refuse the rest of the body: the exchange is told the client is
        gone, and the client gets the error, or a reset stream if its
        response had begun.
        """
        stream = self.channel
        if self.finished or stream is None:
            return False
        onLost, self._onLost = self._onLost, None
        stream.receiver = None
        if onLost is not None:
            onLost()
        if self.startedWriting:
            stream.abortConnection()
        else:
            respond_error(
                self,  # type: ignore[arg-type]
                status,
                "proxy_request_too_large" if status == 413 else "proxy_bad_request",
            )
        return True

    def notifyFinish(self) -> Deferred[None]:
        """Fires when the response is finished, fails if the stream is lost."""
        d: Deferred[None] = Deferred()
        self._notifications.append(d)
        return d

    # -- the response -----------------------------------------------------

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        if message is not None:
            self.code_message = message

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def write(self, data: bytes) -> None:
        stream = self.channel
        if self.finished or stream is None:
            return
        if not self.startedWriting:
            self.startedWriting = True
            # The body's first bytes follow in the same write.
            stream.connection._sendHeaders(
                stream, self._headerList(), False, flush=not data
            )
        if data and self._bodyAllowed():
            self.sentLength += len(data)
            # The body's last byte by its content-length: END_STREAM goes on
            # this DATA frame, not on an empty one when finish() follows.
            stream.connection._sendData(
                stream, data, end=self.sentLength == self._declaredLength
            )

    def finish(self) -> None:
        stream = self.channel
        if self.finished or stream is None:
            return
        self.finished = True
        connection = stream.connection
        if not self.startedWriting:
            self.startedWriting = True
            connection._sendHeaders(stream, self._headerList(), True)
        else:
            connection._endStream(stream)
        self._onLost = None
        connection._site.log(self)  # type: ignore[arg-type]
        notifications, self._notifications = self._notifications, []
        for d in notifications:
            d.callback(None)

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        stream = self.channel
        if stream is None:
            return
        stream.producer = producer
        stream.producerPaused = False
        if stream.outSize > _STREAM_BUFFER:
            stream.producerPaused = True
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        stream = self.channel
        if stream is not None:
            stream.producer = None
            stream.producerPaused = False

    def _bodyAllowed(self) -> bool:
        return self.method != b"HEAD" and self.code not in _NO_BODY_CODES

    def _headerList(self) -> list[tuple[bytes, bytes]]:
        out = [(b":status", b"%d" % self.code)]
        append = out.append
        for name, values in self.responseHeaders.getAllRawHeaders():
            lower = name.lower()
            if lower in _CONNECTION_SPECIFIC:
                continue
            if lower == b"content-length" and len(values) == 1:
                if values[0].isdigit():
                    self._declaredLength = int(values[0])
            for value in values:
                append((lower, value))
        return out

    def _lost(self, reason: Failure) -> None:
        """The stream ended before the response did."""
        self.channel = None
        if self.finished:
            return
        stream = self.transport
        if self.inFlight:
            stream.connection._site.requestAborted(self)  # type: ignore[arg-type]
        onLost, self._onLost = self._onLost, None
        if onLost is not None:
            onLost()
        notifications, self._notifications = self._notifications, []
        for d in notifications:
            d.errback(reason)


class H2Connection(Protocol):
    """
    One client's HTTP/2 connection.  See the module's docstring for how a
    stream flows; L{HTTP2Settings} holds the limits.
    """

    secure = False
    _client: bytes | None = None
    _inRead = False

    def __init__(self, site: StreamingSite, settings: HTTP2Settings) -> None:
        self._site = site
        self._settings = settings
        # The site's --max-header-size bounds one header block twice: as
        # sent (HEADERS and CONTINUATION frames) and decoded
        # (SETTINGS_MAX_HEADER_LIST_SIZE, enforced by hpack as it decodes).
        self._maxHeaderSize = maxHeaderSize = site.maxHeaderSize
        self._clock: IReactorTime = site.clock
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            # _requestReceived and _trailersReceived check what h2 would,
            # in one pass, and refuse the same way.
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        conn = h2.connection.H2Connection(config=config)
        conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: (
                    settings.maxConcurrentStreams
                ),
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: maxHeaderSize,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        conn.decoder.max_header_list_size = maxHeaderSize
        self._conn = conn
        self._streams: dict[int, H2Stream] = {}
        self._pending: list[H2Stream] = []
        self._blocked: dict[H2Stream, None] = {}
        self._inbuf = b""
        self._prefaced = False
        self._blockSize = -1  # bytes of the header block being read, or -1
        self._blockFrames = 0
        self._closed = False
        self._goingAway = False
        self._transportPaused = False
        self._closeCall: IDelayedCall | None = None
        now = self._clock.seconds()
        self._resets = _Bucket(settings.resetBurst, settings.resetRate, now)
        self._control: dict[int, _Bucket] = {}

    # -- lifecycle ----------------------------------------------------------

    def connectionMade(self) -> None:
        transport: Any = self.transport
        self.secure = ISSLTransport.providedBy(transport)
        site = self._site
        connections = site.clientConnections
        if connections is not None:
            # --max-connections-per-client, counted under the peer (the PROXY
            # header, if any, has been read).  A peer whose X-Forwarded-For
            # is believed is a load balancer: each stream may be another
            # client, so the connection is not counted.
            host = getattr(transport.getPeer(), "host", None)
            if host and not site.clientAddress.believes(host):
                client = host.encode("ascii")
                if not connections.admit(client):
                    self._closed = True
                    transport.abortConnection()
                    return
                self._client = client
        site.channels.add(self)  # type: ignore[arg-type]
        site.headerDeadlines.add(self)  # type: ignore[arg-type]
        conn = self._conn
        conn.initiate_connection()
        conn.increment_flow_control_window(_CONNECTION_WINDOW - 65535)
        transport.registerProducer(self, True)
        self._flush()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        site = self._site
        client, self._client = self._client, None
        if client is not None and site.clientConnections is not None:
            site.clientConnections.release(client)
        site.channels.discard(self)
        site.headerDeadlines.remove(self)  # type: ignore[arg-type]
        site.idleDeadlines.remove(self)  # type: ignore[arg-type]
        if self._closeCall is not None and self._closeCall.active():
            self._closeCall.cancel()
        self._closeCall = None
        if reason.check(ConnectionDone):
            reason = Failure(ConnectionLost("the HTTP/2 connection closed"))
        for stream in list(self._streams.values()):
            self._forget(stream, reason)

    @property
    def idle(self) -> bool:
        """Whether no stream is under way on this connection."""
        return not self._streams

    def drain(self) -> None:
        """Go away politely: streams under way finish, no new ones start."""
        if self._closed or self._goingAway:
            return
        self._goingAway = True
        # h2's own close_connection would refuse to send anything more, on
        # the streams already open too: write the GOAWAY frame ourselves.
        self._flush(now=True)
        frame = GoAwayFrame(
            0, last_stream_id=self._conn.highest_inbound_stream_id, error_code=0
        )
        transport: Any = self.transport
        transport.write(frame.serialize())
        if not self._streams:
            self._close()

    def expired(self) -> None:
        """No preface in time, or idle for too long: close."""
        if self._closed:
            return
        if self._prefaced:
            self._site.metrics.timedOut("idle")
            self._conn.close_connection(ErrorCodes.NO_ERROR)
            self._flush(now=True)
        else:
            self._site.metrics.timedOut("header")
        self._close()

    def _close(self) -> None:
        self._flush(now=True)
        self._closed = True
        transport: Any = self.transport
        # A transport with a producer registered waits for it to go away
        # before it closes.
        transport.unregisterProducer()
        transport.loseConnection()
        self._closeCall = self._clock.callLater(_CLOSE_GRACE, self._forceClose)

    def _forceClose(self) -> None:
        self._closeCall = None
        transport: Any = self.transport
        transport.abortConnection()

    def _refuse(self, kind: str, goAway: bool = True) -> None:
        """
        Abuse or a protocol error: count it, send GOAWAY (with
        C{ENHANCE_YOUR_CALM} unless h2 already sent its own), close, and
        drop every stream.
        """
        if self._closed:
            return
        self._site.metrics.http2Event(kind)
        _log.info("HTTP/2 connection refused: {kind}", kind=kind)
        if goAway:
            self._conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self._flush(now=True)
        self._close()
        reason = Failure(ConnectionLost(f"HTTP/2 connection refused: {kind}"))
        for stream in list(self._streams.values()):
            self._forget(stream, reason)

    # -- IPushProducer, for the client's socket ------------------------------

    def pauseProducing(self) -> None:
        self._transportPaused = True

    def resumeProducing(self) -> None:
        self._transportPaused = False
        self._sendBlocked()

    def stopProducing(self) -> None:
        self._transportPaused = True

    # -- input ------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        # Whatever the frames of one read make us send goes out in one write
        # (one TLS record), not one per frame.
        self._inRead = True
        try:
            self._read(data)
        finally:
            self._inRead = False
            self._flush()

    def _read(self, data: bytes) -> None:
        if self._closed:
            return
        buf = self._inbuf + data if self._inbuf else data
        pos = 0
        if not self._prefaced:
            n = min(len(buf), len(PREFACE))
            if buf[:n] != PREFACE[:n]:
                self._closed = True
                transport: Any = self.transport
                transport.abortConnection()
                return
            if n < len(PREFACE):
                self._inbuf = buf
                return
            self._prefaced = True
            site = self._site
            site.headerDeadlines.remove(self)  # type: ignore[arg-type]
            if not self._streams:
                site.idleDeadlines.add(self)  # type: ignore[arg-type]
            pos = len(PREFACE)
        fed = 0
        end = len(buf)
        while end - pos >= 9:
            length = (buf[pos] << 16) | (buf[pos + 1] << 8) | buf[pos + 2]
            if length > _MAX_FRAME:
                # h2 answers with FRAME_SIZE_ERROR.
                self._feed(buf[fed:])
                return
            if end - pos - 9 < length:
                break
            kind = buf[pos + 3]
            flags = buf[pos + 4]
            if kind == _DATA:
                if not self._feed(buf[fed:pos]):
                    return
                fed = pos
                if not self._checkData(buf, pos, length, flags):
                    return
            elif kind == _HEADERS or kind == _CONTINUATION:
                if not self._checkHeaderBlock(kind, length, flags):
                    return
            elif (
                ((kind == _SETTINGS or kind == _PING) and not flags & _ACK)
                or kind == _PRIORITY
                or kind > _CONTINUATION
            ):
                if not self._checkControl(kind):
                    return
            pos += 9 + length
        self._inbuf = buf[pos:]
        if self._feed(buf[fed:pos]):
            self._startPending()

    def _checkHeaderBlock(self, kind: int, length: int, flags: int) -> bool:
        if kind == _HEADERS:
            self._blockSize = 0
            self._blockFrames = 0
        elif self._blockSize < 0:
            return True  # h2 refuses a CONTINUATION out of place
        else:
            self._blockFrames += 1
        self._blockSize += length
        if (
            self._blockSize > self._maxHeaderSize
            or self._blockFrames > _MAX_CONTINUATIONS
        ):
            self._refuse("continuation_flood")
            return False
        if flags & _END_HEADERS:
            self._blockSize = -1
        return True

    def _checkControl(self, kind: int) -> bool:
        bucket = self._control.get(kind)
        now = self._clock.seconds()
        if bucket is None:
            settings = self._settings
            bucket = self._control[kind] = _Bucket(
                settings.controlBurst, settings.controlRate, now
            )
        if bucket.take(now):
            return True
        self._refuse(_CONTROL_KINDS.get(kind, "unknown_frame_flood"))
        return False

    def _checkData(self, buf: bytes, pos: int, length: int, flags: int) -> bool:
        """Empty-DATA floods, and bodies that disagree with content-length."""
        payload = length
        if flags & _PADDED and length:
            payload = length - 1 - buf[pos + 9]
        if payload <= 0 and not flags & _END_STREAM:
            if not self._checkControl(_DATA):
                return False
        stream = self._streams.get(int.from_bytes(buf[pos + 5 : pos + 9]) & 0x7FFFFFFF)
        if stream is None or stream.expected is None or payload < 0:
            return True
        total = stream.received + payload
        if total > stream.expected or (
            flags & _END_STREAM and total != stream.expected
        ):
            # Malformed (RFC 9113 section 8.1.1): a stream error.  The frame
            # still goes to h2, which then counts it against the
            # connection's window and discards it.
            self._site.metrics.http2Event("content_length_mismatch")
            self._resetStream(stream, ErrorCodes.PROTOCOL_ERROR)
        else:
            stream.received = total
        return True

    def _feed(self, chunk: bytes) -> bool:
        if not chunk:
            return not self._closed
        try:
            events = self._conn.receive_data(chunk)
        except h2.exceptions.DenialOfServiceError:
            self._refuse("header_list_too_large", goAway=False)
            return False
        except h2.exceptions.TooManyStreamsError:
            self._refuse("stream_limit", goAway=False)
            return False
        except h2.exceptions.ProtocolError:
            self._refuse("protocol_error", goAway=False)
            return False
        for event in events:
            handler = _HANDLERS.get(type(event))
            if handler is not None:
                handler(self, event)
            if self._closed:
                return False
        return True

    def _requestReceived(self, event: h2.events.RequestReceived) -> None:
        streamID = event.stream_id
        if self._goingAway:
            self._conn.reset_stream(streamID, ErrorCodes.REFUSED_STREAM)
            return
        stream = H2Stream(self, streamID)
        method = uri = authority = host = scheme = None
        headers = Headers()
        cookies = []
        lengths = []
        malformed = False
        pseudo: set[bytes] = set()
        regular = False
        for name, value in event.headers:
            if value and _H2_VALUE_BAD(value):
                self._malformedBlock()
                return
            if name[:1] == b":":
                if regular or name in pseudo or name not in _REQUEST_PSEUDO:
                    self._malformedBlock()
                    return
                pseudo.add(name)
                if name == b":method":
                    method = value
                elif name == b":path":
                    if not value:
                        self._malformedBlock()
                        return
                    uri = value
                elif name == b":authority":
                    authority = value
                    headers.setRawHeaders(b"Host", [value])
                elif name == b":scheme":
                    scheme = value
                continue
            regular = True
            if not _NAME_OK(name):
                if _H2_NAME_BAD(name):
                    self._malformedBlock()
                    return
                malformed = True
                continue
            if name in _H2_CONNECTION_FIELDS or (
                name == b"te" and value.lower() != b"trailers"
            ):
                self._malformedBlock()
                return
            if name == b"host":
                if host is not None:
                    self._malformedBlock()
                    return
                host = value
            if malformed:
                continue
            if _VALUE_BAD(value):
                malformed = True
                continue
            if name == b"cookie":
                cookies.append(value)
            elif name == b"host":
                if authority is None:
                    headers.addRawHeader(name, value)
            elif b"_" not in name:
                if name == b"content-length":
                    lengths.append(value)
                headers.addRawHeader(name, value)
        if (
            method is None
            or (authority is None and host is None)
            or (authority is not None and host is not None and authority != host)
        ):
            self._malformedBlock()
            return
        if method == b"CONNECT":
            if b":protocol" in pseudo:
                bad = scheme is None or uri is None
            else:
                bad = scheme is not None or uri is not None
            if bad:
                self._malformedBlock()
                return
        elif scheme is None or uri is None or b":protocol" in pseudo:
            self._malformedBlock()
            return
        if cookies:
            # RFC 9113 section 8.2.3: one field for HTTP/1.1.
            headers.setRawHeaders(b"Cookie", [b"; ".join(cookies)])
        if lengths:
            if len(set(lengths)) > 1 or not lengths[0].isdigit():
                malformed = True
            else:
                stream.expected = int(lengths[0])
        if malformed or method is None:
            self._site.metrics.http2Event("malformed_request")
            self._conn.reset_stream(streamID, ErrorCodes.PROTOCOL_ERROR)
            return
        if event.stream_ended is not None:
            stream.inEnded = True
        stream.request = H2Request(stream, method, uri or b"", headers)
        self._streams[streamID] = stream
        self._pending.append(stream)
        self._site.idleDeadlines.remove(self)  # type: ignore[arg-type]

    def _malformedBlock(self) -> None:
        """A header block RFC 9113 makes a connection error: GOAWAY, close."""
        self._conn.close_connection(ErrorCodes.PROTOCOL_ERROR)
        self._refuse("protocol_error", goAway=False)

    def _trailersReceived(self, event: h2.events.TrailersReceived) -> None:
        # Trailers are not forwarded, but a malformed block still ends the
        # connection, as h2's own checks did.
        for name, value in event.headers:
            if (
                name[:1] == b":"
                or _H2_NAME_BAD(name)
                or (value and _H2_VALUE_BAD(value))
                or name in _H2_CONNECTION_FIELDS
                or (name == b"te" and value.lower() != b"trailers")
            ):
                self._malformedBlock()
                return

    def _startPending(self) -> None:
        pending, self._pending = self._pending, []
        for stream in pending:
            if stream.state == _PENDING:
                self._start(stream)

    def _start(self, stream: H2Stream) -> None:
        stream.state = _OPEN
        request = stream.request
        assert request is not None
        site = self._site
        site.requestStarted(request)  # type: ignore[arg-type]
        if stream.inEnded and not stream.inQueue:
            length: int | None = 0
        else:
            length = stream.expected
        try:
            resource = site.resource
            if resource.isLeaf:
                # The proxy's own roots: nothing to traverse.
                request.site = site  # type: ignore[attr-defined]
            else:
                request.postpath = list(map(unquote, request.path[1:].split(b"/")))
                resource = site.getResourceFor(request)  # type: ignore[no-untyped-call]
            if not IStreamingResource.providedBy(resource):
                # Only streaming resources are served over HTTP/2; this
                # tells the browser to ask again over HTTP/1.1.
                self._resetStream(stream, ErrorCodes.HTTP_1_1_REQUIRED)
                return
            stream.receiver = resource.renderStreaming(
                request,  # type: ignore[arg-type]
                length,
            )
        except Exception:
            _log.failure("rendering an HTTP/2 request failed")
            self._resetStream(stream, ErrorCodes.INTERNAL_ERROR)
            return
        if stream.state == _OPEN and length != 0:
            self._deliver(stream)

    def _dataReceived(self, event: h2.events.DataReceived) -> None:
        stream = self._streams.get(event.stream_id)
        size = event.flow_controlled_length or 0
        if stream is None or stream.state == _CLOSED:
            if size:
                self._conn.acknowledge_received_data(size, event.stream_id)
            return
        stream.inQueue.append((event.data or b"", size))
        if stream.state == _OPEN and not stream.paused:
            self._deliver(stream)

    def _streamEnded(self, event: h2.events.StreamEnded) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        stream.inEnded = True
        if stream.state == _OPEN and not stream.paused:
            self._deliver(stream)

    def _deliver(self, stream: H2Stream) -> None:
        """Hand held body bytes on while the stream is not paused."""
        queue = stream.inQueue
        conn = self._conn
        streamID = stream.streamID
        while queue and not stream.paused and stream.state == _OPEN:
            data, size = queue.popleft()
            receiver = stream.receiver
            if size:
                conn.acknowledge_received_data(size, streamID)
            if data and receiver is not None:
                receiver.bodyDataReceived(data)
        if (
            stream.inEnded
            and not queue
            and stream.state == _OPEN
            and stream.receiver is not None
        ):
            receiver, stream.receiver = stream.receiver, None
            receiver.bodyDone()
        self._maybeDone(stream)
        self._flush()

    def _streamReset(self, event: h2.events.StreamReset) -> None:
        stream = self._streams.get(event.stream_id)
        if stream is None:
            return
        early = not stream.responseEnded
        if stream.state == _PENDING:
            self._site.metrics.http2Event("reset_before_forwarding")
        self._forget(stream, Failure(ConnectionLost("stream reset by the client")))
        if early and not self._resets.take(self._clock.seconds()):
            self._refuse("rapid_reset")

    def _windowUpdated(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id:
            stream = self._streams.get(event.stream_id)
            if stream is not None and stream.outQueue:
                self._send(stream)
        else:
            self._sendBlocked()

    def _settingsChanged(self, event: h2.events.RemoteSettingsChanged) -> None:
        # A client may allow any HPACK table size for our responses; h2
        # adopts it, and nothing would ever be evicted from a table of 2 GiB.
        # RFC 7541 lets the encoder use less than the peer allows.
        changed = event.changed_settings.get(h2.settings.SettingCodes.HEADER_TABLE_SIZE)
        if changed is not None and changed.new_value > _ENCODER_TABLE_SIZE:
            self._conn.encoder.header_table_size = _ENCODER_TABLE_SIZE
        self._sendBlocked()

    def _goAway(self, event: h2.events.ConnectionTerminated) -> None:
        # The client is leaving; streams it already opened may finish.
        self._goingAway = True
        if not self._streams:
            self._close()

    # -- output -----------------------------------------------------------

    def _flush(self, now: bool = False) -> None:
        """Write what h2 has for the client; within a read, at its end."""
        if self._inRead and not now:
            return
        data = self._conn.data_to_send()
        if data:
            transport: Any = self.transport
            transport.write(data)

    def _sendHeaders(
        self,
        stream: H2Stream,
        headers: list[tuple[bytes, bytes]],
        end: bool,
        flush: bool = True,
    ) -> None:
        if stream.state == _CLOSED:
            return
        try:
            self._conn.send_headers(stream.streamID, headers, end_stream=end)
        except h2.exceptions.ProtocolError:
            # The stream or the connection can take no more (a GOAWAY came).
            self._forget(stream, Failure(ConnectionLost("stream closed")))
            return
        if end:
            stream.outEnd = stream.responseEnded = True
            self._maybeDone(stream)
        if flush:
            self._flush()

    def _sendData(self, stream: H2Stream, data: bytes, end: bool = False) -> None:
        if stream.state == _CLOSED:
            return
        stream.outQueue.append(data)
        stream.outSize += len(data)
        if end:
            stream.outEnd = True
        self._send(stream)
        if (
            stream.outSize > _STREAM_BUFFER
            and stream.producer is not None
            and not stream.producerPaused
        ):
            stream.producerPaused = True
            stream.producer.pauseProducing()

    def _endStream(self, stream: H2Stream) -> None:
        if stream.state == _CLOSED:
            return
        stream.outEnd = True
        self._send(stream)

    def _sendBlocked(self) -> None:
        for stream in list(self._blocked):
            if self._transportPaused:
                return
            self._send(stream)

    def _send(self, stream: H2Stream) -> None:
        """Send what the windows allow of the stream's queued response."""
        if stream.state == _CLOSED:
            return
        if self._transportPaused:
            self._block(stream, False)
            return
        conn = self._conn
        streamID = stream.streamID
        queue = stream.outQueue
        sent = 0
        try:
            while queue:
                window = conn.local_flow_control_window(streamID)
                if window <= 0:
                    break
                chunk = queue[0]
                size = min(window, conn.max_outbound_frame_size)
                if len(chunk) > size:
                    conn.send_data(streamID, chunk[:size])
                    queue[0] = chunk[size:]
                    sent += size
                else:
                    queue.popleft()
                    sent += len(chunk)
                    conn.send_data(
                        streamID, chunk, end_stream=stream.outEnd and not queue
                    )
                    if stream.outEnd and not queue:
                        stream.responseEnded = True
            if stream.outEnd and not queue and not stream.responseEnded:
                conn.end_stream(streamID)
                stream.responseEnded = True
        except h2.exceptions.ProtocolError:
            self._forget(stream, Failure(ConnectionLost("stream closed")))
            self._flush()
            return
        stream.outSize -= sent
        if queue:
            self._block(stream, sent > 0)
        else:
            self._blocked.pop(stream, None)
            self._site.h2SendDeadlines.remove(stream)
        if stream.producerPaused and stream.outSize <= _STREAM_BUFFER // 2:
            stream.producerPaused = False
            if stream.producer is not None:
                stream.producer.resumeProducing()
        self._maybeDone(stream)
        self._flush()

    def _block(self, stream: H2Stream, progressed: bool) -> None:
        """The stream has bytes the client cannot take yet."""
        blocked = self._blocked
        deadlines = self._site.h2SendDeadlines
        if progressed or stream not in blocked:
            blocked.pop(stream, None)
            blocked[stream] = None
            deadlines.remove(stream)
            deadlines.add(stream)

    # -- ending streams -----------------------------------------------------

    def _resetStream(self, stream: H2Stream, code: ErrorCodes) -> None:
        if stream.state == _CLOSED or self._closed:
            return
        try:
            self._conn.reset_stream(stream.streamID, code)
        except h2.exceptions.StreamClosedError:
            pass
        self._forget(stream, Failure(ConnectionLost(f"stream reset ({code.name})")))
        self._flush()

    def _maybeDone(self, stream: H2Stream) -> None:
        """Forget a stream whose response and request have both ended."""
        if stream.state == _CLOSED or not stream.responseEnded:
            return
        if not (stream.inEnded and not stream.inQueue):
            # Answered before the body was in (an error, an early answer):
            # stop the client sending it (RFC 9113 section 8.1).
            try:
                self._conn.reset_stream(stream.streamID, ErrorCodes.NO_ERROR)
            except h2.exceptions.StreamClosedError:
                pass
        self._forget(stream, None)

    def _forget(self, stream: H2Stream, reason: Failure | None) -> None:
        if stream.state == _CLOSED:
            return
        stream.state = _CLOSED
        streams = self._streams
        streams.pop(stream.streamID, None)
        self._blocked.pop(stream, None)
        self._site.h2SendDeadlines.remove(stream)
        held = sum(size for _, size in stream.inQueue)
        stream.inQueue.clear()
        stream.outQueue.clear()
        stream.receiver = None
        if held and not self._closed:
            self._conn.acknowledge_received_data(held, stream.streamID)
        request = stream.request
        stream.request = None
        stream.producer = None
        if request is not None and reason is not None:
            request._lost(reason)
        if not streams and not self._closed:
            if self._goingAway:
                self._flush(now=True)
                self._close()
            elif self._prefaced:
                self._site.idleDeadlines.add(self)  # type: ignore[arg-type]


_CONTROL_KINDS = {
    _DATA: "empty_data_flood",
    _PRIORITY: "priority_flood",
    _SETTINGS: "settings_flood",
    _PING: "ping_flood",
}

_HANDLERS: dict[type, Callable[[H2Connection, Any], None]] = {
    h2.events.RequestReceived: H2Connection._requestReceived,
    h2.events.DataReceived: H2Connection._dataReceived,
    h2.events.StreamEnded: H2Connection._streamEnded,
    h2.events.TrailersReceived: H2Connection._trailersReceived,
    h2.events.StreamReset: H2Connection._streamReset,
    h2.events.WindowUpdated: H2Connection._windowUpdated,
    h2.events.RemoteSettingsChanged: H2Connection._settingsChanged,
    h2.events.ConnectionTerminated: H2Connection._goAway,
}
