"""
The request head read in one pass (L{StreamingChannel._headInOnePass})
against the line-by-line path it stands in for, and against Twisted's own
C{HTTPChannel}: every check Twisted makes on a head still holds, byte for
byte, whether the head comes in one read or in pieces.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from clerkproxy import build_site
from clerkproxy._channel import StreamingChannel
from clerkproxy.interfaces import IRequestBodyReceiver, IStreamingResource


def _summary(request: Any, body: bytes) -> bytes:
    """What the resource saw, in the response body."""
    headers = sorted(
        (name, tuple(values))
        for name, values in request.requestHeaders.getAllRawHeaders()
    )
    return repr(
        (request.method, request.uri, request.clientproto, headers, body)
    ).encode()


@implementer(IRequestBodyReceiver)
class _Answering:
    def __init__(self, request: Any, seen: list[bytes]) -> None:
        self.request = request
        self.seen = seen
        self.body = b""

    def bodyDataReceived(self, data: bytes) -> None:
        self.body += data

    def bodyDone(self) -> None:
        if not self.request.finished:
            summary = _summary(self.request, self.body)
            self.seen.append(summary)
            self.request.write(summary)
            self.request.finish()


@implementer(IStreamingResource)
class Echo(Resource):
    """Answers every request with what it saw of it."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def renderStreaming(self, request: Any, length: int | None) -> _Answering:
        return _Answering(request, self.seen)

    def render(self, request: Any) -> bytes:
        summary = _summary(request, request.content.read())
        self.seen.append(summary)
        return summary


class LineByLine(StreamingChannel):
    """The channel as it was: every head through Twisted's lines."""

    def _headInOnePass(self, data: bytes) -> bool:
        return False


_DATE = re.compile(rb"\r\nDate: [^\r]*")


def _outcome(
    pieces: list[bytes], protocol: type[Any] | None = None, echo: Echo | None = None
) -> Any:
    site: Any = build_site(echo or Echo(), MemoryReactorClock())
    channel = site.buildProtocol(None)
    assert type(channel) is StreamingChannel
    if protocol is not None:
        channel.__class__ = protocol
    transport = StringTransport()
    channel.makeConnection(transport)
    for piece in pieces:
        if transport.disconnecting:
            break  # a real transport stops reading once it is closing
        channel.dataReceived(piece)
    return _DATE.sub(b"", transport.value()), bool(transport.disconnecting)


def _twisted(data: bytes, echo: Echo | None = None) -> bytes:
    """Twisted's own channel and request, in one read."""
    site = Site(echo or Echo())
    site.protocol = HTTPChannel  # not the HTTP/2-capable wrapper
    channel = site.buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    return transport.value()


_LINES = [
    b"Host: x",
    b"Host: a:1",
    b"Host: a b",
    b"host: x",
    b"HOST: y",
    b"Content-Length: 5",
    b"Content-Length: 0",
    b"Content-Length:  5 ",
    b"Content-Length: +5",
    b"Content-Length: -1",
    b"Content-Length: 5, 5",
    b"Content-Length:",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: Chunked",
    b"Transfer-Encoding: identity",
    b"Transfer-Encoding: gzip, chunked",
    b"Connection: close",
    b"Connection: keep-alive, close",
    b"Connection: keep-alive",
    b"Expect: 100-continue",
    b"X_Under: 1",
    b"X-A : b",
    b"X-A\t: b",
    b" folded",
    b"\tfolded",
    b"X-A: a\x01b",
    b"X-A: a\x7f",
    b"X-A: a\x00",
    b"X-A: \xe9t\xe9",
    b"X-A:\tb\t",
    b"X-A:",
    b"NoColon",
    b":empty-name",
    b"X-A: a:b",
    b"Cookie: a=b; c=d",
    b"Content-MD5: x",
    b"x-forwarded-for: 10.0.0.1",
]

