"""
One exchange driven entirely in memory: client bytes in through the real
streaming site, FAPI connections from a hand-driven pool.
"""

from __future__ import annotations

from typing import Any

from test_pool import RESPONSE, FakeEndpoint, serve_one
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from clerkproxy import FrontendAPIProxy, ProxyConfig, build_site
from clerkproxy._upstream import UpstreamPool

CONFIG = ProxyConfig(
    proxy_url="https://app.test/__clerk",
    secret_key="sk_live_memory",
    fapi_url="https://fapi.test",
    upstream_timeout=7.0,
)


class Rig:
    def __init__(self, **overrides: Any) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = FakeEndpoint()
        self.pool = UpstreamPool(self.clock, self.endpoint)
        config = ProxyConfig(
            **{
                **{
                    "proxy_url": CONFIG.proxy_url,
                    "secret_key": "sk_live_memory",
                    "fapi_url": CONFIG.fapi_url,
                    "upstream_timeout": 7.0,
                },
                **overrides,
            }
        )
        self.proxy = FrontendAPIProxy(config, self.clock, upstream=self.pool)
        self.site = build_site(self.proxy, self.clock)

    def client(self) -> tuple[Any, StringTransport]:
        protocol = self.site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport


def test_upload_pauses_the_client_while_fapi_is_full() -> None:
    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(
        b"POST /__clerk/v1/me HTTP/1.1\r\nHost: a\r\nContent-Length: 200000\r\n\r\n"
        + b"a" * 1000
    )
    upstream, upstream_transport = rig.endpoint.complete()
    assert b"POST /v1/me HTTP/1.1" in upstream_transport.value()
    assert upstream_transport.value().endswith(b"a" * 1000)
    body_producer = upstream_transport.producer
    assert body_producer is not None
    body_producer.pauseProducing()  # FAPI's socket is full
    assert client_transport.producerState == "paused"
    body_producer.resumeProducing()
    assert client_transport.producerState == "producing"


def test_body_bytes_wait_for_the_connection_with_the_client_paused() -> None:
    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(
        b"PUT /__clerk/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
        + b"b" * 70000
    )
    assert client_transport.producerState == "paused"  # held 64 KiB and stopped
    upstream, upstream_transport = rig.endpoint.complete()
    assert upstream_transport.value().endswith(b"b" * 70000)
    assert client_transport.producerState == "producing"
    client.dataReceived(b"b" * 30000)
    upstream.dataReceived(RESPONSE)
    assert client_transport.value().endswith(b"ok")


def test_a_stale_connection_is_retried_once_for_a_bodiless_get() -> None:
    rig = Rig()
    rig.pool.acquire()
    stale, stale_transport = rig.endpoint.complete()
    serve_one(stale, stale_transport)
    client, client_transport = rig.client()
    client.dataReceived(b"GET /__clerk/v1/environment HTTP/1.1\r\nHost: a\r\n\r\n")
    assert b"GET /v1/environment" in stale_transport.value()
    stale.connectionLost(Failure(ConnectionDone()))  # FAPI had closed it
    assert len(rig.endpoint.attempts) == 2
    fresh, fresh_transport = rig.endpoint.complete()
    assert b"GET /v1/environment" in fresh_transport.value()
    fresh.dataReceived(RESPONSE)
    assert client_transport.value().startswith(b"HTTP/1.1 200 OK")


def test_a_post_on_a_stale_connection_is_not_replayed() -> None:
    rig = Rig()
    rig.pool.acquire()
    stale, stale_transport = rig.endpoint.complete()
    serve_one(stale, stale_transport)
    client, client_transport = rig.client()
    client.dataReceived(
        b"POST /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    )
    stale.connectionLost(Failure(ConnectionDone()))
    assert len(rig.endpoint.attempts) == 1
    assert client_transport.value().startswith(b"HTTP/1.1 502 ")


def test_a_fresh_connection_failing_is_not_retried() -> None:
    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(b"GET /__clerk/v1/environment HTTP/1.1\r\nHost: a\r\n\r\n")
    fresh, _ = rig.endpoint.complete()
    fresh.connectionLost(Failure(ConnectionDone()))
    assert len(rig.endpoint.attempts) == 1
    assert client_transport.value().startswith(b"HTTP/1.1 502 ")


def test_the_upstream_timeout_covers_waiting_for_a_connection() -> None:
    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(b"GET /__clerk/v1/environment HTTP/1.1\r\nHost: a\r\n\r\n")
    rig.clock.advance(6.9)
    assert client_transport.value() == b""
    rig.clock.advance(0.2)
    assert client_transport.value().startswith(b"HTTP/1.1 504 ")
    assert b"proxy_upstream_timeout" in client_transport.value()


def test_the_timer_stops_once_fapi_answers() -> None:
    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(b"GET /__clerk/v1/environment HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, _ = rig.endpoint.complete()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    rig.clock.advance(59)  # past the upstream timeout, within the read one
    upstream.dataReceived(b"world")
    out = client_transport.value()
    assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"helloworld")


def test_a_prompt_answer_after_the_client_left_keeps_the_connection() -> None:
    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, upstream_transport = rig.endpoint.complete()
    client.connectionLost(Failure(ConnectionDone()))
    assert not upstream_transport.disconnecting  # FAPI gets a moment to answer
    upstream.dataReceived(RESPONSE)
    assert rig.pool.idleConnections == 1 and not upstream_transport.disconnecting
    assert client_transport.value() == b""


def test_a_slow_answer_after_the_client_left_is_cut_off() -> None:
    rig = Rig()
    client, _ = rig.client()
    client.dataReceived(b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, upstream_transport = rig.endpoint.complete()
    client.connectionLost(Failure(ConnectionDone()))
    rig.clock.advance(2.1)
    assert upstream_transport.disconnecting
    assert rig.pool.idleConnections == 0


def test_a_big_answer_after_the_client_left_is_cut_off() -> None:
    rig = Rig()
    client, _ = rig.client()
    client.dataReceived(b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, upstream_transport = rig.endpoint.complete()
    client.connectionLost(Failure(ConnectionDone()))
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
    upstream.dataReceived(b"x" * 300000)
    assert upstream_transport.disconnecting


def test_a_client_leaving_mid_upload_ends_the_upstream_request() -> None:
    rig = Rig()
    client, _ = rig.client()
    client.dataReceived(
        b"POST /__clerk/v1/me HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"
    )
    upstream, upstream_transport = rig.endpoint.complete()
    client.connectionLost(Failure(ConnectionDone()))
    assert upstream_transport.disconnecting
    assert rig.pool.idleConnections == 0


def test_a_finished_exchange_leaves_no_reference_cycle() -> None:
    """
    Cycles would be freed by the cyclic collector instead of by reference
    counting; its full passes showed up as tail latency under load.
    """
    import gc

    from clerkproxy._exchange import Exchange
    from clerkproxy._request import StreamingRequest

    rig = Rig()
    client, client_transport = rig.client()
    upstream = None
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for body in (b"", b"abc"):
            framing = b"Content-Length: %d\r\n" % len(body) if body else b""
            method = b"POST" if body else b"GET"
            client.dataReceived(
                method
                + b" /__clerk/v1/x HTTP/1.1\r\nHost: a\r\n"
                + framing
                + b"\r\n"
                + body
            )
            if upstream is None:
                upstream, _ = rig.endpoint.complete()
            upstream.dataReceived(RESPONSE)
            assert client_transport.value().endswith(b"ok")
            client_transport.clear()
        gc.collect()
        leaked = [o for o in gc.garbage if isinstance(o, Exchange | StreamingRequest)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert leaked == []
