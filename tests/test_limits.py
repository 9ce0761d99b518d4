"""Slow and oversized clients: deadlines that trickling cannot stretch, 414 and 431."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from conftest import connect_raw, parse_response, raw_request, reactor, within
from helpers import Recording
from twisted.internet import task
from twisted.internet.testing import MemoryReactorClock, StringTransport

from clerkproxy import build_site


def connect(
    clock: MemoryReactorClock, header: float = 10.0, idle: float = 60.0
) -> tuple[Any, StringTransport, Recording]:
    resource = Recording()
    site = build_site(resource, clock, header_timeout=header, idle_timeout=idle)
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    resource.timeouts = site.metrics.timeouts  # type: ignore[attr-defined]
    return protocol, transport, resource


def test_a_trickled_head_is_cut_off_at_the_header_deadline() -> None:
    clock = MemoryReactorClock()
    protocol, transport, resource = connect(clock)
    head = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Slow: aaaaaaaaaaaaaaaaaaaa"
    for byte in head:  # one byte every 0.3 s: Twisted's own timer never fires
        protocol.dataReceived(bytes([byte]))
        clock.advance(0.3)
        if transport.disconnecting:
            break
    assert transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.disconnecting
    assert resource.rendered == []
    assert 9.9 <= clock.seconds() <= 10.6
    assert resource.timeouts["header"] == 1  # type: ignore[attr-defined]


def test_a_silent_new_connection_is_closed_at_the_header_deadline() -> None:
    clock = MemoryReactorClock()
    _, transport, _ = connect(clock, header=2.0)
    clock.advance(1.9)
    assert not transport.disconnecting
    clock.advance(0.2)
    assert transport.disconnecting


def test_idle_keep_alive_connections_close_after_the_idle_timeout() -> None:
    clock = MemoryReactorClock()
    protocol, transport, resource = connect(clock, header=2.0, idle=5.0)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert resource.rendered
    clock.advance(4.0)  # well past the header deadline: idle is what counts now
    assert not transport.disconnecting
    protocol.dataReceived(b"GET /y HTTP/1.1\r\nHost: a\r\n\r\n")
    clock.advance(4.9)
    assert not transport.disconnecting and len(resource.rendered) == 2
    assert resource.timeouts["idle"] == 0  # type: ignore[attr-defined]
    clock.advance(0.2)
    assert transport.disconnecting
    assert b"408" not in transport.value()
    assert resource.timeouts == {  # type: ignore[attr-defined]
        "header": 0,
        "body": 0,
        "upstream": 0,
        "upstream_read": 0,
        "send": 0,
        "idle": 1,
    }


def test_a_second_request_gets_its_own_header_deadline() -> None:
    clock = MemoryReactorClock()
    protocol, transport, resource = connect(clock, header=2.0, idle=60.0)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    clock.advance(30)
    protocol.dataReceived(b"GET /y HTTP/1.1\r\n")
    clock.advance(2.1)
    assert transport.value().endswith(
        b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("target_size", "status"), [(16300, 200), (16500, 414), (70000, 414)]
)
def test_request_line_limit(target_size: int, status: int) -> None:
    clock = MemoryReactorClock()
    protocol, transport, resource = connect(clock)
    target = b"/x?" + b"a" * (target_size - 3)
    protocol.dataReceived(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 %d " % status)
    assert bool(resource.rendered) == (status == 200)


@pytest.mark.parametrize(("header_size", "status"), [(60000, 200), (66000, 431)])
def test_head_size_limit(header_size: int, status: int) -> None:
    clock = MemoryReactorClock()
    protocol, transport, resource = connect(clock)
    cookie = b"Cookie: " + b"c" * header_size + b"\r\n"
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n" + cookie + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 %d " % status)


def test_many_headers_adding_up_get_431() -> None:
    clock = MemoryReactorClock()
    protocol, transport, _ = connect(clock)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 1000 + b"\r\n")
    for _ in range(70):
        protocol.dataReceived(b"X-Pad: " + b"p" * 1000 + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 431 ")
    assert transport.disconnecting


@pytest_twisted.ensureDeferred
async def test_slowloris_clients_do_not_starve_normal_ones(
    make_proxy: Any, fapi: Any
) -> None:
    proxy = make_proxy(
        site_factory=lambda resource, clock: build_site(
            resource, clock, header_timeout=2.0
        )
    )
    slow = []
    for _ in range(1000):
        client = await connect_raw(proxy.port)
        client.transport.write(b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\n")
        slow.append(client)
    for _ in range(2):  # keep trickling: a header line every half second
        for client in slow:
            client.transport.write(b"X-A: b\r\n")
        for _ in range(10):
            data = await raw_request(
                proxy.port,
                b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
            assert parse_response(data)[0] == 200
        await task.deferLater(reactor, 0.5)
    closed = [await within(client.closed, 5) for client in slow]
    assert all(data.startswith(b"HTTP/1.1 408 ") for data in closed)
