"""
The proxy checks inbound HTTP/2 header blocks itself, in one pass, with
h2's own checks switched off.  Here every refusal is held against h2's
checks as the oracle: a block h2 would refuse ends the connection with
GOAWAY PROTOCOL_ERROR and reaches no resource; any other block does not end
the connection.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
from h2.errors import ErrorCodes
from h2.exceptions import ProtocolError
from h2.utilities import HeaderValidationFlags, validate_headers
from helpers import Streaming
from twisted.internet.testing import MemoryReactorClock, StringTransport

from clerkproxy import HTTP2Settings, build_site

Block = list[tuple[bytes, bytes]]

BASE: Block = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"a.test"),
    (b":path", b"/x"),
]

REQUESTS: list[Block] = [
    BASE,
    [*BASE, (b"x-ok", b"v"), (b"cookie", b"a=1"), (b"cookie", b"b=2")],
    [*BASE, (b"X-Upper", b"v")],
    [*BASE, (b"x y", b"v")],
    [*BASE, (b"x\x7f", b"v")],
    [*BASE, (b"x\xc3\xa9", b"v")],
    [*BASE, (b"x:y", b"v")],
    [*BASE, (b"", b"v")],
    [*BASE, (b"x(y", b"v")],
    [*BASE, (b"x-a", b" lead")],
    [*BASE, (b"x-a", b"trail\t")],
    [*BASE, (b"x-a", b"a\x00b")],
    [*BASE, (b"x-a", b"a\rb")],
    [*BASE, (b"x-a", b"a\nb")],
    [*BASE, (b"x-a", b"a\x01b")],
    [*BASE, (b"x-a", b"")],
    [*BASE, (b"te", b"gzip")],
    [*BASE, (b"te", b"trailers")],
    [*BASE, (b"te", b"Trailers")],
    [*BASE, (b"connection", b"close")],
    [*BASE, (b"keep-alive", b"1")],
    [*BASE, (b"proxy-connection", b"1")],
    [*BASE, (b"transfer-encoding", b"chunked")],
    [*BASE, (b"upgrade", b"h2c")],
    [*BASE, (b"x(y", b"v"), (b"te", b"gzip")],
    [*BASE, (b"x-a", b"a\x01b"), (b"connection", b"close")],
    [*BASE, (b"x(y", b"v"), (b"host", b"b.test"), (b"host", b"b.test")],
    [*BASE, (b":path", b"/y")],
    [*BASE, (b"x-a", b"v"), (b":foo", b"v")],
    [*BASE[:2], (b"x-a", b"v"), *BASE[2:]],
    [*BASE, (b":status", b"200")],
    [*BASE, (b":foo", b"v")],
    [*BASE, (b":protocol", b"websocket")],
    BASE[1:],
    [BASE[0], *BASE[2:]],
    BASE[:3],
    [*BASE[:3], (b":path", b"")],
    [*BASE[:2], BASE[3]],
    [*BASE[:2], BASE[3], (b"host", b"a.test")],
    [*BASE, (b"host", b"a.test")],
    [*BASE, (b"host", b"b.test")],
    [*BASE[:2], BASE[3], (b"host", b"a.test"), (b"host", b"a.test")],
    [(b":method", b"CONNECT"), (b":authority", b"a.test:443")],
    [(b":method", b"CONNECT"), (b":authority", b"a.test:443"), (b":path", b"/")],
    [(b":method", b"CONNECT"), (b":authority", b"a.test:443"), (b":scheme", b"h")],
    [*BASE, (b"content-length", b"0")],
]

TRAILERS: list[Block] = [
    [(b"x-t", b"v")],
    [(b"X-T", b"v")],
    [(b"x-t", b" v")],
    [(b"x-t", b"a\nb")],
    [(b":path", b"/")],
    [(b"te", b"gzip")],
    [(b"te", b"trailers")],
    [(b"connection", b"close")],
    [(b"x:t", b"v")],
]


def _h2_refuses(block: Block, trailer: bool = False) -> bool:
    flags = HeaderValidationFlags(
        is_client=False,
        is_trailer=trailer,
        is_response_header=False,
        is_push_promise=False,
    )
    try:
        list(validate_headers(block, flags))
    except ProtocolError:
        return True
    return False


def _run(blocks: list[tuple[Block, bool]]) -> tuple[Streaming, int | None]:
    """Send the blocks on stream 1; return the resource and any GOAWAY code."""
    resource = Streaming()
    site = build_site(resource, MemoryReactorClock(), http2=HTTP2Settings(h2c=True))
    protocol: Any = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    client.initiate_connection()
    for block, end in blocks:
        client.send_headers(1, block, end_stream=end)
    protocol.dataReceived(client.data_to_send())
    goaway = None
    for event in client.receive_data(transport.value()):
        if isinstance(event, h2.events.ConnectionTerminated):
            goaway = event.error_code
    return resource, goaway


@pytest.mark.parametrize("block", REQUESTS, ids=repr)
def test_a_request_block_is_refused_exactly_when_h2_would(block: Block) -> None:
    resource, goaway = _run([(block, True)])
    if _h2_refuses(block):
        assert goaway == ErrorCodes.PROTOCOL_ERROR
        assert resource.requests == []
    else:
        assert goaway is None


@pytest.mark.parametrize("block", TRAILERS, ids=repr)
def test_a_trailer_block_is_refused_exactly_when_h2_would(block: Block) -> None:
    post = [(b":method", b"POST"), *BASE[1:]]
    _, goaway = _run([(post, False), (block, True)])
    if _h2_refuses(block, trailer=True):
        assert goaway == ErrorCodes.PROTOCOL_ERROR
    else:
        assert goaway is None


def test_the_oracle_refuses_and_accepts() -> None:
    """The table holds both kinds, so neither branch above is vacuous."""
    verdicts = {_h2_refuses(block) for block in REQUESTS}
    assert verdicts == {True, False}
    assert {_h2_refuses(block, trailer=True) for block in TRAILERS} == {True, False}
