"""
Ending a response stream: END_STREAM rides on the DATA frame that completes
the body's content-length, with no empty DATA frame after it; without a
content-length the stream ends only when the response finishes.
"""

from __future__ import annotations

from typing import Any

import h2.events
from helpers import _connect, _exchange

REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":authority", b"a"),
    (b":path", b"/x"),
]


def _events(protocol: object, transport: object, client: object) -> list[object]:
    events = client.receive_data(transport.value())  # type: ignore[attr-defined]
    transport.clear()  # type: ignore[attr-defined]
    return list(events)


def _started(headers: list[tuple[bytes, bytes]]) -> tuple[Any, Any, Any, Any]:
    """A connection with one request (no body) handed to the resource."""
    resource, protocol, transport, client = _connect()
    _exchange(protocol, transport, client)
    client.send_headers(1, headers, end_stream=True)
    _exchange(protocol, transport, client)
    [(request, _, _)] = resource.requests
    return request, protocol, transport, client


def test_the_last_byte_by_content_length_ends_the_stream() -> None:
    request, protocol, transport, client = _started(REQUEST)
    request.setHeader(b"content-length", b"10")
    request.write(b"hello")
    events = _events(protocol, transport, client)
    assert not any(isinstance(e, h2.events.StreamEnded) for e in events)
    request.write(b"world")
    events = _events(protocol, transport, client)
    [data] = [e for e in events if isinstance(e, h2.events.DataReceived)]
    assert data.data == b"world" and data.stream_ended is not None
    request.finish()
    # Nothing more: no empty DATA frame, no reset.
    assert transport.value() == b""
    assert request.finished


def test_without_content_length_the_stream_ends_at_finish() -> None:
    request, protocol, transport, client = _started(REQUEST)
    request.write(b"hello")
    events = _events(protocol, transport, client)
    assert not any(isinstance(e, h2.events.StreamEnded) for e in events)
    request.finish()
    events = _events(protocol, transport, client)
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)


def test_a_head_response_ends_at_finish_whatever_its_content_length() -> None:
    request, protocol, transport, client = _started(
        [(b":method", b"HEAD"), *REQUEST[1:]]
    )
    request.setHeader(b"content-length", b"5")
    request.write(b"hello")
    events = _events(protocol, transport, client)
    assert not any(isinstance(e, h2.events.DataReceived) for e in events)
    assert not any(isinstance(e, h2.events.StreamEnded) for e in events)
    request.finish()
    events = _events(protocol, transport, client)
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
