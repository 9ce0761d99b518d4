"""
A lean HTTP/1.1 client connection to FAPI, one exchange at a time.

Twisted's C{HTTP11ClientProtocol} is correct but costly per request: a
parser object, a response object, a transport proxy, half a dozen
L{Deferred}s, and a pause and resume of the socket around every response
head.  This protocol parses a response with a few C{bytes} operations and
tells its L{IExchange} directly, and it is the push producer the client's
request pauses when the browser reads slowly.

What it accepts from FAPI is strict, because the headers are copied into a
response to a browser without being parsed again: a status line of HTTP/1.0
or 1.1, header names that are tokens, values with no CR, LF or NUL, one
coherent framing (C{chunked} last, or matching C{Content-Length}s).
Anything else fails the exchange with L{UpstreamProtocolError}.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, ITCPTransport
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http_headers import InvalidHeaderName
from zope.interface import implementer

from ._twisted_compat import encode_header_name

if TYPE_CHECKING:
    from ._upstream import UpstreamPool

__all__ = ["IExchange", "UpstreamConnection", "UpstreamProtocolError"]

_MAX_HEAD = 64 * 1024
_MAX_CHUNK_LINE = 4096
_NO_BODY_STATUS = (204, 304)
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z").match
_BAD_VALUE = re.compile(rb"[\x00\r\n]").search
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: (.*))?\Z", re.DOTALL).match
_CONNECTION_CONTROL = frozenset(
    {
        b"Connection",
        b"Keep-Alive",
        b"Proxy-Connection",
        b"Transfer-Encoding",
        b"Content-Length",
        b"Upgrade",
        b"TE",
        b"Trailer",
    }
)

# Response body framing.
_NONE, _LENGTH, _CHUNKED, _CLOSE = range(4)
# Where the connection is.
_IDLE, _HEAD, _BODY, _DEAD = range(4)
# Chunked decoder states.
_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class UpstreamProtocolError(Exception):
    """FAPI sent something this client will not relay."""


class IExchange(Protocol):
    """What a connection tells the exchange it is serving."""

    def responseStarted(
        self,
        code: int,
        phrase: bytes,
        headers: dict[bytes, list[bytes]],
        length: int | None,
        connection: dict[bytes, list[bytes]],
    ) -> None: ...

    def responseData(self, data: bytes) -> None: ...

    def responseDone(self) -> None: ...

    def upstreamFailed(self, reason: Failure, nothingReceived: bool) -> None: ...


@implementer(IPushProducer)
class UpstreamConnection(TwistedProtocol):
    """
    One persistent connection to FAPI.

    @ivar reused: Whether this connection served an earlier request.
    @ivar idleSince: When it last went back to the pool.
    """

    reused = False
    idleSince = 0.0

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self._exchange: IExchange | None = None
        self._state = _IDLE
        self._buffer = b""
        self._requestDone = True
        self._received = False
        self._framing = _NONE
        self._left = 0
        self._chunkState = _SIZE
        self._keepAlive = True
        self._chunked = False
        self._producing = False
        self._lost = False
        self._closedWaiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        # Request heads and body chunks are written as they come: do not let
        # Nagle hold one back for the previous one's ACK.  Under TLS the TCP
        # transport is one level down.
        transport: Any = self.transport
        tcp = getattr(transport, "transport", transport)
        if ITCPTransport.providedBy(tcp):
            tcp.setTcpNoDelay(True)

    @property
    def idle(self) -> bool:
        return self._state == _IDLE and self._exchange is None

    # -- request --------------------------------------------------------------

    def send(
        self,
        exchange: IExchange,
        head: bytes,
        isHead: bool,
        body: int | None,
        producer: IPushProducer | None = None,
    ) -> None:
        """
        Write a request head and start waiting for the answer.

        @param body: C{None} for no body, C{-1} for a chunked body, else the
            byte count; bytes follow through L{writeBody} and L{endBody}.
        @param producer: Paused while FAPI's socket is full, during the body.
        """
        self._exchange = exchange
        self._isHead = isHead
        self._state = _HEAD
        self._received = False
        self._requestDone = body is None
        self._chunked = body == -1
        transport: Any = self.transport
        transport.write(head)
        self._producing = producer is not None and body is not None
        if self._producing:
            transport.registerProducer(producer, True)

    def writeBody(self, data: bytes) -> None:
        if self._exchange is None or self.transport is None:
            return
        if self._chunked:
            self.transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            self.transport.write(data)

    def endBody(self) -> None:
        if self._requestDone or self._exchange is None:
            return
        transport: Any = self.transport
        if self._chunked:
            transport.write(b"0\r\n\r\n")
        self._requestDone = True
        self._stopProducer(transport)

    def _stopProducer(self, transport: Any) -> None:
        if self._producing:
            self._producing = False
            transport.unregisterProducer()

    # -- IPushProducer, for the client's request -------------------------------

    def pauseProducing(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abort()

    def closed(self) -> Deferred[None]:
        """Close politely (it is idle); fires once the connection is gone."""
        done: Deferred[None] = Deferred()
        if self._lost:
            done.callback(None)
            return done
        self._closedWaiters.append(done)
        self._state = _DEAD
        transport: Any = self.transport
        transport.loseConnection()
        return done

    def abort(self) -> None:
        """
        Drop the connection now.  The exchange it served is not told: the
        caller is that exchange, or has already dealt with it.
        """
        self._exchange = None
        transport: Any = self.transport
        if self._state != _DEAD and transport is not None:
            self._state = _DEAD
            transport.abortConnection()

    # -- response -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        self._received = True
        if self._state == _BODY:
            self._body(data)
        elif self._state == _HEAD:
            self._buffer += data
            self._head()
        elif self._state == _IDLE:
            # Bytes nobody asked for: the connection is out of step.
            self.abort()

    def _head(self) -> None:
        while self._state == _HEAD:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > _MAX_HEAD:
                    self._fail(UpstreamProtocolError("response head too large"))
                return
            head, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            try:
                self._parseHead(head)
            except UpstreamProtocolError as e:
                self._fail(e)
                return

    def _parseHead(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status = _STATUS_LINE(lines[0])
        if status is None:
            raise UpstreamProtocolError("malformed status line")
        minor, codeText, phrase = status.groups()
        code = int(codeText)
        if code < 100:
            raise UpstreamProtocolError("malformed status code")
        headers: dict[bytes, list[bytes]] = {}
        connection: dict[bytes, list[bytes]] = {}
        encode = encode_header_name
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not _TOKEN(name):
                raise UpstreamProtocolError("malformed header line")
            value = value.strip(b" \t")
            if _BAD_VALUE(value):
                raise UpstreamProtocolError("forbidden character in a header value")
            try:
                name = encode(name)
            except InvalidHeaderName:
                raise UpstreamProtocolError("malformed header name") from None
            target = connection if name in _CONNECTION_CONTROL else headers
            values = target.get(name)
            if values is None:
                target[name] = [value]
            else:
                values.append(value)
        if code < 200:
            if code == 101:
                raise UpstreamProtocolError("FAPI switched protocols")
            return  # 100 Continue, 103 Early Hints: the real answer follows
        self._keepAlive = _keepAlive(minor, connection.get(b"Connection"))
        length = self._framingFor(code, connection, headers)
        self._state = _BODY
        exchange = self._exchange
        assert exchange is not None
        exchange.responseStarted(code, phrase or b"", headers, length, connection)
        if self._framing == _NONE:
            self._finish()
        elif self._buffer:
            rest, self._buffer = self._buffer, b""
            self._body(rest)

    def _framingFor(
        self,
        code: int,
        connection: dict[bytes, list[bytes]],
        headers: dict[bytes, list[bytes]],
    ) -> int | None:
        lengths = connection.get(b"Content-Length")
        if self._isHead or code in _NO_BODY_STATUS:
            self._framing = _NONE
            if self._isHead and lengths:
                headers[b"Content-Length"] = lengths[:1]  # describes the GET
            return None
        codings = connection.get(b"Transfer-Encoding")
        if codings:
            last = b",".join(codings).rsplit(b",", 1)[-1].strip().lower()
            if last == b"chunked":
                self._framing, self._chunkState, self._left = _CHUNKED, _SIZE, 0
            else:
                self._framing, self._keepAlive = _CLOSE, False
            return None
        if lengths:
            values = {v.strip() for value in lengths for v in value.split(b",")}
            if len(values) != 1:
                raise UpstreamProtocolError("conflicting Content-Length")
            text = values.pop()
            if not text.isdigit():
                raise UpstreamProtocolError("malformed Content-Length")
            self._left = int(text)
            self._framing = _LENGTH if self._left else _NONE
            return self._left
        self._framing, self._keepAlive = _CLOSE, False
        return None

    def _body(self, data: bytes) -> None:
        framing = self._framing
        exchange = self._exchange
        if exchange is None:
            return
        if framing == _LENGTH:
            left = self._left
            if len(data) < left:
                self._left = left - len(data)
                exchange.responseData(data)
                return
            if len(data) > left:
                self._keepAlive = False  # FAPI sent more than it announced
                data = data[:left]
            self._left = 0
            if data:
                exchange.responseData(data)
            self._finish()
        elif framing == _CHUNKED:
            self._chunks(data)
        else:
            exchange.responseData(data)

    def _chunks(self, data: bytes) -> None:
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        exchange = self._exchange
        position = 0
        while exchange is self._exchange and exchange is not None:
            state = self._chunkState
            if state == _DATA:
                available = len(buffer) - position
                if not available:
                    return
                take = min(available, self._left)
                exchange.responseData(buffer[position : position + take])
                position += take
                self._left -= take
                if not self._left:
                    self._chunkState = _DATA_END
                continue
            end = buffer.find(b"\r\n", position)
            if end < 0:
                rest = buffer[position:]
                if len(rest) > _MAX_CHUNK_LINE:
                    self._fail(UpstreamProtocolError("chunk line too long"))
                else:
                    self._buffer = rest
                return
            line = buffer[position:end]
            position = end + 2
            if state == _SIZE:
                size = line.split(b";", 1)[0].strip()
                try:
                    self._left = int(size, 16)
                except ValueError:
                    self._fail(UpstreamProtocolError("malformed chunk size"))
                    return
                if size[:1] in (b"-", b"+") or size[:2].lower() == b"0x":
                    self._fail(UpstreamProtocolError("malformed chunk size"))
                    return
                self._chunkState = _DATA if self._left else _TRAILER
            elif state == _DATA_END:
                if line:
                    self._fail(UpstreamProtocolError("chunk not followed by CRLF"))
                    return
                self._chunkState = _SIZE
            elif (
                not line
            ):  # _TRAILER: trailers are dropped, as they are hop-by-hop here
                if position < len(buffer):
                    self._keepAlive = False
                self._finish()
                return

    def _finish(self) -> None:
        exchange, self._exchange = self._exchange, None
        self._state = _IDLE
        self._buffer = b""
        transport: Any = self.transport
        if not self._requestDone:
            # FAPI answered before the body was all sent: FAPI and we now
            # disagree on where the next request would start.
            self._requestDone = True
            self._keepAlive = False
            self._stopProducer(transport)
        # Back to the pool first, so that a request the answer unblocks
        # (a pipelined one, a queued one) can take this very connection.
        if self._keepAlive:
            transport.resumeProducing()  # in case a slow client paused us last
            self._pool._release(self)
        else:
            self._state = _DEAD
            transport.loseConnection()
        if exchange is not None:
            exchange.responseDone()

    def _fail(self, error: Exception) -> None:
        exchange = self._exchange
        self.abort()
        if exchange is not None:
            exchange.upstreamFailed(Failure(error), not self._received)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        exchange, self._exchange = self._exchange, None
        state, self._state = self._state, _DEAD
        self._lost = True
        for done in self._closedWaiters:
            done.callback(None)
        if exchange is not None:
            if state == _BODY and self._framing == _CLOSE:
                exchange.responseDone()
            else:
                exchange.upstreamFailed(reason, state == _HEAD and not self._received)
        self._pool._lost(self)


def _keepAlive(minor: bytes, tokens: list[bytes] | None) -> bool:
    words = {t.strip().lower() for value in tokens or () for t in value.split(b",")}
    if minor == b"1":
        return b"close" not in words
    return b"keep-alive" in words
