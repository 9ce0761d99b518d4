"""The in-memory fakes users test against."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock, StringTransport

from clerkproxy import ProxyConfig, build_site
from clerkproxy.testing import MemoryFrontendAPI, RecordingFrontendAPI

CONFIG = ProxyConfig(proxy_url="https://app.test/__clerk", secret_key="sk_live_memory")


def test_a_request_round_trips_in_memory() -> None:
    clock = MemoryReactorClock()
    fapi = RecordingFrontendAPI()
    fapi.status = 201
    fapi.headers.append((b"Set-Cookie", b"__client=1"))
    fapi.headers.append((b"Set-Cookie", b"__client_uat=2"))
    fapi.body = b'{"ok":true}'
    memory = MemoryFrontendAPI(fapi, clock)
    site = build_site(memory.proxy(CONFIG), clock)
    client = site.buildProtocol(None)
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(
        b"POST /__clerk/v1/client?x=1 HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert fapi.requests == []  # nothing moves until the test says so
    memory.flush()
    [seen] = fapi.requests
    assert (seen.method, seen.uri, seen.body) == (b"POST", b"/v1/client?x=1", b"abc")
    assert seen.headers.getRawHeaders(b"Clerk-Secret-Key") == [b"sk_live_memory"]
    assert seen.headers.getRawHeaders(b"Clerk-Proxy-Url") == [
        b"https://app.test/__clerk"
    ]
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 201 Created")
    assert out.count(b"Set-Cookie:") == 2
    assert out.endswith(b'{"ok":true}')


def test_connections_are_pooled_in_memory_too() -> None:
    clock = MemoryReactorClock()
    memory = MemoryFrontendAPI(RecordingFrontendAPI(), clock)
    site = build_site(memory.proxy(CONFIG), clock)
    for _ in range(3):
        client = site.buildProtocol(None)
        transport = StringTransport()
        client.makeConnection(transport)
        client.dataReceived(b"GET /__clerk/v1/environment HTTP/1.1\r\nHost: a\r\n\r\n")
        memory.flush()
        assert transport.value().startswith(b"HTTP/1.1 200 OK")
    assert memory.connectionsOpened == 1


def test_a_streaming_site_built_directly_serves_its_first_connection() -> None:
    """StreamingSite(resource) works without build_site or configure."""
    from clerkproxy import StreamingSite

    clock = MemoryReactorClock()
    memory = MemoryFrontendAPI(RecordingFrontendAPI(), clock)
    site = StreamingSite(memory.proxy(CONFIG), reactor=clock)
    client = site.buildProtocol(None)
    transport = StringTransport()
    client.makeConnection(transport)
    assert len(site.channels) == 1
    client.dataReceived(b"GET /__clerk/v1/environment HTTP/1.1\r\nHost: a\r\n\r\n")
    memory.flush()
    assert transport.value().startswith(b"HTTP/1.1 200 OK")
    assert site.metrics.inFlight == 0
    # The default header deadline (10 s) applies to the next request.
    client.dataReceived(b"GET /__clerk/v1/environment HTTP/1.1\r\n")
    clock.advance(10)
    assert b"408 Request Timeout" in transport.value()


def test_closing_the_proxy_closes_its_pool() -> None:
    clock = MemoryReactorClock()
    memory = MemoryFrontendAPI(RecordingFrontendAPI(), clock)
    proxy = memory.proxy(CONFIG)
    site = build_site(proxy, clock)
    client = site.buildProtocol(None)
    transport = StringTransport()
    client.makeConnection(transport)
    client.dataReceived(b"GET /__clerk/v1/environment HTTP/1.1\r\nHost: a\r\n\r\n")
    memory.flush()
    assert memory.connectionsOpened == 1
    closed = proxy.close()
    memory.flush()
    assert closed.called
    assert proxy.upstream.take() is None  # a closed pool hands out nothing