# Lines that can each be part of an accepted head.
_GOOD_LINES = [
    b"Content-Length: 5",
    b"Content-Length: 0",
    b"Content-Length:  5 ",
    b"Transfer-Encoding: chunked",
    b"Transfer-Encoding: Chunked",
    b"Connection: close",
    b"Connection: keep-alive",
    b"Expect: 100-continue",
    b"X_Under: 1",
    b"X-A: \xe9t\xe9",
    b"X-A:\tb\t",
    b"X-A:",
    b"x-a: a:b",
    b"Cookie: a=b; c=d",
    b"content-md5: x",
    b"x-forwarded-for: 10.0.0.1",
]

_GOOD_REQUEST_LINES = st.builds(
    lambda m, t, v: m + b" " + t + b" " + v,
    st.sampled_from([b"GET", b"POST", b"get", b"M-SEARCH"]),
    st.sampled_from([b"/", b"/v1/client?x=1&y", b"*", b"http://a/b", b"/\xb0"]),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
)

_REQUEST_LINES = st.one_of(
    st.builds(
        lambda m, t, v: m + b" " + t + b" " + v,
        st.sampled_from([b"GET", b"POST", b"PUT", b"G@T", b"", b"get"]),
        st.sampled_from(
            [
                *(b"/", b"/v1/client?x=1&y", b"*", b"http://a/b", b"/a b"),
                *(b"/\x7f", b"/\xe9", b"/\xb0", b"/\xb1", b"", b"/a\x00"),
            ]
        ),
        st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1"]),
    ),
    st.binary(max_size=16).filter(lambda b: b"\r\n" not in b),
)

_HEADER_LINES = st.lists(
    st.one_of(
        st.sampled_from(_LINES),
        st.binary(max_size=12).filter(lambda b: b"\r\n" not in b),
    ),
    max_size=8,
)

_AFTER = st.sampled_from(
    [
        b"",
        b"hello",
        b"5\r\nhello\r\n0\r\n\r\n",
        b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n",
        b"hello" + b"GET /next HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n",
    ]
)


@st.composite
def _requests(draw: Any) -> bytes:
    if draw(st.booleans()):
        lines = draw(st.lists(st.sampled_from(_GOOD_LINES), max_size=6))
        requestLine = draw(_GOOD_REQUEST_LINES)
    else:
        lines = draw(_HEADER_LINES)
        requestLine = draw(_REQUEST_LINES)
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), b"Host: x")
    head = b"\r\n".join([requestLine, *lines]) + b"\r\n\r\n"
    data: bytes = draw(st.sampled_from([b"", b"\r\n"])) + head + draw(_AFTER)
    return data


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


_SETTINGS = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@_SETTINGS
@given(data=_requests(), cuts=st.lists(st.integers(0, 1 << 16), max_size=6))
def test_one_pass_matches_line_by_line_in_any_pieces(
    data: bytes, cuts: list[int]
) -> None:
    """
    A head in one read (the one-pass parser, where it applies), the same
    bytes in any pieces, and the line-by-line path in one read all end the
    same: the same bytes to the client, the same request seen, the same
    close.
    """
    whole = _outcome([data])
    assert _outcome([data], LineByLine) == whole
    assert _outcome(_split(data, cuts)) == whole
    assert _outcome(_split(data, cuts), LineByLine) == whole


def _status(out: bytes) -> int | None:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", out)
    return int(match.group(1)) if match else None


@_SETTINGS
@given(data=_requests())
def test_twisted_refusals_still_hold(data: bytes) -> None:
    """
    What Twisted's own channel refuses, ours refuses; what ours accepts,
    Twisted accepts, and the resource sees the same request line and
    headers.
    """
    ours_echo, theirs_echo = Echo(), Echo()
    ours, _ = _outcome([data], echo=ours_echo)
    theirs = _twisted(data, theirs_echo)
    if _status(theirs) == 400:
        assert _status(ours) in (400, 414, 431)
    if _status(ours) == 200:
        assert _status(theirs) == 200
        assert ours_echo.seen[0] == theirs_echo.seen[0]


# -- one test per check Twisted makes on a head, in one read and in pieces


