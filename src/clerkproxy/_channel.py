"""
The server side of one client connection: Twisted's C{HTTPChannel} with
stricter framing, size limits with the right status codes, deadlines that
slow clients cannot stretch, and the bookkeeping a graceful drain needs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web import http

if TYPE_CHECKING:
    from ._site import StreamingSite

__all__ = ["MAX_HEAD", "MAX_REQUEST_LINE", "StreamingChannel"]

#: Largest request line (414 above it) and request head (431 above it).
MAX_REQUEST_LINE = 8 * 1024
MAX_HEAD = 16 * 1024

# Where a connection is between requests; each phase has its own deadline.
_HEAD, _BUSY, _IDLE = range(3)

_RESPONSES = {
    408: b"HTTP/1.1 408 Request Timeout\r\n",
    414: b"HTTP/1.1 414 URI Too Long\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
}


class StreamingChannel(http.HTTPChannel):
    """
    Twisted already rejects with 400: differing, repeated or signed
    C{Content-Length}, C{Content-Length} with C{Transfer-Encoding},
    whitespace before a colon, and NUL, CR or LF in a header value.  This
    adds:

     - 400 for any transfer coding but C{chunked} (C{identity} included),
       and for C{Transfer-Encoding} on an HTTP/1.0 request;
     - 414 for a request line over 8 KiB, 431 for a head over 16 KiB;
     - the header deadline: a request head must arrive in full within
       C{header_timeout} of its first byte (or of the connection), however
       slowly it trickles in; 408 and close otherwise;
     - the idle deadline: a keep-alive connection with no request for
       C{idle_timeout} is closed;
     - C{Connection: close} honoured wherever it appears among the tokens.

    Twisted's own idle timer, which any byte resets, is not used.
    """

    MAX_LENGTH = MAX_HEAD
    # Ours are stricter and answer 414/431; Twisted's answer a bare 400.
    totalHeadersSize = 1 << 20

    site: StreamingSite
    _discarding = False
    _phase = _HEAD
    _lines = 0
    _headBytes = 0

    # -- lifecycle ---------------------------------------------------------

    def connectionMade(self) -> None:
        http.HTTPChannel.connectionMade(self)
        site = self.site
        site.channels.add(self)
        site.headerDeadlines.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        site = self.site
        site.channels.discard(self)
        site.headerDeadlines.remove(self)
        site.idleDeadlines.remove(self)
        http.HTTPChannel.connectionLost(self, reason)

    def detach(self) -> None:
        """
        Step aside before reading anything: the connection turned out to
        speak HTTP/2 (see L{clerkproxy._h2.ProtocolSelector}).
        """
        site = self.site
        site.channels.discard(self)
        site.headerDeadlines.remove(self)
        self.setTimeout(None)  # type: ignore[no-untyped-call]
        transport: Any = self.transport
        transport.unregisterProducer()

    def expired(self) -> None:
        """A deadline passed: the head never completed, or nothing came."""
        if self._phase == _HEAD:
            self._refuse(408)
        elif self._phase == _IDLE:
            http.HTTPChannel.loseConnection(self)

    @property
    def idle(self) -> bool:
        """Whether no request is under way on this connection."""
        return self._phase == _IDLE

    def drain(self) -> None:
        """
        Finish what is under way and close: an idle connection closes now,
        a busy one after its response, which says C{Connection: close}.
        """
        self.persistent = False
        if self._phase != _BUSY:
            http.HTTPChannel.loseConnection(self)

    # -- reading -----------------------------------------------------------

    def discardInput(self) -> None:
        """Ignore everything the client sends from now on."""
        self._discarding = True

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._phase == _IDLE and data:
            self._phase = _HEAD
            site = self.site
            site.idleDeadlines.remove(self)
            site.headerDeadlines.add(self)
        http.HTTPChannel.dataReceived(self, data)

    def lineReceived(self, line: bytes) -> None:
        if self._discarding:
            return
        if self._lines == 0:
            if not line:
                # A stray CRLF before a request; Twisted tolerates one.
                http.HTTPChannel.lineReceived(self, line)
                return
            if len(line) > MAX_REQUEST_LINE:
                self._refuse(414)
                return
        self._lines += 1
        self._headBytes += len(line) + 2
        if self._headBytes > MAX_HEAD:
            self._refuse(431)
            return
        http.HTTPChannel.lineReceived(self, line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(414 if self._lines == 0 else 431)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._discarding:
            http.HTTPChannel.rawDataReceived(self, data)

    def allHeadersReceived(self) -> None:
        self._phase = _BUSY
        self.site.headerDeadlines.remove(self)
        http.HTTPChannel.allHeadersReceived(self)

    def allContentReceived(self) -> None:
        if not self._discarding:
            http.HTTPChannel.allContentReceived(self)

    def requestDone(self, request: Any) -> None:
        self._lines = self._headBytes = 0
        if self.persistent:
            # Before Twisted replays any pipelined bytes, which may start
            # the next request (and its header deadline) at once.
            self._phase = _IDLE
            self.site.idleDeadlines.add(self)
        http.HTTPChannel.requestDone(self, request)

    def _send100Continue(self) -> None:
        if not self._discarding:
            http.HTTPChannel._send100Continue(self)

    def _refuse(self, status: int) -> None:
        self._discarding = True
        transport: Any = self.transport
        transport.write(
            _RESPONSES[status] + b"Connection: close\r\nContent-Length: 0\r\n\r\n"
        )
        http.HTTPChannel.loseConnection(self)

    # -- framing -----------------------------------------------------------

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        Twisted reads only the first C{Connection} header and splits it on
        spaces, so C{Connection: keep-alive, close} or a second header
        saying C{close} go unnoticed; read every value, split on commas.
        """
        tokens: set[bytes] = set()
        for value in request.requestHeaders.getRawHeaders(b"Connection", ()):
            tokens.update(t.strip().lower() for t in value.split(b","))
        keep = version == b"HTTP/1.1" and b"close" not in tokens
        if not keep or self.site.draining:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return True

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        if header == b"Transfer-Encoding" and (
            data.lower() != b"chunked" or self._version != b"HTTP/1.1"
        ):
            return self._failChooseTransferDecoder()
        ok: bool = http.HTTPChannel._maybeChooseTransferDecoder(self, header, data)
        return ok
