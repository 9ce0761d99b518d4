"""
Bodies in motion: backpressure both ways, limits, disconnects, truncation,
and the proxy's own errors, over real loopback sockets.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted
from conftest import SECRET, connect_raw, parse_response, raw_request, reactor, within
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.logger import globalLogPublisher

from clerkproxy._upstream import fapi_endpoint


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds)


def buffered(transport: Any) -> int:
    """Bytes a Twisted transport holds in user space, waiting to be sent."""
    pending = len(transport.dataBuffer) - transport.offset
    return pending + sum(len(chunk) for chunk in transport._tempDataBuffer)


class TrackingSite:
    """Wraps build_site to remember the server-side protocols it builds."""

    def __init__(self) -> None:
        self.protocols: list[Any] = []

    def __call__(self, resource: Any, clock: Any) -> Any:
        from clerkproxy import build_site

        site = build_site(resource, clock)
        original = site.buildProtocol

        def buildProtocol(addr: Any) -> Any:
            protocol = original(addr)
            self.protocols.append(protocol)
            return protocol

        site.buildProtocol = buildProtocol  # type: ignore[method-assign]
        return site


class WatchingEndpoint:
    """Remembers the connections an endpoint makes."""

    def __init__(self, endpoint: Any) -> None:
        self._endpoint = endpoint
        self.connections: list[Any] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        def made(protocol: Any) -> Any:
            self.connections.append(protocol)
            return protocol

        d: Deferred[Any] = self._endpoint.connect(factory)
        return d.addCallback(made)


@pytest_twisted.ensureDeferred
async def test_slow_reader_pauses_fapi_and_memory_stays_bounded(
    make_proxy: Any, fapi: Any, ca: Any
) -> None:
    from conftest import trust_root

    tracking = TrackingSite()
    watching = WatchingEndpoint(
        fapi_endpoint(reactor, "localhost", fapi.port.getHost().port, trust_root(ca), 5)
    )
    proxy = make_proxy(site_factory=tracking, endpoint=watching)
    size = 128 * 1024 * 1024
    client = await connect_raw(proxy.port)
    client.transport.pauseProducing()  # a client that reads nothing
    client.transport.write(
        f"GET /__clerk/big/{size} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode()
    )
    await sleep(2.0)
    [server] = tracking.protocols
    [stream] = fapi.recorder.streams
    produced = size - stream["left"]
    # FAPI was made to wait: what left it fits in socket buffers, not the
    # body (a proxy without backpressure drains it at loopback speed) ...
    assert 0 < produced < 48 * 1024 * 1024, produced
    assert stream["paused"]
    # ... and the proxy itself holds a bounded amount for this client.
    assert buffered(server.transport) < 512 * 1024
    [upstream] = watching.connections
    assert proxy.resource.upstream.relayingConnections == 1  # outside the cap
    assert buffered(upstream.transport.transport) < 512 * 1024
    # Reading again drains everything, byte-exact.
    client.transport.resumeProducing()
    data = await within(client.closed, 60)
    status, headers, body = parse_response(data)
    assert status == 200 and len(body) == size and set(body[-10:]) == {ord("z")}
    assert dict(headers)[b"content-length"] == str(size).encode()


@pytest_twisted.ensureDeferred
async def test_upload_reaches_fapi_before_the_client_finishes(
    proxy: Any, fapi: Any
) -> None:
    first = b"a" * 70000
    rest = b"b" * 30000
    client = await connect_raw(proxy.port)
    client.transport.write(
        b"POST /__clerk/v1/me/profile_image HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        b"Content-Type: application/octet-stream\r\n"
        b"Content-Length: %d\r\n\r\n" % (len(first) + len(rest)) + first
    )
    await sleep(0)  # let the stand-in set up its recorder
    while fapi.recorder.firstBodyBytes is None:
        await sleep(0.01)
    got = await within(fapi.recorder.firstBodyBytes)
    assert got and set(got) == {ord("a")}
    assert client.received == b""  # the client has not finished sending
    client.transport.write(rest)
    status, _, body = parse_response(await within(client.closed))
    assert status == 200
    assert json.loads(body)["body_length"] == len(first) + len(rest)


@pytest_twisted.ensureDeferred
async def test_chunked_upload_streams_as_chunked(proxy: Any, fapi: Any) -> None:
    first = b"a" * 70000  # more than the exchange holds: the body streams
    client = await connect_raw(proxy.port)
    client.transport.write(
        b"POST /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(first), first)
    )
    for _ in range(500):
        if fapi.recorder.firstBodyBytes is not None:
            break
        await sleep(0.01)
    got = await within(fapi.recorder.firstBodyBytes)
    assert got and set(got) == {ord("a")}
    client.transport.write(b"6\r\n world\r\n0\r\n\r\n")
    status, _, body = parse_response(await within(client.closed))
    assert status == 200
    assert fapi.seen[-1]["body_length"] == len(first) + 6
    assert fapi.header("Transfer-Encoding") == ["chunked"]


@pytest_twisted.ensureDeferred
async def test_a_small_chunked_body_goes_whole_and_chunked(
    proxy: Any, fapi: Any
) -> None:
    client = await connect_raw(proxy.port)
    client.transport.write(
        b"POST /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
    )
    await sleep(0.2)
    assert fapi.seen == [] and fapi.recorder.connections == 0  # held, no slot
    client.transport.write(b"6\r\n world\r\n0\r\n\r\n")
    status, _, body = parse_response(await within(client.closed))
    assert status == 200
    assert fapi.seen[-1]["body"] == "hello world"
    assert fapi.header("Transfer-Encoding") == ["chunked"]


@pytest_twisted.ensureDeferred
async def test_declared_oversize_body_gets_413_before_fapi(
    make_proxy: Any, fapi: Any
) -> None:
    proxy = make_proxy(max_body_size=1000)
    data = await raw_request(
        proxy.port,
        b"POST /__clerk/v1/me HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 1001\r\n\r\n",
    )
    status, headers, body = parse_response(data)
    assert status == 413
    assert json.loads(body)["errors"][0]["code"] == "proxy_request_too_large"
    assert b"100 Continue" not in data
    assert fapi.seen == [] and fapi.recorder.connections == 0


@pytest_twisted.ensureDeferred
async def test_chunked_body_crossing_the_limit_is_cut_off(
    make_proxy: Any, fapi: Any
) -> None:
    proxy = make_proxy(max_body_size=1000)
    client = await connect_raw(proxy.port)
    client.transport.write(
        b"POST /__clerk/v1/me HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"258\r\n" + b"x" * 600 + b"\r\n"
    )
    await sleep(0.3)
    client.transport.write(b"258\r\n" + b"y" * 600 + b"\r\n0\r\n\r\n")
    data = await within(client.closed)
    status, headers, body = parse_response(data)
    assert status == 413
    assert (b"connection", b"close") in headers
    assert json.loads(body)["errors"][0]["code"] == "proxy_request_too_large"
    assert fapi.seen == []  # FAPI never got a whole request


@pytest_twisted.ensureDeferred
async def test_a_body_within_the_limit_passes(make_proxy: Any, fapi: Any) -> None:
    proxy = make_proxy(max_body_size=1000)
    data = await raw_request(
        proxy.port,
        b"POST /__clerk/v1/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 1000\r\n\r\n"
        + b"x" * 1000,
    )
    assert parse_response(data)[0] == 200


@pytest_twisted.ensureDeferred
async def test_client_leaving_cancels_the_upstream_exchange(
    proxy: Any, fapi: Any
) -> None:
    client = await connect_raw(proxy.port)
    client.transport.write(b"GET /__clerk/stall HTTP/1.1\r\nHost: a\r\n\r\n")
    while not fapi.recorder.stalled:
        await sleep(0.01)
    [stalled] = fapi.recorder.stalled
    gone = stalled.notifyFinish()
    client.transport.abortConnection()
    with pytest.raises((ConnectionDone, ConnectionLost)):
        await within(gone)  # FAPI saw its connection go away
    await sleep(0.05)
    pool = proxy.resource.upstream
    assert pool.openConnections == 0 and pool.idleConnections == 0


@pytest_twisted.ensureDeferred
async def test_client_leaving_mid_response_stops_fapi(
    make_proxy: Any, fapi: Any
) -> None:
    proxy = make_proxy()
    client = await connect_raw(proxy.port)
    client.transport.write(b"GET /__clerk/big/1073741824 HTTP/1.1\r\nHost: a\r\n\r\n")
    await client.waitFor(b"\r\n\r\n")
    client.transport.abortConnection()
    await within(client.closed)
    for _ in range(100):
        if proxy.resource.upstream.openConnections == 0:
            break
        await sleep(0.02)
    assert proxy.resource.upstream.openConnections == 0


@pytest_twisted.ensureDeferred
async def test_fapi_failing_mid_body_aborts_the_client(proxy: Any, fapi: Any) -> None:
    data = await raw_request(
        proxy.port, b"GET /__clerk/truncate HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    status, headers, body = parse_response(data)
    assert status == 200
    assert dict(headers)[b"content-length"] == b"100000"
    assert len(body) < 100000  # visibly truncated, never padded or completed


@pytest_twisted.ensureDeferred
async def test_fapi_failing_mid_chunked_body_leaves_no_final_chunk(
    proxy: Any, fapi: Any
) -> None:
    data = await raw_request(
        proxy.port, b"GET /__clerk/chunked-truncate HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    status, headers, body = parse_response(data)
    assert status == 200
    assert dict(headers)[b"transfer-encoding"] == b"chunked"
    assert body.startswith(b"3e8\r\n" + b"x" * 1000)
    assert not body.endswith(b"0\r\n\r\n")  # no terminating chunk


async def _error_case(
    proxy: Any, target: str = "/__clerk/v1/client"
) -> tuple[int, dict[bytes, bytes], dict[str, Any]]:
    data = await raw_request(
        proxy.port,
        f"GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n".encode(),
        15,
    )
    status, headers, body = parse_response(data)
    return status, dict(headers), json.loads(body)


@pytest_twisted.ensureDeferred
async def test_unreachable_fapi_is_a_502(make_proxy: Any, fapi: Any) -> None:
    port = fapi.port.getHost().port
    await fapi.port.stopListening()
    proxy = make_proxy(fapi_url=f"https://localhost:{port}")
    status, headers, body = await _error_case(proxy)
    assert status == 502
    assert headers[b"cache-control"] == b"no-store"
    assert headers[b"content-type"] == b"application/json"
    assert body["errors"][0]["code"] == "proxy_request_failed"


@pytest_twisted.ensureDeferred
async def test_untrusted_certificate_is_a_502(make_proxy: Any, fapi: Any) -> None:
    import trustme
    from conftest import trust_root

    stranger = trustme.CA()
    proxy = make_proxy(
        endpoint=fapi_endpoint(
            reactor, "localhost", fapi.port.getHost().port, trust_root(stranger), 5.0
        )
    )
    status, _, body = await _error_case(proxy)
    assert status == 502 and body["errors"][0]["code"] == "proxy_request_failed"
    assert fapi.seen == []
    assert proxy.resource.metrics.upstreamErrors == {"tls": 1}


@pytest_twisted.ensureDeferred
async def test_wrong_hostname_is_a_502_counted_as_tls(
    make_proxy: Any, fapi: Any, ca: Any
) -> None:
    from conftest import _server_options

    # A server the proxy reaches, with a certificate from the trusted CA,
    # but for another name than the one the proxy asked for.
    options = _server_options(ca.issue_cert("wrong.example"))
    wrong = reactor.listenSSL(0, fapi.site, options, interface="127.0.0.1")
    try:
        proxy = make_proxy(fapi_url=f"https://127.0.0.1:{wrong.getHost().port}")
        status, _, body = await _error_case(proxy)
    finally:
        await wrong.stopListening()
    assert status == 502
    assert fapi.seen == []
    assert proxy.resource.metrics.upstreamErrors == {"tls": 1}


@pytest_twisted.ensureDeferred
async def test_slow_fapi_is_a_504(make_proxy: Any, fapi: Any) -> None:
    proxy = make_proxy(upstream_timeout=0.5)
    status, headers, body = await _error_case(proxy, "/__clerk/stall")
    assert status == 504
    assert headers[b"cache-control"] == b"no-store"
    assert body["errors"][0]["code"] == "proxy_upstream_timeout"


@pytest_twisted.ensureDeferred
async def test_the_secret_never_reaches_logs_or_responses(
    make_proxy: Any, fapi: Any
) -> None:
    from twisted.logger import formatEvent

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        slow = make_proxy(upstream_timeout=0.3)
        seen = [
            await raw_request(
                slow.port,
                b"GET /__clerk/stall HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
        ]
        seen.append(
            await raw_request(
                slow.port, b"GET /__clerk/truncate HTTP/1.1\r\nHost: a\r\n\r\n"
            )
        )
        seen.append(
            await raw_request(
                slow.port,
                b"POST /__clerk/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            )
        )
        port = fapi.port.getHost().port
        await fapi.port.stopListening()
        seen.append(
            await raw_request(
                slow.port,
                b"GET /__clerk/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
        )
        refused = make_proxy(fapi_url=f"https://localhost:{port}")
        seen.append(
            await raw_request(
                refused.port,
                b"GET /__clerk/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
        )
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert events, "the failures above should have been logged"
    for event in events:
        text = formatEvent(event) + repr(event)
        if "log_failure" in event:
            text += event["log_failure"].getTraceback()
        assert SECRET not in text
    for data in seen:
        assert SECRET.encode() not in data


@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_is_cut_at_the_send_timeout(
    make_proxy: Any, fapi: Any
) -> None:
    """
    On real sockets: the client's socket fills, the proxy pauses FAPI (so
    FAPI's silence is no read timeout, even a much shorter one) and cuts the
    client once it has taken nothing for --send-timeout; FAPI's connection
    goes too.
    """
    proxy = make_proxy(send_timeout=0.5, upstream_read_timeout=0.2)
    client = await connect_raw(proxy.port)
    client.transport.write(b"GET /__clerk/big/1073741824 HTTP/1.1\r\nHost: a\r\n\r\n")
    await client.waitFor(b"\r\n\r\n")
    client.transport.pauseProducing()  # read nothing more
    metrics = proxy.resource.metrics
    for _ in range(500):
        if metrics.timeouts["send"]:
            break
        await sleep(0.02)
    assert metrics.timeouts["send"] == 1
    assert metrics.timeouts["upstream_read"] == 0
    client.transport.resumeProducing()
    await within(client.closed, 10)
    for _ in range(100):
        if proxy.resource.upstream.openConnections == 0:
            break
        await sleep(0.02)
    assert proxy.resource.upstream.openConnections == 0


@pytest_twisted.ensureDeferred
async def test_slow_uploaders_do_not_delay_an_ordinary_request(
    make_proxy: Any, fapi: Any
) -> None:
    """
    Twenty clients trickle small bodies through a pool of two.  They hold
    no upstream connection while they send, so an ordinary request goes
    straight through (it would wait behind them and get a 504 if each
    upload took a pool slot at its head).
    """
    proxy = make_proxy(pool_size=2, upstream_timeout=3.0)
    uploaders = [await connect_raw(proxy.port) for _ in range(20)]
    for client in uploaders:
        client.transport.write(
            b"POST /__clerk/v1/client/sign_ins HTTP/1.1\r\nHost: a\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 100\r\n\r\na"
        )
    await sleep(0.2)
    for client in uploaders:
        client.transport.write(b"b")  # still trickling
    data = await raw_request(
        proxy.port,
        b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        seconds=10,
    )
    assert parse_response(data)[0] == 200
    assert [r["method"] for r in fapi.seen] == ["GET"]
    pool = proxy.resource.upstream
    assert pool.openConnections == 1 and pool.queuedRequests == 0
    assert all(client.received == b"" for client in uploaders)
    for client in uploaders:
        client.transport.abortConnection()
