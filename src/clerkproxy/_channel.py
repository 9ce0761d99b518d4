"""
The server side of one client connection: Twisted's C{HTTPChannel} with
stricter framing, size limits with the right status codes, deadlines that
slow clients cannot stretch, and the bookkeeping a graceful drain needs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import INonQueuedRequestFactory
from zope.interface import implementer

from ._interfaces import IStreamingChannel, IStreamingRequest
from ._sockets import limit_unsent
from ._twisted_compat import (
    ChunkedTransferDecoder,
    encode_header_name,
    end_head,
    header_values,
    headers_from_raw,
    replace_chunked_decoder,
    request_version,
    set_request_line,
    start_head,
)

if TYPE_CHECKING:
    from ._site import StreamingSite

__all__ = [
    "MAX_CHUNK_SIZE_DIGITS",
    "MAX_HEAD",
    "MAX_HEADER_LINES",
    "MAX_REQUEST_LINE",
    "StreamingChannel",
]

#: Default largest request line (414 above it) and request head (431 above
#: it); C{--max-request-line} and C{--max-header-size} change them.
MAX_REQUEST_LINE = 16 * 1024
MAX_HEAD = 64 * 1024
#: Most header lines in one request head (431 above it).
MAX_HEADER_LINES = 100
#: Most hex digits in a chunk size: 16 is already 2**64 - 1.
MAX_CHUNK_SIZE_DIGITS = 16

_HEX_DIGITS = re.compile(rb"[0-9A-Fa-f]*").match
# Control bytes other than HTAB (NUL, CR and LF included, which Twisted
# refuses too) and DEL.
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search
# RFC 9112 section 3.2 / RFC 3986: uri-host [ ":" port ], where uri-host is
# an IP literal in brackets or a reg-name (which covers IPv4 addresses).
_HOST = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)"
    rb"(?::[0-9]*)?\Z"
).match

# What the one-pass head parser takes on its own (anything else goes
# through Twisted's line-by-line path, which answers it as it always has):
# a request line Twisted's _parseRequestLine accepts, with a target of
# visible ASCII (Twisted also takes bytes 0x7F to 0xB0); header lines that
# are a token, a colon, and a value of HTAB, visible ASCII or obs-text,
# which are the lines Twisted's headerReceived and our lineReceived accept
# (no obs-fold, no whitespace before the colon, no control byte).
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_REQUEST_LINE = re.compile(_TCHAR + rb"+ [\x21-\x7e]+ HTTP/1\.[01]").fullmatch
_FIELD_LINES = re.compile(
    rb"(?:" + _TCHAR + rb"+:[\t\x20-\x7e\x80-\xff]*\r\n)*"
).fullmatch

# Where a connection is between requests; each phase has its own deadline.
_HEAD, _BUSY, _IDLE = range(3)
# Whether a connection is counted for --max-connections-per-client yet:
# at its first bytes, at its first request head, or already (or never).
_AT_FIRST_BYTES, _AT_HEAD, _ADMITTED = range(3)

_RESPONSES = {
    400: b"HTTP/1.1 400 Bad Request\r\n",
    408: b"HTTP/1.1 408 Request Timeout\r\n",
    414: b"HTTP/1.1 414 URI Too Long\r\n",
    413: b"HTTP/1.1 413 Content Too Large\r\n",
    431: b"HTTP/1.1 431 Request Header Fields Too Large\r\n",
}


class _BoundedChunkedDecoder(ChunkedTransferDecoder):
    """
    Twisted's chunked decoder, refusing chunk sizes no honest client sends:
    more than 16 hex digits (a parser that wraps at 64 bits would read
    C{10000000000000005} as 5, and a front proxy that does could then
    disagree with us about where the body ends), or a size that takes the
    body past the limit the request's resource set.

    The check runs on the digits as they arrive, before the line is
    complete and before any of the chunk's data is passed on.  A refused
    body is not an error Twisted sees: the channel answers, and every
    byte after that is dropped.
    """

    def __init__(
        self,
        dataCallback: Callable[[bytes], None],
        finishCallback: Callable[[bytes], None],
        refuse: Callable[[int], None],
        limit: Callable[[], int | None],
    ) -> None:
        ChunkedTransferDecoder.__init__(self, dataCallback, finishCallback)
        self._refuse = refuse
        self._limit = limit
        self._announced = 0

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        match = _HEX_DIGITS(self._buffer)
        if match is not None and match.end() > MAX_CHUNK_SIZE_DIGITS:
            return self._refused(400)
        if not ChunkedTransferDecoder._dataReceived_CHUNK_LENGTH(self):
            return False
        self._announced += self.length
        limit = self._limit()
        if limit is not None and self._announced > limit:
            return self._refused(413)
        return True

    def _refused(self, status: int) -> bool:
        self.state = "REFUSED"
        del self._buffer[:]
        self._refuse(status)
        return False

    def _dataReceived_REFUSED(self) -> bool:
        del self._buffer[:]
        return False


@implementer(IStreamingChannel)
class StreamingChannel(HTTPChannel):
    """
    Twisted already rejects with 400: differing, repeated or signed
    C{Content-Length}, C{Content-Length} with C{Transfer-Encoding},
    whitespace before a colon, and NUL, CR or LF in a header value.  This
    adds:

     - 400 for any transfer coding but C{chunked} (C{identity} included),
       and for C{Transfer-Encoding} on an HTTP/1.0 request;
     - 400 for an HTTP/1.1 request without C{Host}, for any request with
       more than one C{Host} or one that is not a host and optional port
       (RFC 9112 section 3.2);
     - 400 for obsolete line folding (a header line starting with a space
       or tab; RFC 9112 section 5.2 lets a proxy refuse it), and for any
       control byte but tab, or DEL, in the head;
     - 400 for a chunk size of more than 16 hex digits, and 413 for one that
       takes the body past the resource's limit, before any of its data is
       passed on;
     - 414 for a request line over C{site.maxRequestLine}, 431 for a head
       over C{site.maxHeaderSize} or with more than 100 header lines;
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
    maxHeaders = MAX_HEADER_LINES + 1
    _maxRequestLine = MAX_REQUEST_LINE
    _maxHead = MAX_HEAD
    _admission = _ADMITTED
    _client: bytes | None = None

    site: StreamingSite
    _discarding = False
    _phase = _HEAD
    _lines = 0
    _headBytes = 0
    _peer: Any = None
    _host: Any = None

    # -- lifecycle ---------------------------------------------------------

    def connectionMade(self) -> None:
        HTTPChannel.connectionMade(self)
        site = self.site
        self._maxRequestLine = site.maxRequestLine
        self._maxHead = site.maxHeaderSize
        # LineReceiver's own limit only has to catch what ours cannot see:
        # a line that never ends.
        self.MAX_LENGTH = max(self._maxHead, self._maxRequestLine)
        self.totalHeadersSize = 2 * self.MAX_LENGTH
        if site.clientConnections is not None:
            self._admission = _AT_FIRST_BYTES
        site.channels.add(self)
        site.headerDeadlines.add(self)
        limit_unsent(self.transport, site.unsentLimit)

    def getPeer(self) -> Any:
        # Twisted's Request asks for both addresses on every request; keep
        # one of each per connection (TCP's getHost is a getsockname call).
        # Behind haproxy: the addresses are final before connectionMade.
        peer = self._peer
        if peer is None:
            peer = self._peer = HTTPChannel.getPeer(self)
        return peer

    def getHost(self) -> Any:
        host = self._host
        if host is None:
            host = self._host = HTTPChannel.getHost(self)
        return host

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        site = self.site
        site.channels.discard(self)
        site.headerDeadlines.remove(self)
        site.idleDeadlines.remove(self)
        client = self._client
        if client is not None and site.clientConnections is not None:
            self._client = None
            site.clientConnections.release(client)
        HTTPChannel.connectionLost(self, reason)

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
            self.site.metrics.timedOut("header")
            self._refuse(408)
        elif self._phase == _IDLE:
            self.site.metrics.timedOut("idle")
            HTTPChannel.loseConnection(self)

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
            HTTPChannel.loseConnection(self)

    # -- reading -----------------------------------------------------------

    def discardInput(self) -> None:
        """Ignore everything the client sends from now on."""
        self._discarding = True

    def dataReceived(self, data: bytes) -> None:
        if self._discarding:
            return
        if self._admission == _AT_FIRST_BYTES and data and not self._admitPeer():
            return
        if self._phase == _IDLE and data:
            self._phase = _HEAD
            site = self.site
            site.idleDeadlines.remove(self)
            site.headerDeadlines.add(self)
        if self._lines == 0 and self.persistent and self._headInOnePass(data):
            return
        HTTPChannel.dataReceived(self, data)

    def _headInOnePass(self, data: bytes) -> bool:
        """
        Read a request head that C{data} holds in full, from its first
        byte, in one pass: split it at the blank line, check every line at
        once, and build the request once, instead of a callback per line.

        It takes only heads that Twisted's line-by-line path and our
        checks in L{lineReceived} would accept as they are, and leaves the
        channel exactly as that path would: the request and its headers,
        the request line, the body decoder, then L{allHeadersReceived}
        (Host, admission, persistence, C{Expect}, C{gotLength}) and the
        body or the next request from the bytes that follow.  Anything
        else (a head in pieces, a refusal, a rare form such as several
        C{Content-Length} lines) returns false having changed nothing, and
        goes the usual way.
        """
        end = data.find(b"\r\n\r\n")
        if end < 0 or end + 4 > self._maxHead:
            return False
        lineEnd = data.find(b"\r\n")
        if lineEnd == 0 or lineEnd > self._maxRequestLine:
            return False
        requestLine = data[:lineEnd]
        if _REQUEST_LINE(requestLine) is None:
            return False
        fields = data[lineEnd + 2 : end + 2]
        if fields and _FIELD_LINES(fields) is None:
            return False
        lines = fields.split(b"\r\n")
        lines.pop()  # after the last CRLF
        if len(lines) > MAX_HEADER_LINES:
            return False
        raw: dict[bytes, list[bytes]] = {}
        encode = encode_header_name
        for line in lines:
            name, _, value = line.partition(b":")
            name = encode(name)
            value = value.strip(b" \t")
            values = raw.get(name)
            if values is None:
                raw[name] = [value]
            else:
                values.append(value)
        method, target, version = requestLine.split(b" ")
        framing: bytes | None = None
        lengths = raw.get(b"Content-Length")
        codings = raw.get(b"Transfer-Encoding")
        if lengths is not None:
            if codings is not None or len(lengths) != 1 or not lengths[0].isdigit():
                return False
            framing = b"Content-Length"
        elif codings is not None:
            if (
                len(codings) != 1
                or codings[0].lower() != b"chunked"
                or version != b"HTTP/1.1"
            ):
                return False
            framing = b"Transfer-Encoding"
        transport: Any = self.transport
        if transport is None or transport.disconnecting or not start_head(self):
            return False
        try:
            self.resetTimeout()  # type: ignore[no-untyped-call]
            self._lines = len(lines) + 2
            self._headBytes = end + 4
            factory: Any = self.requestFactory
            if INonQueuedRequestFactory.providedBy(factory):
                request = factory(self)
            else:
                request = factory(self, len(self.requests))
            self.requests.append(request)
            set_request_line(self, method, target, version)
            request.requestHeaders = headers_from_raw(raw)
            if framing is not None:
                self._maybeChooseTransferDecoder(framing, raw[framing][0])
            self.allHeadersReceived()
            if self.length == 0:
                self.allContentReceived()
            else:
                self.setRawMode()  # type: ignore[no-untyped-call]
        finally:
            rest = data[end + 4 :] + end_head(self)
        if rest and not transport.disconnecting:
            HTTPChannel.dataReceived(self, rest)
        return True

    def lineReceived(self, line: bytes) -> None:
        if self._discarding:
            return
        if self._lines == 0:
            if not line:
                # A stray CRLF before a request; Twisted tolerates one.
                HTTPChannel.lineReceived(self, line)
                return
            if len(line) > self._maxRequestLine:
                self._refuse(414)
                return
        elif line:
            if line[0] in b" \t":
                self._refuse(400)  # obs-fold
                return
            if _CONTROL(line) is not None:
                self._refuse(400)
                return
            if self._lines > MAX_HEADER_LINES:
                self._refuse(431)
                return
        self._lines += 1
        self._headBytes += len(line) + 2
        if self._headBytes > self._maxHead:
            self._refuse(431)
            return
        HTTPChannel.lineReceived(self, line)

    def lineLengthExceeded(self, line: bytes) -> None:
        self._refuse(414 if self._lines == 0 else 431)

    def rawDataReceived(self, data: bytes) -> None:
        if not self._discarding:
            HTTPChannel.rawDataReceived(self, data)

    def allHeadersReceived(self) -> None:
        self._phase = _BUSY
        self.site.headerDeadlines.remove(self)
        if self._admission == _AT_HEAD and not self._admitForwarded():
            return
        hosts = header_values(self.requests[-1].requestHeaders, b"Host")
        if (hosts is None and self._version == b"HTTP/1.1") or (
            hosts is not None and (len(hosts) != 1 or not _HOST(hosts[0]))
        ):
            self._refuse(400)
            return
        HTTPChannel.allHeadersReceived(self)

    def allContentReceived(self) -> None:
        if not self._discarding:
            HTTPChannel.allContentReceived(self)

    def requestDone(self, request: Any) -> None:
        self._lines = self._headBytes = 0
        if self.persistent:
            # Before Twisted replays any pipelined bytes, which may start
            # the next request (and its header deadline) at once.
            self._phase = _IDLE
            self.site.idleDeadlines.add(self)
        HTTPChannel.requestDone(self, request)

    def _send100Continue(self) -> None:
        if not self._discarding:
            HTTPChannel._send100Continue(self)

    # -- --max-connections-per-client ------------------------------------

    def _admitPeer(self) -> bool:
        """
        The first bytes are in: the PROXY header (if any) has been read, so
        the peer is the real one.  A peer whose C{X-Forwarded-For} is
        believed is counted at its first request head instead.
        """
        host = getattr(self.transport.getPeer(), "host", None)  # type: ignore[union-attr]
        site = self.site
        if site.clientAddress.believes(host):
            self._admission = _AT_HEAD
            return True
        assert host is not None
        return self._admit(host.encode("ascii"))

    def _admitForwarded(self) -> bool:
        """The first head is in: count under the address sent to FAPI."""
        request = self.requests[-1]
        host = getattr(self.transport.getPeer(), "host", None)  # type: ignore[union-attr]
        client = self.site.clientAddress.resolve(
            host, header_values(request.requestHeaders, b"X-Forwarded-For")
        )
        return self._admit(client)

    def _admit(self, client: bytes) -> bool:
        self._admission = _ADMITTED
        connections = self.site.clientConnections
        assert connections is not None
        if not client:
            return True  # nothing known to count under (a bare UNIX socket)
        if connections.admit(client):
            self._client = client
            return True
        self._discarding = True
        self.transport.abortConnection()  # type: ignore[union-attr]
        return False

    def _refuse(self, status: int) -> None:
        self._discarding = True
        transport: Any = self.transport
        transport.write(
            _RESPONSES[status] + b"Connection: close\r\nContent-Length: 0\r\n\r\n"
        )
        HTTPChannel.loseConnection(self)

    # -- framing -----------------------------------------------------------

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        Twisted reads only the first C{Connection} header and splits it on
        spaces, so C{Connection: keep-alive, close} or a second header
        saying C{close} go unnoticed; read every value, split on commas.
        """
        tokens: set[bytes] = set()
        for value in header_values(request.requestHeaders, b"Connection") or ():
            tokens.update(t.strip().lower() for t in value.split(b","))
        keep = version == b"HTTP/1.1" and b"close" not in tokens
        if not keep or self.site.draining:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return True

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        if header == b"Transfer-Encoding" and (
            data.lower() != b"chunked" or request_version(self) != b"HTTP/1.1"
        ):
            return self._failChooseTransferDecoder()
        ok: bool = HTTPChannel._maybeChooseTransferDecoder(self, header, data)
        if ok and header == b"Transfer-Encoding":
            request = self.requests[-1]
            streaming = IStreamingRequest.providedBy(request)

            def limit() -> int | None:
                return request.maxBodySize if streaming else None

            replace_chunked_decoder(
                self,
                lambda data, finish: _BoundedChunkedDecoder(
                    data, finish, self._refuseBody, limit
                ),
            )
        return ok

    def _refuseBody(self, status: int) -> None:
        """
        A chunk size was refused: the request's resource (which may have
        sent the head on already) gives up, and the client gets C{status}.
        """
        request = self.requests[-1]
        if not IStreamingRequest.providedBy(request) or not request.refuseBody(status):
            self._refuse(status)
