"""FAPI's responses read from bytes alone: no transport, pool or clock."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from clerkproxy._reader import Event, ResponseReader, UpstreamProtocolError

OK_HEAD = b"HTTP/1.1 200 OK\r\n"


def read(
    response: bytes, isHead: bool = False, splits: list[int] | None = None
) -> list[tuple[Any, ...]]:
    """
    Feed C{response} in pieces cut at C{splits} and return the events as
    comparable tuples, with the body's data events joined into one, and
    whether any bytes came after the end.
    """
    reader = ResponseReader()
    reader.start(isHead)
    cuts = sorted({c for c in splits or () if 0 < c < len(response)})
    pieces = [
        response[a:b] for a, b in zip([0, *cuts], [*cuts, len(response)], strict=True)
    ]
    events: list[tuple[Any, ...]] = []
    body = b""
    for n, piece in enumerate(pieces):
        reader.feed(piece)
        while True:
            try:
                event = reader.next()
            except UpstreamProtocolError as e:
                events.append(("error", str(e)))
                return events
            if event is Event.NEED_DATA:
                break
            if event is Event.DATA:
                assert reader.data, "empty data events are noise"
                body += reader.data
            elif event is Event.HEAD:
                h: Any = reader.head
                events.append(
                    (
                        "head",
                        h.code,
                        h.phrase,
                        h.headers,
                        h.connection,
                        h.length,
                        h.bodyless,
                        h.keepAlive,
                    )
                )
            else:
                events.append(("body", body))
                # Extra bytes in the same read are the reader's to report;
                # in a later one, the connection's (it is idle by then).
                later = any(pieces[n + 1 :])
                events.append(("end", reader.leftover or later))
                return events
    if reader.eof():
        events.append(("body", body))
        events.append(("end-at-close",))
    else:
        events.append(("incomplete", body))
    return events


def final(events: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    return events[-1]


# -- heads ----------------------------------------------------------------------


def test_a_head_is_split_into_relayed_and_connection_fields() -> None:
    events = read(
        b"HTTP/1.1 201 Created\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n"
        b"content-length: 5\r\nX-Y:  z \t\r\nConnection: keep-alive\r\n\r\nhello"
    )
    head = events[0]
    assert head[1:3] == (201, b"Created")
    assert head[3] == {b"Set-Cookie": [b"a=1", b"b=2"], b"X-Y": [b"z"]}
    assert head[4] == {b"Content-Length": [b"5"], b"Connection": [b"keep-alive"]}
    assert head[5:] == (5, False, True)
    assert events[1:] == [("body", b"hello"), ("end", False)]


def test_a_status_line_without_a_phrase() -> None:
    events = read(b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n")
    assert events[0][1:3] == (200, b"")


def test_interim_answers_are_skipped_and_101_refused() -> None:
    events = read(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        + OK_HEAD
        + b"Content-Length: 2\r\n\r\nok"
    )
    assert [e[0] for e in events] == ["head", "body", "end"]
    assert events[0][1] == 200 and events[0][3] == {}
    assert final(read(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"))[0] == "error"


@pytest.mark.parametrize(
    ("version", "connection", "keepAlive"),
    [
        (b"1.1", b"", True),
        (b"1.1", b"Connection: close\r\n", False),
        (b"1.1", b"Connection: x, Close\r\n", False),
        (b"1.0", b"", False),
        (b"1.0", b"Connection: Keep-Alive\r\n", True),
    ],
)
def test_keep_alive(version: bytes, connection: bytes, keepAlive: bool) -> None:
    events = read(
        b"HTTP/" + version + b" 200 OK\r\n" + connection + b"Content-Length: 0\r\n\r\n"
    )
    assert events[0][7] is keepAlive


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/2 200 OK",
        b"HTTP/1.2 200 OK",
        b"http/1.1 200 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 099 Low",
        b"HTTP/1.1  200 OK",
        b"HTTP/1.1 200 O\x00K",
        b"\r\nHTTP/1.1 200 OK",
        b"HTTP/1.1 200 OK\r\nBad Header: x",
        b"HTTP/1.1 200 OK\r\nX : y",
        b"HTTP/1.1 200 OK\r\n: y",
        b"HTTP/1.1 200 OK\r\nNoColon",
        b"HTTP/1.1 200 OK\r\nX: a\nInjected: b",
        b"HTTP/1.1 200 OK\r\nX: a\rInjected: b",
        b"HTTP/1.1 200 OK\r\nX: a\x00b",
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded",
        b"HTTP/1.1 200 OK\r\nX: a\r\n\tfolded",
        b"HTTP/1.1 200 OK\r\nX\xff: y",
    ],
)
def test_malformed_heads_are_refused(head: bytes) -> None:
    assert final(read(head + b"\r\n\r\n"))[0] == "error"


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 5\r\nContent-Length: 6",
        b"Content-Length: 5, 6",
        b"Content-Length: -1",
        b"Content-Length: +1",
        b"Content-Length: 0x10",
        b"Content-Length: 1 0",
        b"Content-Length: ",
        b"Content-Length: 12345678901234567890",
        b"Transfer-Encoding: gzip",
        b"Transfer-Encoding: gzip, chunked",
        b"Transfer-Encoding: chunked, gzip",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
        b"Transfer-Encoding: identity",
        b"Transfer-Encoding: ",
    ],
)
def test_incoherent_framing_is_refused(framing: bytes) -> None:
    assert final(read(OK_HEAD + framing + b"\r\n\r\n0\r\n\r\n"))[0] == "error"


def test_transfer_encoding_is_refused_from_http_1_0() -> None:
    response = b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert final(read(response))[0] == "error"


def test_repeated_equal_content_lengths_are_one() -> None:
    events = read(OK_HEAD + b"Content-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok")
    assert events[0][5] == 2 and events[1] == ("body", b"ok")


def test_chunked_wins_over_content_length_and_ends_the_connection() -> None:
    events = read(
        OK_HEAD
        + b"Content-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    assert events[0][5] is None and events[0][7] is False
    assert events[1:] == [("body", b"ok"), ("end", False)]


def test_the_head_limit() -> None:
    filler = b"X: " + b"a" * 1000 + b"\r\n"
    under = OK_HEAD + filler * 60 + b"Content-Length: 0\r\n\r\n"
    assert final(read(under)) == ("end", False)
    over = OK_HEAD + filler * 70 + b"Content-Length: 0\r\n\r\n"
    assert final(read(over))[0] == "error"  # complete, in one read
    assert final(read(over, splits=list(range(0, len(over), 999))))[0] == "error"
    endless = OK_HEAD + filler * 70
    assert final(read(endless))[0] == "error"  # no end in sight


# -- bodies -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response", "isHead"),
    [
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 7\r\n\r\n", False),
        (b"HTTP/1.1 304 Not Modified\r\n\r\n", False),
        (OK_HEAD + b"Content-Length: 1234\r\n\r\n", True),
        (OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", True),
        (OK_HEAD + b"\r\n", True),
        (OK_HEAD + b"Content-Length: 0\r\n\r\n", False),
    ],
)
def test_bodiless_answers(response: bytes, isHead: bool) -> None:
    events = read(response, isHead=isHead)
    assert events[0][6] is True  # bodyless
    assert events[1:] == [("body", b""), ("end", False)]
    # Bytes after them are leftovers, exactly as after any other answer.
    assert final(read(response + b"HTTP/1.1", isHead=isHead)) == ("end", True)


def test_a_head_answer_keeps_its_content_length_for_the_client() -> None:
    events = read(OK_HEAD + b"Content-Length: 1234\r\n\r\n", isHead=True)
    assert events[0][3] == {b"Content-Length": [b"1234"]} and events[0][5] is None


def test_bytes_beyond_a_content_length_are_leftovers() -> None:
    events = read(OK_HEAD + b"Content-Length: 2\r\n\r\nokEXTRA")
    assert events[1:] == [("body", b"ok"), ("end", True)]


def test_a_body_until_close() -> None:
    events = read(OK_HEAD + b"X: y\r\n\r\nsome bytes", splits=[3, 30])
    assert events[0][5:] == (None, False, False)
    assert events[1:] == [("body", b"some bytes"), ("end-at-close",)]


def test_a_short_body_is_incomplete_at_close() -> None:
    events = read(OK_HEAD + b"Content-Length: 10\r\n\r\nabc")
    assert final(events) == ("incomplete", b"abc")
    chunked = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    assert final(read(chunked)) == ("incomplete", b"abc")


def test_a_whole_read_of_body_is_passed_on_without_a_copy() -> None:
    reader = ResponseReader()
    reader.start(False)
    reader.feed(OK_HEAD + b"Content-Length: 10000\r\n\r\nab")
    assert reader.next() is Event.HEAD and reader.next() is Event.DATA
    assert reader.next() is Event.NEED_DATA
    chunk = b"x" * 5000
    reader.feed(chunk)
    assert reader.next() is Event.DATA and reader.data is chunk


def test_the_reader_serves_one_response_after_another() -> None:
    reader = ResponseReader()
    for n in range(3):
        reader.start(False)
        reader.feed(OK_HEAD + b"Content-Length: 1\r\n\r\n%d" % n)
        assert [reader.next() for _ in range(3)] == [Event.HEAD, Event.DATA, Event.END]
        assert reader.data == b"%d" % n and not reader.leftover


def test_a_broken_reader_stays_broken() -> None:
    reader = ResponseReader()
    reader.start(False)
    reader.feed(b"nonsense\r\n\r\n")
    with pytest.raises(UpstreamProtocolError):
        reader.next()
    with pytest.raises(UpstreamProtocolError):
        reader.next()


# -- chunked ----------------------------------------------------------------------

CHUNKED = OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n"


def test_chunk_extensions_and_trailers_are_dropped() -> None:
    events = read(
        CHUNKED + b"5;ext=1\r\nhello\r\n1 ; a=b\r\n \r\n5\r\nworld\r\n"
        b"0\r\nX-Trailer: t\r\nY: u\r\n\r\n"
    )
    assert events[1:] == [("body", b"hello world"), ("end", False)]


@pytest.mark.parametrize(
    "chunks",
    [
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"+5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"5_0\r\nhello\r\n0\r\n\r\n",
        b"\r\nhello\r\n0\r\n\r\n",
        b"g\r\n",
        b"\xd9\xa1\r\nh\r\n0\r\n\r\n",  # a non-ASCII digit
        b"10000000000000005\r\nhello\r\n",  # 17 digits, 5 if wrapped to 64 bits
        b"0" * 28 + b"5\r\nhello\r\n",
        b"2\r\nabX\r\n0\r\n\r\n",
        b"2\r\nab\n0\r\n\r\n",
        b"2\r\nab\r\r\n0\r\n\r\n",
        b"2\r\nab",
    ],
)
def test_malformed_chunks_are_refused(chunks: bytes) -> None:
    last = final(read(CHUNKED + chunks))
    assert last[0] == "error" or last == ("incomplete", b"ab")
    if not chunks.endswith(b"ab"):
        assert last[0] == "error"


def test_sixteen_hex_digits_are_allowed() -> None:
    events = read(CHUNKED + b"0000000000000005\r\nhello\r\n0\r\n\r\n")
    assert events[1:] == [("body", b"hello"), ("end", False)]


def test_chunk_line_and_trailer_limits() -> None:
    long_ext = b"5;" + b"e" * 4095 + b"\r\nhello\r\n0\r\n\r\n"
    assert final(read(CHUNKED + long_ext))[0] == "error"
    fits = b"5;" + b"e" * 4094 + b"\r\nhello\r\n0\r\n\r\n"
    assert final(read(CHUNKED + fits)) == ("end", False)
    endless = b"5;" + b"e" * 5000
    assert final(read(CHUNKED + endless))[0] == "error"
    trailers = b"0\r\n" + b"T: " + b"t" * 4000 + b"\r\n"
    assert final(read(CHUNKED + trailers * 20 + b"\r\n"))[0] == "error"


def test_bytes_after_the_last_chunk_are_leftovers() -> None:
    assert final(read(CHUNKED + b"0\r\n\r\nHTTP")) == ("end", True)


# -- any split of the input gives the same events ----------------------------------

splits = st.lists(st.integers(0, 20000), max_size=40)


def chunked_body(body: bytes, sizes: list[int], extensions: bool) -> bytes:
    out, rest, i = [], body, 0
    while rest:
        n = sizes[i % len(sizes)]
        ext = b";n=%d" % i if extensions and i % 2 else b""
        out.append(b"%x%s\r\n%s\r\n" % (len(rest[:n]), ext, rest[:n]))
        rest, i = rest[n:], i + 1
    return b"".join(out) + b"0\r\n\r\n"


@given(
    body=st.binary(max_size=3000),
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=8),
    extensions=st.booleans(),
    trailer=st.sampled_from([b"", b"X-T: 1\r\n", b"A: b\r\nC: d\r\n"]),
    cuts=splits,
)
def test_chunked_bodies_round_trip_in_any_reads(
    body: bytes, sizes: list[int], extensions: bool, trailer: bytes, cuts: list[int]
) -> None:
    encoded = chunked_body(body, sizes, extensions)
    encoded = encoded[:-2] + trailer + b"\r\n"
    response = CHUNKED + encoded
    events = read(response, splits=cuts)
    assert events[1:] == [("body", body), ("end", False)]
    assert events == read(response)


@given(
    interim=st.lists(
        st.sampled_from(
            [
                b"HTTP/1.1 100 Continue\r\n\r\n",
                b"HTTP/1.1 103 Hints\r\nLink: <a>\r\n\r\n",
            ]
        ),
        max_size=3,
    ),
    names=st.lists(
        st.from_regex(rb"\A[A-Za-z][A-Za-z0-9\-]{0,20}\Z"), min_size=0, max_size=8
    ),
    values=st.lists(st.from_regex(rb"\A[ -~]{0,40}\Z"), min_size=8, max_size=8),
    body=st.binary(max_size=500),
    extra=st.binary(max_size=20),
    cuts=splits,
)
def test_heads_give_the_same_events_in_any_reads(
    interim: list[bytes],
    names: list[bytes],
    values: list[bytes],
    body: bytes,
    extra: bytes,
    cuts: list[int],
) -> None:
    fields = b"".join(
        b"X-%s: %s\r\n" % (name, value)
        for name, value in zip(names, values, strict=False)
    )
    response = (
        b"".join(interim)
        + OK_HEAD
        + fields
        + b"Content-Length: %d\r\n\r\n" % len(body)
        + body
        + extra
    )
    whole = read(response)
    assert whole == read(response, splits=cuts)
    assert whole[1:] == [("body", body), ("end", bool(extra))]
    relayed = whole[0][3]
    assert sum(len(v) for v in relayed.values()) == len(names)
    for name, value in zip(names, values, strict=False):
        canonical = b"-".join(p.capitalize() for p in (b"x-" + name).split(b"-"))
        assert value.strip(b" \t") in relayed[canonical]


@given(
    garbage=st.binary(min_size=1, max_size=300),
    cuts=splits,
)
def test_any_bytes_give_the_same_outcome_in_any_reads(
    garbage: bytes, cuts: list[int]
) -> None:
    for response in (garbage, OK_HEAD + garbage, CHUNKED + garbage):
        assert read(response) == read(response, splits=cuts)


# -- the field lines checked at once ------------------------------------------

_NAME = st.lists(
    st.sampled_from([b"a", b"Z", b"-", b"!", b"0", b" ", b"(", b"\x80", b"\x00"]),
    max_size=4,
).map(b"".join)
_VALUE = st.lists(
    st.sampled_from(
        [b"v", b" ", b"\t", b":", b"\x00", b"\r", b"\n", b"\x7f", b"\x01", b"\xff"]
    ),
    max_size=4,
).map(b"".join)
_FIELD_LINE = st.tuples(_NAME, st.sampled_from([b":", b"", b";"]), _VALUE).map(b"".join)


def _per_line_verdict(lines: list[bytes]) -> bool:
    """The rules _parseHead states line by line: a token, a colon, and a
    value with no NUL, CR or LF."""
    import re

    token = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not token.match(name) or re.search(rb"[\x00\r\n]", value):
            return False
    return True


@settings(max_examples=500)
@given(st.lists(_FIELD_LINE, min_size=1, max_size=4))
@example([b"a:\x00"])
@example([b"a: v", b"b:\x00v"])
@example([b"a:\rv"])
@example([b"a:v\n"])
@example([b"a v:1"])
@example([b"a"])
@example([b"a:1", b""])
@example([b"\x80:1"])
@example([b"Set-Cookie: a=b", b"X-Y:"])
def test_field_block_accepts_what_the_line_checks_accept(lines: list[bytes]) -> None:
    """The one pattern over all field lines agrees with the checks line by
    line on every head, and a head the pattern refuses gets the per-line
    error, never a parsed answer."""
    from clerkproxy._reader import _FIELD_BLOCK, _parseHead

    head = b"HTTP/1.1 200 OK\r\n" + b"\r\n".join(lines)
    # Split as the reader does: a CRLF inside a "line" starts another line.
    real = head.split(b"\r\n")[1:]
    verdict = _per_line_verdict(real)
    assert (_FIELD_BLOCK(head, len(b"HTTP/1.1 200 OK\r\n")) is not None) == verdict
    if verdict:
        parsed = _parseHead(head + b"\r\nContent-Length: 0", False)
        assert parsed is not None
    else:
        with pytest.raises(UpstreamProtocolError):
            _parseHead(head, False)
