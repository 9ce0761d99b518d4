"""
One exchange driven entirely in memory: client bytes in through the real
streaming site, FAPI connections from a hand-driven pool.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import RESPONSE, FakeEndpoint, serve_one
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionAborted, ConnectionDone
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


#: A request whose body is larger than the exchange's hold (64 KiB), so
#: that it streams; the tests send its first 70,000 bytes at once.
BIG_POST = b"POST /__clerk/v1/me HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"


class Rig:
    def __init__(self, poolSize: int = 256, **overrides: Any) -> None:
        self.clock = MemoryReactorClock()
        self.endpoint = FakeEndpoint()
        self.pool = UpstreamPool(self.clock, self.endpoint, maxConnections=poolSize)
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
        + b"a" * 70000  # more than the hold: the body streams
    )
    upstream, upstream_transport = rig.endpoint.complete()
    assert b"POST /v1/me HTTP/1.1" in upstream_transport.value()
    assert upstream_transport.value().endswith(b"a" * 70000)
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
    client.dataReceived(BIG_POST + b"x" * 70000)
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


# -- phases -----------------------------------------------------------------


def record_phases(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    from clerkproxy._exchange import Exchange, Phase

    seen: list[str] = []
    enter = Exchange._enter

    def recording(self: Exchange, phase: Phase) -> None:
        enter(self, phase)
        seen.append(phase.value)

    monkeypatch.setattr(Exchange, "_enter", recording)
    return seen


def test_a_get_walks_connecting_awaiting_relaying_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = record_phases(monkeypatch)
    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, _ = rig.endpoint.complete()
    upstream.dataReceived(RESPONSE)
    assert client_transport.value().endswith(b"ok")
    assert seen == ["awaiting", "relaying", "done"]


def test_a_small_upload_walks_receiving_connecting_awaiting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from clerkproxy._exchange import Phase

    seen = record_phases(monkeypatch)
    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(
        b"POST /__clerk/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nabc"
    )
    assert seen == [] and rig.endpoint.attempts == []  # still RECEIVING
    client.dataReceived(b"def")
    assert seen == ["connecting"]
    upstream, upstream_transport = rig.endpoint.complete()
    assert upstream_transport.value().endswith(b"\r\n\r\nabcdef")
    upstream.dataReceived(RESPONSE)
    assert seen == ["connecting", "awaiting", "relaying", "done"]
    assert Phase.RECEIVING.value == "receiving"


def test_a_large_upload_walks_through_sending(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = record_phases(monkeypatch)
    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(BIG_POST + b"a" * 70000)
    assert seen == ["connecting"]
    upstream, upstream_transport = rig.endpoint.complete()
    assert seen == ["connecting", "sending"]
    client.dataReceived(b"b" * 30000)
    assert upstream_transport.value().endswith(b"a" * 70000 + b"b" * 30000)
    upstream.dataReceived(RESPONSE)
    assert seen == ["connecting", "sending", "awaiting", "relaying", "done"]


def test_a_client_leaving_while_fapi_thinks_orphans_the_exchange(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = record_phases(monkeypatch)
    rig = Rig()
    client, _ = rig.client()
    client.dataReceived(b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream, _ = rig.endpoint.complete()
    client.connectionLost(Failure(ConnectionDone()))
    upstream.dataReceived(RESPONSE)
    assert seen == ["awaiting", "orphaned", "done"]


def test_a_transition_not_in_the_table_is_refused() -> None:
    from clerkproxy._exchange import Exchange, Phase

    exchange = Exchange.__new__(Exchange)
    exchange._phase = Phase.DONE
    with pytest.raises(AssertionError, match="RELAYING"):
        exchange._enter(Phase.RELAYING)
    exchange._phase = Phase.RELAYING
    with pytest.raises(AssertionError):
        exchange._enter(Phase.CONNECTING)


# -- deadlines ----------------------------------------------------------------


GET = b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\n\r\n"


def test_the_504_comes_exactly_at_the_upstream_timeout() -> None:
    """
    One timer serves every exchange, yet each gets its own exact deadline,
    also when the timer was set for an exchange that has since gone.
    """
    rig = Rig()
    first, first_transport = rig.client()
    first.dataReceived(GET)  # at 0; answered at 1, so the timer's item goes
    upstream, _ = rig.endpoint.complete()
    rig.clock.advance(1.0)
    upstream.dataReceived(RESPONSE)
    clients = []
    for start in (1.25, 3.5, 3.55):
        rig.clock.advance(start - rig.clock.seconds())
        client, transport = rig.client()
        client.dataReceived(GET)
        clients.append((start, transport))
    for start, transport in clients:
        rig.clock.advance(start + 7.0 - 0.001 - rig.clock.seconds())
        assert transport.value() == b""
        rig.clock.advance(0.001)
        assert transport.value().startswith(b"HTTP/1.1 504 "), start
    assert rig.proxy.metrics.timeouts["upstream"] == 3
    assert rig.proxy.metrics.upstreamErrors == {"timeout": 3}


def test_a_stalled_body_gets_a_408_and_fapi_hears_no_more() -> None:
    rig = Rig(upstream_timeout=100.0)
    client, client_transport = rig.client()
    client.dataReceived(BIG_POST + b"x" * 70000)
    upstream, upstream_transport = rig.endpoint.complete()
    rig.clock.advance(29.0)
    client.dataReceived(b"d")  # progress: the body deadline starts again
    rig.clock.advance(29.0)
    assert client_transport.value() == b""
    rig.clock.advance(1.0)
    out = client_transport.value()
    assert out.startswith(b"HTTP/1.1 408 ")
    assert b"proxy_body_timeout" in out and b"Connection: close" in out
    assert upstream_transport.disconnecting  # aborted, never pooled half-sent
    assert rig.pool.idleConnections == 0
    assert rig.proxy.metrics.timeouts["body"] == 1
    assert rig.proxy.metrics.upstreamErrors == {}


def test_a_stalled_small_body_gets_a_408_and_fapi_hears_nothing() -> None:
    rig = Rig(upstream_timeout=100.0, body_timeout=5.0)
    client, client_transport = rig.client()
    client.dataReceived(
        b"POST /__clerk/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"
    )
    rig.clock.advance(5.0)
    assert client_transport.value().startswith(b"HTTP/1.1 408 ")
    assert rig.endpoint.attempts == []  # no connection was ever taken
    assert rig.proxy.metrics.timeouts["body"] == 1


def test_a_stalled_body_while_connecting_gets_no_408() -> None:
    # The hold is full and the client paused by us: the wait is for the
    # pool and FAPI, so the upstream deadline covers it, not the body one.
    rig = Rig(upstream_timeout=7.0, body_timeout=5.0)
    client, client_transport = rig.client()
    client.dataReceived(BIG_POST + b"x" * 70000)
    rig.clock.advance(6.9)
    assert client_transport.value() == b""
    rig.clock.advance(0.1)
    assert client_transport.value().startswith(b"HTTP/1.1 504 ")
    # The request that asked for it is gone: the connection goes unused.
    upstream, upstream_transport = rig.endpoint.complete()
    assert upstream_transport.value() == b""


def test_the_body_deadline_stops_while_fapi_holds_the_upload_back() -> None:
    rig = Rig(upstream_timeout=100.0, body_timeout=5.0)
    client, client_transport = rig.client()
    client.dataReceived(BIG_POST + b"x" * 70000)
    upstream, upstream_transport = rig.endpoint.complete()
    upstream_transport.producer.pauseProducing()  # FAPI's socket is full
    rig.clock.advance(50.0)
    assert client_transport.value() == b""
    upstream_transport.producer.resumeProducing()
    rig.clock.advance(4.9)
    assert client_transport.value() == b""
    rig.clock.advance(0.1)
    assert client_transport.value().startswith(b"HTTP/1.1 408 ")


def test_the_body_deadline_stops_while_the_hold_is_full() -> None:
    rig = Rig(upstream_timeout=100.0, body_timeout=5.0)
    client, client_transport = rig.client()
    client.dataReceived(
        b"PUT /__clerk/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
        + b"b" * 70000
    )
    assert client_transport.producerState == "paused"
    rig.clock.advance(50.0)
    assert client_transport.value() == b""
    upstream, upstream_transport = rig.endpoint.complete()
    assert client_transport.producerState == "producing"
    rig.clock.advance(5.0)
    assert client_transport.value().startswith(b"HTTP/1.1 408 ")


def test_fapi_answering_early_ends_the_upload() -> None:
    rig = Rig(upstream_timeout=100.0, body_timeout=5.0)
    client, client_transport = rig.client()
    client.dataReceived(BIG_POST + b"x" * 70000)
    upstream, upstream_transport = rig.endpoint.complete()
    upstream.dataReceived(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n")
    client.dataReceived(b"def")  # no longer relayed
    assert upstream_transport.value().endswith(b"x" * 70000)
    rig.clock.advance(50.0)  # no body deadline: nothing more is awaited
    upstream.dataReceived(b"no")
    out = client_transport.value()
    assert out.startswith(b"HTTP/1.1 401 ") and out.endswith(b"no")
    assert b"Connection: close" in out
    assert rig.pool.idleConnections == 0  # FAPI still expects body bytes


def test_a_silent_fapi_body_is_cut_at_the_read_deadline() -> None:
    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(GET)
    upstream, upstream_transport = rig.endpoint.complete()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    rig.clock.advance(59.0)
    upstream.dataReceived(b"wo")  # progress
    rig.clock.advance(59.0)
    assert not client_transport.disconnecting
    rig.clock.advance(1.0)
    assert client_transport.disconnected  # aborted: the truncation shows
    assert upstream_transport.disconnecting
    assert client_transport.value().endswith(b"hellowo")
    assert rig.pool.idleConnections == 0
    assert rig.proxy.metrics.timeouts["upstream_read"] == 1
    assert rig.proxy.metrics.upstreamErrors == {"timeout": 1}
    upstream.dataReceived(b"rld")  # too late: goes nowhere
    assert client_transport.value().endswith(b"hellowo")


def test_fapi_held_back_for_a_slow_client_is_not_a_read_timeout() -> None:
    rig = Rig(upstream_read_timeout=60.0, send_timeout=300.0)
    client, client_transport = rig.client()
    client.dataReceived(GET)
    upstream, upstream_transport = rig.endpoint.complete()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    channel = client_transport.producer
    channel.pauseProducing()  # the client's socket is full
    assert upstream_transport.producerState == "paused"
    rig.clock.advance(200.0)
    assert not client_transport.disconnecting
    channel.resumeProducing()
    assert upstream_transport.producerState == "producing"
    rig.clock.advance(59.0)
    assert not client_transport.disconnecting
    rig.clock.advance(1.0)
    assert client_transport.disconnected
    assert rig.proxy.metrics.timeouts["upstream_read"] == 1
    assert rig.proxy.metrics.timeouts["send"] == 0


class SlowSocket(FileDescriptor):
    """A client's socket that takes only the bytes the test lets through."""

    def __init__(self, reactor: Any) -> None:
        FileDescriptor.__init__(self, reactor)
        self.connected = True
        self.allowance = 0
        self.taken = b""
        self.aborted = False

    def writeSomeData(self, data: bytes) -> int:
        n = min(len(data), self.allowance)
        self.allowance -= n
        self.taken += bytes(data[:n])
        return n

    def drain(self, n: int) -> None:
        self.allowance += n
        self.doWrite()

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True

    def getPeer(self) -> IPv4Address:
        return IPv4Address("TCP", "192.0.2.7", 50000)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", 8080)


