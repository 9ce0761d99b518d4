"""
HTTP/2 request-body backpressure, in memory: a paused stream withholds its
WINDOW_UPDATEs, so only that stream's client stops, and nothing is lost.
"""

from __future__ import annotations

from typing import Any

from helpers import _connect, _exchange


def _send(client: Any, streamID: int, data: bytes, end: bool = False) -> None:
    """DATA in frames of at most 16 KiB."""
    for i in range(0, len(data), 16384):
        last = i + 16384 >= len(data)
        client.send_data(streamID, data[i : i + 16384], end_stream=end and last)


def test_a_paused_stream_withholds_its_window_and_loses_nothing() -> None:
    resource, protocol, transport, client = _connect()
    _exchange(protocol, transport, client)
    client.send_headers(
        1,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"a"),
            (b":path", b"/upload"),
            (b"content-length", b"100000"),
        ],
    )
    _send(client, 1, b"a" * 40000)
    _exchange(protocol, transport, client)
    [(request, length, receiver)] = resource.requests
    assert length == 100000
    assert b"".join(receiver.chunks) == b"a" * 40000
    # Handed on, so acknowledged (h2 sends WINDOW_UPDATE once half the
    # window is used): at most half a window is outstanding.
    before = client.local_flow_control_window(1)
    assert before > 65535 // 2

    request.transport.pauseProducing()  # as the exchange does when FAPI is full
    _send(client, 1, b"b" * 30000)
    _exchange(protocol, transport, client)
    assert b"".join(receiver.chunks) == b"a" * 40000
    # Held, not acknowledged: the client's window for this stream shrinks.
    assert client.local_flow_control_window(1) == before - 30000

    request.transport.resumeProducing()
    client.receive_data(transport.value())
    transport.clear()
    assert b"".join(receiver.chunks) == b"a" * 40000 + b"b" * 30000
    assert client.local_flow_control_window(1) > 65535 // 2
    _send(client, 1, b"c" * 30000, end=True)
    _exchange(protocol, transport, client)
    assert receiver.done
    assert len(b"".join(receiver.chunks)) == 100000


def test_a_paused_stream_does_not_stop_its_neighbours() -> None:
    resource, protocol, transport, client = _connect()
    _exchange(protocol, transport, client)
    for streamID in (1, 3):
        client.send_headers(
            streamID,
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":authority", b"a"),
                (b":path", b"/upload"),
            ],
        )
    _exchange(protocol, transport, client)
    (first, _, slow), (_, _, fast) = resource.requests
    first.transport.pauseProducing()
    _send(client, 1, b"x" * 60000)
    _send(client, 3, b"y" * 60000)
    _exchange(protocol, transport, client)
    assert slow.chunks == [] and b"".join(fast.chunks) == b"y" * 60000
    assert client.local_flow_control_window(1) == 65535 - 60000
    assert client.local_flow_control_window(3) > 65535 // 2
