"""
Framing and fidelity at the client edge: chunk sizes, Host, folded lines,
control bytes, header names the proxy never forwards, and response headers
the proxy never adds.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from conftest import connect_raw, parse_response, raw_request, within
from helpers import Receiver, Recording, connect
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport

from clerkproxy import build_site

# -- chunk sizes -------------------------------------------------------------


class Limited(Recording):
    """Streams bodies with a body limit, like the proxy's resources do."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.lost: list[Any] = []

    def renderStreaming(self, request: Any, length: int | None) -> Receiver | None:
        request.maxBodySize = self.limit
        receiver = super().renderStreaming(request, length)
        request.watchConnection(lambda: self.lost.append(request))
        return receiver


CHUNKED = b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    "size",
    [
        b"10000000000000005",  # 17 digits: 5 to a parser that wraps at 2**64
        b"1" + b"0" * 27,  # 28 digits
        b"00000000000000005",  # 17 digits, however small the number
    ],
)
def test_chunk_sizes_over_16_digits_are_refused(size: bytes) -> None:
    resource = Limited(1 << 60)
    protocol, transport = connect(resource)
    protocol.dataReceived(CHUNKED + size + b"\r\nhello\r\n0\r\n\r\n" + SMUGGLED)
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 400 ")
    assert out.count(b"HTTP/1.1") == 1
    assert b"Connection: close" in out
    assert transport.disconnecting
    [(_, _, receiver)] = resource.streamed
    assert receiver.chunks == [] and not receiver.done
    # Whatever started upstream for this request was told at once.
    assert len(resource.lost) == 1
    assert resource.rendered == []


def test_the_refusal_comes_before_the_size_line_ends() -> None:
    resource = Limited(1 << 60)
    protocol, transport = connect(resource)
    protocol.dataReceived(CHUNKED + b"1" * 17)
    assert transport.value().startswith(b"HTTP/1.1 400 ")


def test_sixteen_digits_are_still_a_chunk_size() -> None:
    resource = Limited(1 << 20)
    protocol, transport = connect(resource)
    protocol.dataReceived(CHUNKED + b"0000000000000005\r\nhello\r\n0\r\n\r\n")
    [(_, _, receiver)] = resource.streamed
    assert receiver.chunks == [b"hello"] and receiver.done
    assert transport.value() == b""


@pytest.mark.parametrize(
    ("chunks", "refused"),
    [
        ([b"10"], False),  # exactly the limit
        ([b"11"], True),
        ([b"8", b"9"], True),  # the second size takes the total past it
        ([b"ffffffffffffffff"], True),
    ],
)
def test_chunk_sizes_past_the_body_limit_get_413(
    chunks: list[bytes], refused: bool
) -> None:
    resource = Limited(16)
    protocol, transport = connect(resource)
    protocol.dataReceived(CHUNKED)
    [(_, _, receiver)] = resource.streamed
    for size in chunks:
        protocol.dataReceived(size + b"\r\n")
        if transport.value():
            break
        protocol.dataReceived(b"a" * int(size, 16) + b"\r\n")
    if refused:
        assert transport.value().startswith(b"HTTP/1.1 413 ")
        assert transport.disconnecting
        assert sum(map(len, receiver.chunks)) <= 16
        protocol.dataReceived(b"a" * 100 + b"\r\n0\r\n\r\n" + SMUGGLED)
        assert resource.rendered == []
    else:
        assert transport.value() == b""
        protocol.dataReceived(b"0\r\n\r\n")
        assert receiver.done


@given(size=st.integers(min_value=0, max_value=2**128), digits=st.integers(0, 40))
def test_any_chunk_size_is_read_exactly_or_refused(size: int, digits: int) -> None:
    text = b"%x" % size
    text = b"0" * max(0, digits - len(text)) + text
    resource = Limited(1 << 20)
    protocol, transport = connect(resource)
    protocol.dataReceived(CHUNKED + text + b"\r\n")
    out = transport.value()
    if len(text) > 16:
        assert out.startswith(b"HTTP/1.1 400 ")
    elif size > 1 << 20:
        assert out.startswith(b"HTTP/1.1 413 ")
    else:
        assert out == b""


@pytest_twisted.ensureDeferred
async def test_a_wrapping_chunk_size_reaches_nothing_upstream(
    proxy: Any, fapi: Any
) -> None:
    # A request first, so that the next one takes a warm pooled connection
    # and its head is written at once.
    warm = await raw_request(
        proxy.port,
        b"GET /__clerk/v1/warm HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert parse_response(warm)[0] == 200
    data = await raw_request(
        proxy.port,
        b"POST /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"10000000000000005\r\nhello\r\n0\r\n\r\n"
        b"GET /__clerk/v1/smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    status, _, body = parse_response(data)
    assert status == 400 and b"proxy_bad_request" in body
    assert data.count(b"HTTP/1.1 ") == 1
    assert [seen["uri"] for seen in fapi.seen] == ["/v1/warm"]


@pytest_twisted.ensureDeferred
async def test_a_chunk_size_past_max_body_size_gets_413(
    make_proxy: Any, fapi: Any
) -> None:
    proxy = make_proxy(max_body_size=1000)
    client = await connect_raw(proxy.port)
    # The size alone says too much: no need to wait for the data (or for
    # the upstream timeout, 5 s here).
    client.transport.write(
        b"POST /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3e9\r\nabc"
    )
    data = await within(client.closed, 3)
    status, _, body = parse_response(data)
    assert status == 413 and b"proxy_request_too_large" in body
    assert fapi.seen == []


# -- Host --------------------------------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"GET /x HTTP/1.1\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /x HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: evil/x?y\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a, b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a b\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: a@b\r\n\r\n",
    ],
)
def test_missing_repeated_or_malformed_host_is_refused(head: bytes) -> None:
    resource = Recording()
    protocol, transport = connect(resource)
    protocol.dataReceived(head)
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert transport.disconnecting
    assert resource.rendered == [] and resource.streamed == []