def slow_client(rig: Rig) -> tuple[Any, SlowSocket, Any, StringTransport]:
    """A client that reads slowly, mid-way through a 1 MB answer."""
    client = rig.site.buildProtocol(None)
    socket = SlowSocket(rig.clock)
    client.makeConnection(socket)
    client.dataReceived(GET)
    upstream, upstream_transport = rig.endpoint.complete()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
    upstream.dataReceived(b"x" * 200000)
    assert upstream_transport.producerState == "paused"  # the client is full
    return client, socket, upstream, upstream_transport


def test_a_client_that_takes_nothing_is_cut_at_the_send_deadline() -> None:
    from twisted.logger import globalLogPublisher

    rig = Rig()
    client, socket, upstream, upstream_transport = slow_client(rig)
    rig.clock.advance(59.9)
    assert not socket.aborted
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        rig.clock.advance(0.1)
        # Both sockets then report their end, as real ones would.
        upstream.connectionLost(Failure(ConnectionAborted()))
        socket.connectionLost(Failure(ConnectionAborted()))
        client.connectionLost(Failure(ConnectionAborted()))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e for e in events if e.get("log_failure") or e.get("isError")] == []
    assert [e.get("log_format") for e in events] == []
    assert socket.aborted
    assert upstream_transport.disconnecting
    assert rig.pool.idleConnections == 0
    assert rig.proxy.metrics.timeouts == {
        "header": 0,
        "body": 0,
        "upstream": 0,
        "upstream_read": 0,
        "send": 1,
        "idle": 0,
    }
    assert rig.proxy.metrics.upstreamErrors == {}
    assert scraped_timeouts(rig) == {
        "header": 0.0,
        "body": 0.0,
        "upstream": 0.0,
        "upstream_read": 0.0,
        "send": 1.0,
        "idle": 0.0,
    }


