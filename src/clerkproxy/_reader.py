"""
FAPI's HTTP/1.1 responses, read from bytes alone.

L{ResponseReader} knows nothing of sockets, pools or clocks.  Whoever owns
the connection calls L{ResponseReader.start} when it sends a request,
L{ResponseReader.feed} with every read, and L{ResponseReader.next} until it
says L{Event.NEED_DATA}:

    reader.start(isHead=False)
    reader.feed(data)
    while (event := reader.next()) is not Event.NEED_DATA:
        if event is Event.HEAD: ...      # reader.head, a ResponseHead
        elif event is Event.DATA: ...    # reader.data, a slice of the input
        else: ...                        # Event.END; reader.leftover

It is pulled rather than calling out, so the caller decides what happens
between two events (an exchange may drop the connection in the middle of a
read) and the reader never has to guard against being re-entered.  Events
are members of an enum and their payloads sit on the reader, so a body
chunk costs no allocation beyond the slice that frames it; a read that is
all body is handed on as the very same C{bytes} object.

A response is read in two stages, as in h11's C{_readers.py}: the head
(status line and header lines, 1xx interim answers skipped), then a body
reader chosen by the head's framing: Content-Length, chunked, until the
connection closes, or none (HEAD, 204, 304, C{Content-Length: 0}).

What is accepted is strict, because the headers are copied into a response
to a browser without being parsed again: a status line of HTTP/1.0 or 1.1,
header names that are tokens, values and reason phrases with no CR, LF or
NUL, and one coherent framing (exactly C{Transfer-Encoding: chunked}, or
matching C{Content-Length}s).  A head over 64 KiB, a chunk line over 4,096
bytes, a chunk size that is not 1 to 16 hex digits, or a 101 Switching
Protocols answer is refused.  Anything refused raises
L{UpstreamProtocolError} from L{ResponseReader.next}; the connection is
then unusable, and so is the reader until L{ResponseReader.start}.
"""

from __future__ import annotations

import enum
import re
from typing import NoReturn

from ._twisted_compat import encode_header_name

__all__ = [
    "DATA",
    "END",
    "HEAD",
    "NEED_DATA",
    "Event",
    "ResponseHead",
    "ResponseReader",
    "UpstreamProtocolError",
]

MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 4096
NO_BODY_STATUS = (204, 304)
_TCHAR = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN = re.compile(_TCHAR + rb"+\Z").match
_BAD_VALUE = re.compile(rb"[\x00\r\n]").search
#: Every field line of a head at once (the head's lines after the status
#: line, CRLF-separated): what the per-line checks in L{_parseHead} accept.
_FIELD_BLOCK = re.compile(
    rb"(?:" + _TCHAR + rb"+:[^\x00\r\n]*\r\n)*" + _TCHAR + rb"+:[^\x00\r\n]*"
).fullmatch
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: (.*))?\Z", re.DOTALL).match
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}\Z").match
_MAX_LENGTH_DIGITS = 19
#: Header fields about this hop's framing and connection, kept apart from
#: the ones relayed to the client.
CONNECTION_CONTROL = frozenset(
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


class UpstreamProtocolError(Exception):
    """FAPI sent something this client will not relay."""


class Event(enum.Enum):
    """What L{ResponseReader.next} found."""

    #: Nothing more can be read until more bytes are fed.
    NEED_DATA = enum.auto()
    #: The final response head is in L{ResponseReader.head}.
    HEAD = enum.auto()
    #: Body bytes are in L{ResponseReader.data}.
    DATA = enum.auto()
    #: The response is complete; see L{ResponseReader.leftover}.
    END = enum.auto()


# The members as plain module names: looking a member up on an Enum class
# costs ~0.2 us, a global ~0.02 us, and the hot path does it per event.
NEED_DATA = Event.NEED_DATA
HEAD = Event.HEAD
DATA = Event.DATA
END = Event.END


class ResponseHead:
    """
    A final response head, as it will be relayed.

    @ivar headers: End-to-end header fields by canonical name, each value
        in the order received.
    @ivar connection: The hop-by-hop framing fields (L{CONNECTION_CONTROL}).
    @ivar length: The body length from C{Content-Length}, when that frames
        the body; L{None} for chunked, close-delimited or absent bodies.
    @ivar bodyless: No body follows the head (HEAD, 204, 304, length 0).
    @ivar keepAlive: FAPI allows another request on this connection.
    """

    __slots__ = (
        "bodyless",
        "code",
        "connection",
        "headers",
        "keepAlive",
        "length",
        "phrase",
    )

    def __init__(
        self,
        code: int,
        phrase: bytes,
        headers: dict[bytes, list[bytes]],
        connection: dict[bytes, list[bytes]],
        length: int | None,
        bodyless: bool,
        keepAlive: bool,
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.connection = connection
        self.length = length
        self.bodyless = bodyless
        self.keepAlive = keepAlive


# Reader phases.
_WAITING, _HEAD, _LENGTH, _CHUNKED, _UNTIL_CLOSE, _DONE, _BROKEN = range(7)
# Chunked sub-phases.
_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER = range(4)


class ResponseReader:
    """
    Reads one response after another from one connection's bytes.

    @ivar head: The last final response head read.
    @ivar data: The last body bytes read.
    @ivar received: Whether any byte arrived since L{start}.
    @ivar leftover: Whether bytes beyond the response arrived with its end
        (valid after L{END}).
    """

    __slots__ = (
        "_buffer",
        "_chunk",
        "_isHead",
        "_left",
        "_phase",
        "_position",
        "_scanned",
        "_trailer",
        "data",
        "head",
        "leftover",
        "received",
    )

    def __init__(self) -> None:
        self._buffer = b""
        self._position = 0
        self._phase = _WAITING
        self._isHead = False
        self._scanned = 0
        self._left = 0
        self._chunk = _SIZE
        self._trailer = 0
        self.head: ResponseHead | None = None
        self.data = b""
        self.received = False
        self.leftover = False

    def start(self, isHead: bool) -> None:
        """Expect the response to a request just sent (C{isHead}: a HEAD)."""
        self._buffer = b""
        self._position = 0
        self._scanned = 0
        self._phase = _HEAD
        self._isHead = isHead
        self.received = False
        self.leftover = False

    def feed(self, data: bytes) -> None:
        """Add bytes read from the connection."""
        if not data:
            return
        self.received = True
        position = self._position
        if position < len(self._buffer):
            # Only a partial head or chunk line is ever left over: bounded.
            self._buffer = self._buffer[position:] + data
            self._scanned -= position
        else:
            self._buffer = data
            self._scanned = 0
        self._position = 0

    def eof(self) -> bool:
        """
        The connection closed: whether that completes the response (a body
        delimited by the close).  Otherwise the response was cut short.
        """
        if self._phase == _UNTIL_CLOSE:
            self._phase = _DONE
            return True
        return False

    def next(self) -> Event:
        """
        The next event in what has been fed.

        @raise UpstreamProtocolError: FAPI's answer is malformed or unsafe.
        """
        phase = self._phase
        try:
            if phase == _LENGTH:
                return self._readLength()
            if phase == _CHUNKED:
                return self._readChunked()
            if phase == _HEAD:
                return self._readHead()
            if phase == _UNTIL_CLOSE:
                return self._readUntilClose()
        except UpstreamProtocolError:
            self._phase = _BROKEN
            raise
        if phase == _BROKEN:
            raise UpstreamProtocolError("reader used after a protocol error")
        return NEED_DATA  # _WAITING, _DONE: nothing expected

    # -- the head ---------------------------------------------------------

    def _readHead(self) -> Event:
        while True:
            buffer, position = self._buffer, self._position
            end = buffer.find(b"\r\n\r\n", max(position, self._scanned - 3))
            if end < 0:
                if len(buffer) - position > MAX_HEAD:
                    raise UpstreamProtocolError("response head too large")
                self._scanned = len(buffer)
                return NEED_DATA
            if end - position > MAX_HEAD:
                raise UpstreamProtocolError("response head too large")
            self._position = self._scanned = end + 4
            head = _parseHead(buffer[position:end], self._isHead)
            if head is None:
                continue  # 100 Continue, 103 Early Hints: the real answer follows
            self.head = head
            if head.bodyless:
                self._phase = _LENGTH
                self._left = 0
            elif head.length is not None:
                self._phase = _LENGTH
                self._left = head.length
            elif b"Transfer-Encoding" in head.connection:
                self._phase = _CHUNKED
                self._chunk = _SIZE
            else:
                self._phase = _UNTIL_CLOSE
            return HEAD

    # -- one reader per framing ---------------------------------------------

    def _readLength(self) -> Event:
        """Content-Length framing, and bodies of length zero."""
        left = self._left
        if not left:
            self._phase = _DONE
            self.leftover = self._position < len(self._buffer)
            return END
        buffer, position = self._buffer, self._position
        available = len(buffer) - position
        if not available:
            return NEED_DATA
        if available <= left and not position:
            self.data = buffer
            self._position = available
            self._left = left - available
            return DATA
        take = available if available < left else left
        self.data = buffer[position : position + take]
        self._position = position + take
        self._left = left - take
        return DATA

    def _readUntilClose(self) -> Event:
        """A body that ends when FAPI closes the connection."""
        buffer, position = self._buffer, self._position
        if position >= len(buffer):
            return NEED_DATA
        self.data = buffer[position:] if position else buffer
        self._position = len(buffer)
        return DATA

    def _readChunked(self) -> Event:
        """Chunked framing; chunk extensions and trailers are dropped."""
        buffer = self._buffer
        while True:
            position = self._position
            state = self._chunk
            if state == _CHUNK_DATA:
                available = len(buffer) - position
                if not available:
                    return NEED_DATA
                left = self._left
                take = available if available < left else left
                self.data = (
                    buffer
                    if take == len(buffer)
                    else buffer[position : position + take]
                )
                self._position = position + take
                self._left = left - take
                if take == left:
                    self._chunk = _CHUNK_END
                return DATA
            if state == _CHUNK_END:
                if len(buffer) - position < 2:
                    if buffer[position:] not in (b"", b"\r"):
                        raise UpstreamProtocolError("chunk not followed by CRLF")
                    return NEED_DATA
                if buffer[position : position + 2] != b"\r\n":
                    raise UpstreamProtocolError("chunk not followed by CRLF")
                self._position = position + 2
                self._chunk = _SIZE
                continue
            end = buffer.find(b"\r\n", position, position + MAX_CHUNK_LINE + 2)
            if end < 0:
                if len(buffer) - position > MAX_CHUNK_LINE:
                    raise UpstreamProtocolError("chunk line too long")
                return NEED_DATA
            self._position = end + 2
            if state == _SIZE:
                size = buffer[position:end].partition(b";")[0].strip(b" \t")
                if not _CHUNK_SIZE(size):
                    raise UpstreamProtocolError("malformed chunk size")
                self._left = int(size, 16)
                if self._left:
                    self._chunk = _CHUNK_DATA
                else:
                    self._chunk = _TRAILER
                    self._trailer = 0
            elif end == position:  # _TRAILER: the empty line that ends it
                self._phase = _DONE
                self.leftover = end + 2 < len(buffer)
                return END
            else:  # a trailer field: hop-by-hop here, so dropped
                self._trailer += end + 2 - position
                if self._trailer > MAX_HEAD:
                    raise UpstreamProtocolError("trailer too large")


def _parseHead(head: bytes, isHead: bool) -> ResponseHead | None:
    """A final response head, or L{None} for an interim (1xx) one."""
    lines = head.split(b"\r\n")
    status = _STATUS_LINE(lines[0])
    if status is None:
        raise UpstreamProtocolError("malformed status line")
    minor, codeText, phrase = status.groups()
    code = int(codeText)
    if code < 100:
        raise UpstreamProtocolError("malformed status code")
    if phrase and _BAD_VALUE(phrase):
        raise UpstreamProtocolError("forbidden character in the reason phrase")
    if len(lines) > 1 and _FIELD_BLOCK(head, len(lines[0]) + 2) is None:
        _refuseFieldLines(lines)
    # Every field line is a token, a colon and a value free of NUL, CR and
    # LF: one pattern checked them all at once.
    headers: dict[bytes, list[bytes]] = {}
    connection: dict[bytes, list[bytes]] = {}
    encode = encode_header_name
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = encode(name)
        target = connection if name in CONNECTION_CONTROL else headers
        values = target.get(name)
        if values is None:
            target[name] = [value.strip(b" \t")]
        else:
            values.append(value.strip(b" \t"))
    return _finishHead(minor, code, phrase, headers, connection, isHead)


def _refuseFieldLines(lines: list[bytes]) -> NoReturn:
    """Say what is wrong with the first bad line of a head's field lines."""
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN(name):
            raise UpstreamProtocolError("malformed header line")
        if _BAD_VALUE(value):
            raise UpstreamProtocolError("forbidden character in a header value")
    raise UpstreamProtocolError("malformed header line")  # pragma: no cover


def _finishHead(
    minor: bytes,
    code: int,
    phrase: bytes | None,
    headers: dict[bytes, list[bytes]],
    connection: dict[bytes, list[bytes]],
    isHead: bool,
) -> ResponseHead | None:
    """The framing of a parsed head: its length, coding and persistence."""
    if code < 200:
        if code == 101:
            raise UpstreamProtocolError("FAPI switched protocols")
        return None
    keepAlive = _keepAlive(minor, connection.get(b"Connection"))
    lengths = connection.get(b"Content-Length")
    codings = connection.get(b"Transfer-Encoding")
    if codings is not None:
        # Any coding but chunked would reach the browser still encoded,
        # with nothing to say so: refuse it rather than guess.
        words = [w.strip(b" \t").lower() for v in codings for w in v.split(b",")]
        if words != [b"chunked"]:
            raise UpstreamProtocolError("unsupported transfer coding")
        if minor == b"0":
            raise UpstreamProtocolError("Transfer-Encoding in an HTTP/1.0 answer")
        if lengths is not None:
            # RFC 9112 section 6.3: chunked wins, and the connection is
            # not trusted with another request.
            keepAlive = False
            lengths = None
    length: int | None = None
    if lengths is not None:
        distinct = {v.strip(b" \t") for value in lengths for v in value.split(b",")}
        if len(distinct) != 1:
            raise UpstreamProtocolError("conflicting Content-Length")
        text = distinct.pop()
        if not text.isdigit() or len(text) > _MAX_LENGTH_DIGITS:
            raise UpstreamProtocolError("malformed Content-Length")
        length = int(text)
    if isHead or code in NO_BODY_STATUS:
        if isHead and lengths:
            headers[b"Content-Length"] = lengths[:1]  # describes the GET
        return ResponseHead(
            code, phrase or b"", headers, connection, None, True, keepAlive
        )
    if codings is not None:
        return ResponseHead(
            code, phrase or b"", headers, connection, None, False, keepAlive
        )
    if length is not None:
        return ResponseHead(
            code, phrase or b"", headers, connection, length, not length, keepAlive
        )
    # Neither: the body runs until FAPI closes, and so does the connection.
    return ResponseHead(code, phrase or b"", headers, connection, None, False, False)


def _keepAlive(minor: bytes, tokens: list[bytes] | None) -> bool:
    words = {t.strip().lower() for value in tokens or () for t in value.split(b",")}
    if minor == b"1":
        return b"close" not in words
    return b"keep-alive" in words