@pytest.mark.parametrize(
    "head",
    [
        b"GET /x HTTP/1.0\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: app.example.com\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: app.example.com:8443\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: 192.0.2.1:80\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: my_host\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: \r\n\r\n",
    ],
)
def test_one_valid_host_is_accepted(head: bytes) -> None:
    resource = Recording()
    protocol, transport = connect(resource)
    protocol.dataReceived(head)
    assert transport.value()[8:13] == b" 200 "


# -- folded lines and control bytes -------------------------------------------


@pytest.mark.parametrize(
    "head",
    [
        b"X-A: a\r\n b\r\n",
        b"X-A: a\r\n\tb\r\n",
        b"Transfer-Encoding:\r\n chunked\r\n",
        b"Transfer-Encoding: chunked\r\n \r\n",
        b"X-A: a\x01b\r\n",
        b"X-A: a\x7fb\r\n",
        b"X-A: \x1b[31m\r\n",
        b"X-A: a\x0bb\r\n",
    ],
)
def test_folds_and_control_bytes_are_refused(head: bytes) -> None:
    resource = Recording()
    protocol, transport = connect(resource)
    protocol.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert transport.disconnecting
    assert resource.rendered == [] and resource.streamed == []


@given(
    value=st.binary(min_size=1, max_size=20).filter(
        lambda v: b"\r" not in v and b"\n" not in v
    )
)
def test_header_values_with_any_control_byte_but_tab_are_refused(
    value: bytes,
) -> None:
    resource = Recording()
    protocol, transport = connect(resource)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: x\r\nX-V: " + value + b"\r\n\r\n")
    controls = set(range(0x20)) - {0x09} | {0x7F}
    refused = transport.value().startswith(b"HTTP/1.1 400 ")
    assert refused == any(byte in controls for byte in value)


def test_tab_and_obs_text_are_allowed() -> None:
    resource = Recording()
    protocol, transport = connect(resource)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: x\r\nX-V: a\tb\xe9\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")


@pytest.mark.parametrize(("lines", "status"), [(100, 200), (101, 431)])
def test_more_than_100_header_lines_get_431(lines: int, status: int) -> None:
    resource = Recording()
    protocol, transport = connect(resource)
    head = b"GET /x HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * (lines - 1)
    protocol.dataReceived(head + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 %d " % status)


@pytest.mark.parametrize(
    ("line", "head", "status"),
    [
        (4096, 8192, 200),
        (4097, 8192, 414),
        (100, 8192, 200),
    ],
)
def test_limits_come_from_the_site(line: int, head: int, status: int) -> None:
    site = build_site(
        Recording(), MemoryReactorClock(), max_request_line=4096, max_header_size=8192
    )
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    target = b"/" + b"a" * (line - len(b"GET / HTTP/1.1"))
    request = b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n"
    pad = head - len(request) - len(b"X-P: \r\n") - 2
    protocol.dataReceived(request + b"X-P: " + b"p" * pad + b"\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 %d " % status)
    if status == 200:
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(request + b"X-P: " + b"p" * (pad + 1) + b"\r\n\r\n")
        assert transport.value().startswith(b"HTTP/1.1 431 ")


# -- what reaches FAPI, what comes back ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_header_names_with_underscores_are_never_forwarded(
    proxy: Any, fapi: Any
) -> None:
    data = await raw_request(
        proxy.port,
        b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nClerk_Secret_Key: sk_live_mine\r\n"
        b"X_Forwarded_For: 6.6.6.6\r\nX-Kept: yes\r\nConnection: close\r\n\r\n",
    )
    assert parse_response(data)[0] == 200
    names = [name.lower() for name, _ in fapi.seen[-1]["headers"]]
    assert "x-kept" in names
    assert not [name for name in names if "_" in name]
    assert fapi.header("Clerk-Secret-Key") != ["sk_live_mine"]


@pytest_twisted.ensureDeferred
async def test_no_content_type_is_added_to_an_answer_without_one(
    proxy: Any, fapi: Any
) -> None:
    client = await connect_raw(proxy.port)
    client.transport.write(
        b"GET /__clerk/no-content-type HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    data = await within(client.closed)
    status, headers, body = parse_response(data)
    assert status == 200 and body == b"untyped"
    assert b"content-type" not in [name for name, _ in headers]
    # And one that has its own keeps it as it was.
    data = await raw_request(
        proxy.port,
        b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert (b"content-type", b"application/json") in parse_response(data)[1]