def scraped_timeouts(rig: Rig) -> dict[str, float]:
    """clerkproxy_timeouts_total as /metrics shows it."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from clerkproxy._metrics import MetricsCollector

    registry = CollectorRegistry()
    registry.register(MetricsCollector(rig.proxy.metrics))
    text = generate_latest(registry).decode()
    return {
        sample.labels["phase"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "clerkproxy_timeouts_total"
    }


def test_a_client_that_takes_a_little_gets_another_period() -> None:
    rig = Rig()
    client, socket, upstream, upstream_transport = slow_client(rig)
    for _ in range(3):
        rig.clock.advance(30.0)
        socket.drain(1)  # one byte every 30 s
        rig.clock.advance(30.0)
        assert not socket.aborted
    rig.clock.advance(60.0)  # then nothing for a whole period (and more)
    rig.clock.advance(60.0)
    assert socket.aborted
    assert rig.proxy.metrics.timeouts["send"] == 1


def test_a_client_that_catches_up_resumes_fapi() -> None:
    rig = Rig()
    client, socket, upstream, upstream_transport = slow_client(rig)
    rig.clock.advance(50.0)
    socket.drain(10**7)  # everything: Twisted resumes the relay
    assert upstream_transport.producerState == "producing"
    rig.clock.advance(50.0)  # no send deadline now; the read one restarted
    assert not socket.aborted
    upstream.dataReceived(b"x" * 800000)
    socket.drain(10**7)
    assert socket.taken.endswith(b"x" * 1000)
    assert not socket.aborted
    assert rig.pool.idleConnections == 1
    assert sum(rig.proxy.metrics.timeouts.values()) == 0


def test_a_client_leaving_mid_relay_leaves_no_reference_cycle() -> None:
    """
    The request cannot unregister its producer once the connection is
    gone; the exchange drops that reference itself.
    """
    import gc

    from clerkproxy._exchange import Exchange
    from clerkproxy._request import StreamingRequest

    rig = Rig()
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        client, socket, upstream, _ = slow_client(rig)
        socket.connectionLost(Failure(ConnectionDone()))  # as a TCP socket does
        client.connectionLost(Failure(ConnectionDone()))
        rig.clock.removeAll()
        del client, socket, upstream
        gc.collect()
        leaked = [o for o in gc.garbage if isinstance(o, Exchange | StreamingRequest)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert leaked == []


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (
            b"https://fapi.test/v1/oauth_callback?a=1",
            b"https://app.test/__clerk/v1/oauth_callback?a=1",
        ),
        (b"https://accounts.example.com/x", b"https://accounts.example.com/x"),
        (b"/v1/client", b"/v1/client"),
    ],
)
def test_a_redirect_into_fapi_comes_back_through_the_proxy(
    location: bytes, expected: bytes
) -> None:
    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(GET)
    upstream, _ = rig.endpoint.complete()
    upstream.dataReceived(
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: "
        + location
        + b"\r\nContent-Length: 0\r\n\r\n"
    )
    assert b"\r\nLocation: " + expected + b"\r\n" in client_transport.value()


def test_a_pipelined_answer_to_a_full_client_starts_paused() -> None:
    """
    The first answer fills the client's socket and ends; the second, for a
    request pipelined behind it, must not pile up in memory: Twisted does
    not pause a producer registered while the socket is full.
    """
    rig = Rig()
    client = rig.site.buildProtocol(None)
    socket = SlowSocket(rig.clock)
    client.makeConnection(socket)
    client.dataReceived(GET + GET)
    upstream, upstream_transport = rig.endpoint.complete()
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
    upstream.dataReceived(b"x" * 100000)  # all of it, into the socket's buffer
    assert upstream_transport.producerState == "producing"  # back in the pool
    # The pipelined request went out on the same connection.
    assert upstream_transport.value().count(b"GET /v1/client") == 2
    upstream.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
    assert upstream_transport.producerState == "paused"
    rig.clock.advance(60.0)
    assert socket.aborted
    assert rig.proxy.metrics.timeouts["send"] == 1


# -- the hold: a request body takes no connection until it is whole -----------


def test_a_trickled_small_body_takes_no_connection_and_no_upstream_deadline() -> None:
    rig = Rig(upstream_timeout=7.0, body_timeout=30.0)
    client, client_transport = rig.client()
    client.dataReceived(
        b"POST /__clerk/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc"
    )
    for byte in b"defghi":
        rig.clock.advance(20.0)  # within the body deadline, far past upstream's
        client.dataReceived(bytes([byte]))
    assert rig.clock.seconds() == 120.0
    assert client_transport.value() == b""
    assert rig.endpoint.attempts == []  # no slot held while the client sends
    assert rig.pool.counts() == dict.fromkeys(
        ("connecting", "busy", "relaying", "idle", "queued"), 0
    )
    client.dataReceived(b"j")  # the body is complete: now FAPI's turn
    assert len(rig.endpoint.attempts) == 1
    rig.clock.advance(6.9)
    assert client_transport.value() == b""
    rig.clock.advance(0.1)  # the upstream deadline started with the connect
    assert client_transport.value().startswith(b"HTTP/1.1 504 ")
    assert rig.proxy.metrics.timeouts["upstream"] == 1
    assert rig.proxy.metrics.timeouts["body"] == 0


def test_a_whole_small_body_goes_to_fapi_in_one_write(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    writes: list[bytes] = []
    write = StringTransport.write

    def recording(self: StringTransport, data: bytes) -> None:
        writes.append(data)
        write(self, data)

    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(
        b"POST /__clerk/v1/x HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nabc"
    )
    client.dataReceived(b"def")
    monkeypatch.setattr(StringTransport, "write", recording)
    upstream, upstream_transport = rig.endpoint.complete()
    [request] = writes
    assert request.startswith(b"POST /v1/x HTTP/1.1\r\n")
    assert request.endswith(b"Content-Length: 6\r\n\r\nabcdef")
    assert upstream_transport.producer is None  # nothing left to stream
    monkeypatch.undo()
    upstream.dataReceived(RESPONSE)
    assert client_transport.value().endswith(b"ok")
    assert rig.pool.idleConnections == 1


def test_a_whole_small_chunked_body_goes_in_one_write_still_chunked() -> None:
    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(
        b"POST /__clerk/v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n"
    )
    assert rig.endpoint.attempts == []
    client.dataReceived(b"3\r\ndef\r\n0\r\n\r\n")
    upstream, upstream_transport = rig.endpoint.complete()
    assert upstream_transport.value().endswith(
        b"Transfer-Encoding: chunked\r\n\r\n6\r\nabcdef\r\n0\r\n\r\n"
    )
    upstream.dataReceived(RESPONSE)
    assert client_transport.value().endswith(b"ok")


def test_an_empty_chunked_body_ends_in_the_same_write() -> None:
    rig = Rig()
    client, client_transport = rig.client()
    client.dataReceived(
        b"POST /__clerk/v1/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\n"
    )
    upstream, upstream_transport = rig.endpoint.complete()
    assert upstream_transport.value().endswith(
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    )


def test_the_upstream_deadline_starts_when_the_hold_fills() -> None:
    rig = Rig(upstream_timeout=7.0, body_timeout=30.0)
    client, client_transport = rig.client()
    client.dataReceived(BIG_POST + b"x" * 30000)
    rig.clock.advance(20.0)
    assert rig.endpoint.attempts == []
    client.dataReceived(b"x" * 40000)  # past 64 KiB: connect, pause the client
    assert len(rig.endpoint.attempts) == 1
    assert client_transport.producerState == "paused"
    rig.clock.advance(6.9)
    assert client_transport.value() == b""
    rig.clock.advance(0.1)
    assert client_transport.value().startswith(b"HTTP/1.1 504 ")


def test_a_streamed_upload_leaves_the_pools_cap() -> None:
    rig = Rig(poolSize=1)
    uploader, _ = rig.client()
    uploader.dataReceived(BIG_POST + b"x" * 70000)
    upload, _ = rig.endpoint.complete()
    # The client paces the rest of the body: the connection left the cap ...
    assert rig.pool.relayingConnections == 1 and rig.pool.busyConnections == 0
    # ... so an ordinary request gets a connection of its own at once.
    client, client_transport = rig.client()
    client.dataReceived(GET)
    assert len(rig.endpoint.attempts) == 2  # a new attempt, started at once
    upstream, _ = rig.endpoint.complete()
    upstream.dataReceived(RESPONSE)
    assert client_transport.value().endswith(b"ok")
    # The upload ends cleanly: its connection goes back only if the cap
    # allows (the ordinary one is idle already, so it is closed).
    uploader.dataReceived(b"x" * 30000)
    upload.dataReceived(RESPONSE)
    assert rig.pool.relayingConnections == 0 and rig.pool.idleConnections == 1


def test_a_slowly_streamed_upload_is_paced_by_the_body_deadline_only() -> None:
    rig = Rig(upstream_timeout=7.0, body_timeout=30.0)
    client, client_transport = rig.client()
    client.dataReceived(BIG_POST + b"x" * 70000)
    upstream, upstream_transport = rig.endpoint.complete()
    for _ in range(29):
        rig.clock.advance(20.0)  # a byte every 20 s: slow, but moving
        client.dataReceived(b"x" * 1000)
    assert client_transport.value() == b""
    client.dataReceived(b"x" * 1000)  # the body is complete: FAPI's turn
    assert upstream_transport.value().endswith(b"x" * 1000)
    rig.clock.advance(6.9)
    assert client_transport.value() == b""
    rig.clock.advance(0.1)
    assert client_transport.value().startswith(b"HTTP/1.1 504 ")
    assert rig.proxy.metrics.timeouts["body"] == 0


def test_fapi_holding_a_streamed_upload_back_is_on_the_upstream_deadline() -> None:
    rig = Rig(upstream_timeout=7.0, body_timeout=30.0)
    client, client_transport = rig.client()
    client.dataReceived(BIG_POST + b"x" * 70000)
    upstream, upstream_transport = rig.endpoint.complete()
    rig.clock.advance(20.0)  # the client's turn: no upstream deadline
    upstream_transport.producer.pauseProducing()  # FAPI stops reading
    assert client_transport.producerState == "paused"
    rig.clock.advance(6.9)
    upstream_transport.producer.resumeProducing()  # ... and reads again
    rig.clock.advance(20.0)
    upstream_transport.producer.pauseProducing()
    rig.clock.advance(6.9)
    assert client_transport.value() == b""
    rig.clock.advance(0.1)
    assert client_transport.value().startswith(b"HTTP/1.1 504 ")
    assert upstream_transport.disconnecting