@pytest.mark.parametrize(
    "head",
    [
        # _parseRequestLine: three parts, a token method, a target of bytes
        # 0x21 to 0xB0, HTTP/1.0 or HTTP/1.1.
        b"GET /x\r\nHost: x\r\n\r\n",
        b"GET  /x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x HTTP/1.1 x\r\nHost: x\r\n\r\n",
        b"G(T /x HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /\xb1 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /x HTTP/2.0\r\nHost: x\r\n\r\n",
        b"GET /x http/1.1\r\nHost: x\r\n\r\n",
        # A second stray CRLF before the request line.
        b"\r\n\r\nGET /x HTTP/1.1\r\nHost: x\r\n\r\n",
        # headerReceived: a colon, a token name, no NUL, CR or LF in a value.
        b"GET /x HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\n: b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX(A): b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: a\nb\r\n\r\n",
        # _maybeChooseTransferDecoder: Content-Length digits only, once;
        # not with Transfer-Encoding; no unknown coding.
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\nh",
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1 1\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        b"Content-Length: 1\r\n\r\nh",
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        b"Content-Length: 2\r\n\r\nhh",
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 1\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    ],
)
def test_twisted_head_checks_still_refuse(head: bytes) -> None:
    assert _status(_twisted(head)) == 400
    whole = _outcome([head])
    assert whole[0].startswith(b"HTTP/1.1 400 ")
    assert whole[0].count(b"HTTP/1.1 ") == 1
    assert whole[1]
    assert _outcome([bytes([b]) for b in head]) == whole


@pytest.mark.parametrize(
    ("head", "seen"),
    [
        # One stray CRLF before a request is tolerated.
        (b"\r\nGET /x HTTP/1.1\r\nHost: x\r\n\r\n", b"/x"),
        # Values lose the blanks around them; names take Twisted's case.
        (b"GET /x HTTP/1.1\r\nhOST: x\r\nx-a: \t a b \t\r\n\r\n", b"b'a b'"),
        (b"GET /x HTTP/1.1\r\nHost: x\r\ncontent-md5: m\r\n\r\n", b"Content-MD5"),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\n", b"(b'1', b'2')"),
        (b"GET /\xb0 HTTP/1.1\r\nHost: x\r\n\r\n", b"/\\xb0"),
        (
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 05\r\n\r\nhello",
            b"b'hello'",
        ),
    ],
)
def test_twisted_head_forms_still_accepted(head: bytes, seen: bytes) -> None:
    out, closed = _outcome([head])
    assert out.startswith(b"HTTP/1.1 200 ")
    assert seen in out
    assert not closed
    assert _outcome([bytes([b]) for b in head]) == (out, closed)
    assert _outcome([head], LineByLine) == (out, closed)


def test_expect_100_continue_once_the_head_is_in() -> None:
    head = (
        b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\n\r\n"
    )
    out, _ = _outcome([head])
    assert out == b"HTTP/1.1 100 Continue\r\n\r\n"
    out, _ = _outcome([head + b"hello"])
    assert out.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 ")
    out, _ = _outcome([head.replace(b"HTTP/1.1", b"HTTP/1.0")])
    assert out == b""


def test_pipelined_requests_in_one_read_are_each_answered() -> None:
    one = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
    two = b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi"
    out, closed = _outcome([one + two + one])
    assert out.count(b"HTTP/1.1 200 ") == 3
    assert b"/b" in out and b"b'hi'" in out
    assert not closed


def test_after_http_1_0_the_rest_is_dropped() -> None:
    out, closed = _outcome(
        [b"GET /a HTTP/1.0\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"]
    )
    assert out.startswith(b"HTTP/1.0 200 ")
    assert out.count(b" 200 OK") == 1
    assert closed


def test_the_one_pass_parser_takes_an_ordinary_head() -> None:
    """Not a test of behaviour: that the fast path runs at all."""
    calls: list[bool] = []

    class Counting(StreamingChannel):
        def _headInOnePass(self, data: bytes) -> bool:
            taken = StreamingChannel._headInOnePass(self, data)
            calls.append(taken)
            return taken

    out, _ = _outcome(
        [b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: b\r\n\r\n", b"GET /b HTTP/1.1\r\n"],
        Counting,
    )
    assert out.startswith(b"HTTP/1.1 200 ")
    assert calls == [True, False]
