"""
Attacks on the proxy's I/O: the coalescing client transport
(C{_tcp_compat}) and the standard-library TLS to FAPI (C{_upstream_tls}),
over loopback with the real reactor, against a FAPI stand-in whose TLS the
test drives (C{attack_support.HostileFAPI}).  Each probe asserts the
outcome a careful proxy gives; these all hold.  Those that do not are in
C{test_attack_io_bugs.py}.
"""

from __future__ import annotations

import datetime
import hashlib
import ssl
import warnings
from typing import Any

import pytest
import pytest_twisted
import trustme
from attack_support import (
    EdgeProxy,
    HostileFAPI,
    LogWatch,
    Peer,
    edge,
    hostile,
    log,
    server_transports,
    sleep,
    until,
)
from conftest import SECRET, connect_raw, parse_response, reactor, within
from twisted.internet.protocol import Factory, Protocol

from clerkproxy._tcp_compat import CoalescingServer, coalesce_port
from clerkproxy._upstream_tls import UpstreamTLS

GET = b"GET /__clerk/v1/client HTTP/1.1\r\nHost: app.test\r\n\r\n"

__all__ = ["edge", "hostile", "log"]  # fixtures


def status(data: bytes) -> int:
    return parse_response(data)[0]


def upstream_tls(proxy: EdgeProxy) -> list[UpstreamTLS]:
    pool: Any = proxy.pool
    conns = [*pool._open, *pool._busy, *pool._relaying, *pool._idle]
    return list({id(c.transport): c.transport for c in conns}.values())


def pattern(n: int) -> bytes:
    """C{n} bytes in which every offset is visible (no run repeats)."""
    block = b"".join(b"%08x" % i for i in range(8192))  # 64 KiB
    return (block * (n // len(block) + 1))[:n]


async def fetch(proxy: EdgeProxy, request: bytes = GET, seconds: float = 8.0) -> bytes:
    client = await connect_raw(proxy.port)
    client.transport.write(request)
    data = await within(client.waitFor(b"\r\n\r\n"), seconds)
    fields = dict(parse_response(data)[1])
    if b"content-length" in fields:
        head = data.partition(b"\r\n\r\n")[0]
        total = len(head) + 4 + int(fields[b"content-length"])
        while len(client.received) < total:
            await within(client.waitFor(client.received[-1:] or b"\r\n"), seconds)
            await sleep(0.01)
    client.transport.loseConnection()
    return client.received


# -- handshakes that go wrong ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_handshake_fapi_never_answers_ends_at_the_upstream_deadline(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """
    FAPI takes the TCP connection and sits on the ClientHello.  The request
    was written before the handshake: it is held, never sent in clear, and
    the upstream deadline answers 504 and drops the connection.
    """
    fapi: HostileFAPI = hostile()
    fapi.handshake = False
    proxy = await edge(fapi.portNumber, upstream_timeout=1.0)
    client = await connect_raw(proxy.port)
    client.transport.write(GET)
    data = await within(client.waitFor(b"\r\n\r\n"), 5)
    assert status(data) == 504
    peer = fapi.peers[0]
    await within(peer.lost, 3)
    assert peer.raw[:1] == b"\x16"  # only the ClientHello went out
    assert b"Clerk-Secret-Key" not in peer.raw and SECRET.encode() not in peer.raw
    await until(lambda: proxy.pool.openConnections == 0, "the pool let go")
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_garbage_instead_of_tls_is_a_502(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    fapi: HostileFAPI = hostile()
    fapi.tlsOn = False

    def answer(peer: Peer, data: bytes) -> None:
        peer.sendRaw(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    fapi.onRaw = answer
    proxy = await edge(fapi.portNumber)
    data = await fetch(proxy)
    assert status(data) == 502
    assert proxy.metrics.upstreamErrors == {"tls": 1}
    await until(lambda: proxy.pool.openConnections == 0, "the pool let go")
    assert log.mentions("SSLError") and log.errors == []
    assert SECRET.encode() not in fapi.peers[0].raw


@pytest_twisted.ensureDeferred
async def test_a_fatal_alert_for_a_client_hello_is_a_502(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    fapi: HostileFAPI = hostile()
    fapi.tlsOn = False
    # alert, TLS 1.2 record, length 2: fatal (2), handshake_failure (40)
    fapi.onRaw = lambda peer, data: peer.sendRaw(b"\x15\x03\x03\x00\x02\x02\x28")
    proxy = await edge(fapi.portNumber)
    assert status(await fetch(proxy)) == 502
    assert proxy.metrics.upstreamErrors == {"tls": 1}
    await until(lambda: not fapi.open, "the connection closed")
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_fapi_closing_mid_handshake_is_a_502(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    fapi: HostileFAPI = hostile()
    fapi.handshake = False
    fapi.onRaw = lambda peer, data: None
    proxy = await edge(fapi.portNumber)
    client = await connect_raw(proxy.port)
    client.transport.write(GET)
    await until(lambda: bool(fapi.peers and fapi.peers[0].raw), "the ClientHello")
    fapi.peers[0].fin()
    data = await within(client.waitFor(b"\r\n\r\n"), 5)
    assert status(data) == 502
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_a_certificate_for_another_name_is_refused_before_any_request_byte(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    fapi: HostileFAPI = hostile(names=("evil.test",))
    fapi.answer()
    proxy = await edge(fapi.portNumber)
    assert status(await fetch(proxy)) == 502
    assert proxy.metrics.upstreamErrors == {"tls": 1}
    peer = fapi.peers[0]
    await within(peer.lost, 3)
    assert peer.requests == [] and peer.received == 0
    assert log.mentions("CERTIFICATE_VERIFY_FAILED")
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_a_certificate_from_another_ca_is_refused(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    other = trustme.CA()
    fapi: HostileFAPI = hostile(cert=other.issue_cert("localhost"))
    fapi.answer()
    proxy = await edge(fapi.portNumber)
    assert status(await fetch(proxy)) == 502
    assert fapi.peers[0].requests == []
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_an_expired_certificate_is_refused(
    ca: trustme.CA, hostile: Any, edge: Any, log: LogWatch
) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    expired = ca.issue_cert(
        "localhost",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    fapi: HostileFAPI = hostile(cert=expired)
    fapi.answer()
    proxy = await edge(fapi.portNumber)
    assert status(await fetch(proxy)) == 502
    assert fapi.peers[0].requests == []
    assert log.mentions("certificate has expired")


@pytest_twisted.ensureDeferred
async def test_an_ip_address_is_checked_against_the_certificate_and_sent_no_sni(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    good: HostileFAPI = hostile(names=("127.0.0.1",))
    good.answer()
    proxy = await edge(good.portNumber, host="127.0.0.1")
    assert status(await fetch(proxy)) == 200
    assert good.sni == [None]  # RFC 6066: no IP addresses in SNI
    # A certificate naming only a DNS name does not do for the address.
    bad: HostileFAPI = hostile(names=("localhost",))
    bad.answer()
    proxy = await edge(bad.portNumber, host="127.0.0.1")
    assert status(await fetch(proxy)) == 502
    assert bad.peers[0].requests == []
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_an_ipv6_address_is_checked_too(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    good: HostileFAPI = hostile(names=("::1",), interface="::1")
    good.answer()
    proxy = await edge(good.portNumber, host="[::1]")
    assert status(await fetch(proxy)) == 200
    assert good.sni == [None]
    bad: HostileFAPI = hostile(names=("localhost", "127.0.0.1"), interface="::1")
    bad.answer()
    proxy = await edge(bad.portNumber, host="[::1]")
    assert status(await fetch(proxy)) == 502
    assert bad.peers[0].requests == []
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_sni_alpn_and_version(hostile: Any, edge: Any, log: LogWatch) -> None:
    fapi: HostileFAPI = hostile()
    versions: list[str | None] = []

    def onHandshake(peer: Peer) -> None:
        fapi.alpn.append(peer.tls.selected_alpn_protocol())
        versions.append(peer.tls.version())

    fapi.onHandshake = onHandshake
    fapi.answer()
    proxy = await edge(fapi.portNumber)
    assert status(await fetch(proxy)) == 200
    assert fapi.sni == ["localhost"]
    assert fapi.alpn == ["http/1.1"]
    assert versions == ["TLSv1.3"]
    # TLS 1.1 is not even offered.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old: HostileFAPI = hostile(maxVersion=ssl.TLSVersion.TLSv1_1)
        old.context.minimum_version = ssl.TLSVersion.TLSv1_1
    old.context.set_ciphers("DEFAULT:@SECLEVEL=0")
    old.answer()
    proxy = await edge(old.portNumber)
    assert status(await fetch(proxy)) == 502
    assert old.peers[0].requests == []
    assert log.mentions("PROTOCOL_VERSION")


# -- FAPI ending a response ----------------------------------------------------


async def _truncated(
    fapi: HostileFAPI, proxy: EdgeProxy, end: str
) -> tuple[bytes, Any]:
    """FAPI sends a head promising 100000 bytes, 10000 of them, then C{end}."""

    def onRequest(peer: Peer, head: bytes, body: bytes) -> None:
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 10000)

        def finish() -> None:
            if end == "close_notify":
                peer.closeNotify()
                peer.fin()
            elif end == "fin":
                peer.fin()
            elif end == "reset":
                peer.reset()
            else:
                peer.sendRaw(b"\x17\x03\x03\x00\x20" + b"\x00" * 32)

        reactor.callLater(0.05, finish)

    fapi.onRequest = onRequest
    client = await connect_raw(proxy.port)
    client.transport.write(GET)
    data = await within(client.closed, 5)
    return data, client


@pytest_twisted.ensureDeferred
async def test_a_body_cut_short_shows_as_cut_short(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """close_notify, a bare FIN, a reset or a record that fails authentication
    before Content-Length is met:
    the client's connection is closed with the body short, and FAPI's
    connection is not pooled."""
    for end in ("close_notify", "fin", "reset", "bad record"):
        fapi: HostileFAPI = hostile()
        proxy = await edge(fapi.portNumber)
        data, _ = await _truncated(fapi, proxy, end)
        code, headers, body = parse_response(data)
        assert code == 200 and dict(headers)[b"content-length"] == b"100000"
        assert len(body) == 10000, end
        pool = proxy.pool
        await until(lambda: pool.openConnections == 0, "nothing pooled")  # noqa: B023
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_close_notify_with_the_last_bytes_of_a_response(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """The answer and close_notify in one segment: all of it is relayed."""
    fapi: HostileFAPI = hostile()
    body = pattern(40000)

    def onRequest(peer: Peer, head: bytes, _: bytes) -> None:
        data = peer.records(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (len(body), body)
        )
        try:
            peer.tls.unwrap()
        except ssl.SSLError:
            pass
        peer.sendRaw(data + peer.outgoing.read())

    fapi.onRequest = onRequest
    proxy = await edge(fapi.portNumber)
    data = await fetch(proxy)
    assert parse_response(data)[2] == body
    await until(lambda: not fapi.open, "FAPI's connection closed")
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_an_answer_in_one_byte_records(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """Five thousand one-byte records in one segment, then more split
    mid-record across segments: every byte, in order."""
    fapi: HostileFAPI = hostile()
    body = pattern(8000)

    def onRequest(peer: Peer, head: bytes, _: bytes) -> None:
        wire = peer.records(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % 8000)
        wire += b"".join(peer.records(body[i : i + 1]) for i in range(5000))
        peer.sendRaw(wire)
        rest = peer.records(body[5000:])
        for i in range(0, len(rest), 7):  # a record in many pieces
            reactor.callLater(0.001 * i / 7, peer.sendRaw, rest[i : i + 7])

    fapi.onRequest = onRequest
    proxy = await edge(fapi.portNumber)
    assert parse_response(await fetch(proxy))[2] == body
    assert log.errors == []


# -- FAPI's TLS during a connection's life ---------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_key_update_fapi_asks_for_keeps_the_connection_working(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """TLS 1.3 KeyUpdate(update_requested) between answers and inside a body:
    the proxy answers it, decrypts on, and the next request still reaches
    FAPI on the same connection."""
    fapi: HostileFAPI = hostile()
    body = pattern(300000)
    updated: list[bool] = []

    def onRequest(peer: Peer, head: bytes, _: bytes) -> None:
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        peer.send(body[:100000])
        updated.append(peer.keyUpdate())
        peer.send(body[100000:])
        updated.append(peer.keyUpdate())

    fapi.onRequest = onRequest
    proxy = await edge(fapi.portNumber)
    for _ in range(3):
        assert parse_response(await fetch(proxy))[2] == body
    if not all(updated):
        pytest.skip("cannot reach OpenSSL's SSL_key_update from here")
    assert len(fapi.peers) == 1 and len(fapi.peers[0].requests) == 3
    assert fapi.peers[0].tlsError is None
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_renegotiation_is_refused(
    ca: trustme.CA, edge: Any, log: LogWatch
) -> None:
    """
    A TLS 1.2 FAPI (pyOpenSSL, through Twisted) asks to renegotiate after an
    answer: the proxy refuses (no renegotiation), the connection ends, and
    the next request is answered on a new one.
    """
    from conftest import _server_options
    from twisted.web import resource, server

    class Answer(resource.Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            tls = request.channel.transport
            if not getattr(tls, "_renegotiated", False):
                tls._renegotiated = True

                def renegotiate() -> None:
                    from OpenSSL import SSL

                    connection = tls._tlsConnection
                    if connection is None:
                        return
                    connection.renegotiate()
                    try:
                        connection.do_handshake()
                    except SSL.WantReadError:
                        pass
                    tls._flushSendBIO()

                reactor.callLater(0.05, renegotiate)
            return b"ok"

    options = _server_options(ca.issue_cert("localhost"))
    from OpenSSL import SSL

    options.getContext().set_max_proto_version(SSL.TLS1_2_VERSION)
    site = server.Site(Answer())
    port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
    try:
        proxy = await edge(port.getHost().port)
        assert parse_response(await fetch(proxy))[2] == b"ok"
        await sleep(0.3)
        assert parse_response(await fetch(proxy))[2] == b"ok"
        assert proxy.pool.connectionsOpened == 2
    finally:
        await port.stopListening()
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_a_client_leaving_during_a_stalled_handshake_frees_the_connection(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """The request waits on a handshake FAPI sits on; its client resets: the
    orphan grace (2 s) ends FAPI's connection too."""
    fapi: HostileFAPI = hostile()
    fapi.handshake = False
    proxy = await edge(fapi.portNumber, upstream_timeout=30.0)
    client = await connect_raw(proxy.port)
    client.transport.write(GET)
    await until(lambda: bool(fapi.peers and fapi.peers[0].raw), "the ClientHello")
    client.transport.abortConnection()
    await within(fapi.peers[0].lost, 5)
    await until(lambda: proxy.pool.openConnections == 0, "the pool let go")
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_bytes_fapi_sends_on_an_idle_connection_end_it(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """A flood nobody asked for on a pooled connection: it is dropped, and
    the next request is answered on a new one."""
    fapi: HostileFAPI = hostile()
    flooded: list[Peer] = []

    def onRequest(peer: Peer, head: bytes, _: bytes) -> None:
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if not flooded:
            flooded.append(peer)
            reactor.callLater(0.05, peer.send, b"HTTP/1.1 200 OK\r\n" * 20000)

    fapi.onRequest = onRequest
    proxy = await edge(fapi.portNumber)
    assert parse_response(await fetch(proxy))[2] == b"ok"
    await within(flooded[0].lost, 5)
    assert parse_response(await fetch(proxy))[2] == b"ok"
    assert len(fapi.peers) == 2
    assert log.errors == []


def upload_held(proxy: EdgeProxy) -> int:
    """Request body bytes held inside the proxy on the way to FAPI."""
    total = 0
    for tls in upstream_tls(proxy):
        total += tls._outgoing.pending + sum(len(chunk) for chunk in tls._held)
        tcp: Any = tls.transport
        total += len(tcp.dataBuffer) - tcp.offset + tcp._tempDataLen
    return total


@pytest_twisted.ensureDeferred
async def test_an_upload_to_a_fapi_that_stops_reading_stays_bounded_and_intact(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """
    After the handshake, FAPI stops reading while a client uploads 12 MiB:
    the client is held back (the proxy keeps about a socket buffer's worth),
    and once FAPI reads again the body arrives whole and in order.
    """
    size = 12 << 20
    body = pattern(size)
    fapi: HostileFAPI = hostile()
    fapi.onHandshake = lambda peer: peer.pauseReading()

    def onRequest(peer: Peer, head: bytes, data: bytes) -> None:
        digest = hashlib.sha256(data).hexdigest().encode()
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 64\r\n\r\n" + digest)

    fapi.onRequest = onRequest
    proxy = await edge(fapi.portNumber, upstream_timeout=30.0)
    client = await connect_raw(proxy.port)
    client.transport.write(
        b"POST /__clerk/v1/client HTTP/1.1\r\nHost: app.test\r\n"
        b"Content-Length: %d\r\n\r\n" % size
    )
    client.transport.write(body)
    peak = 0
    for _ in range(100):  # a second
        await sleep(0.01)
        peak = max(peak, upload_held(proxy))
    assert peak < 1 << 20, peak
    fapi.peers[0].resumeReading()
    digest = hashlib.sha256(body).hexdigest().encode()
    await within(client.waitFor(digest), 20)
    assert fapi.peers[0].requests[0][1] == body
    client.transport.loseConnection()
    assert log.errors == []


# -- a FAPI that floods a slow client ------------------------------------------


def proxy_buffered(proxy: EdgeProxy) -> int:
    """Bytes of an answer held inside the proxy: in its TLS layer to FAPI
    and in the client connections' user-space write buffers."""
    total = 0
    for tls in upstream_tls(proxy):
        total += tls._incoming.pending + tls._outgoing.pending
        total += sum(len(chunk) for chunk in tls._held)
    for transport in server_transports(proxy):
        total += len(transport.dataBuffer) - transport.offset
        total += transport._tempDataLen
    return total


@pytest_twisted.ensureDeferred
async def test_a_huge_answer_to_a_client_that_stops_reading_stays_bounded(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """
    FAPI pours 24 MiB in 16 KiB records at a client that reads nothing for a
    while: the proxy holds at most about a socket buffer's worth, and once
    the client reads again every byte arrives, in order.
    """
    size = 24 << 20
    body = pattern(size)
    fapi: HostileFAPI = hostile()

    def onRequest(peer: Peer, head: bytes, _: bytes) -> None:
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for offset in range(0, size, 1 << 20):
            peer.send(body[offset : offset + (1 << 20)])

    fapi.onRequest = onRequest
    proxy = await edge(fapi.portNumber, send_timeout=30.0)
    client = await connect_raw(proxy.port)
    client.transport.pauseProducing()
    client.transport.write(GET)
    peak = 0
    for _ in range(100):  # a second
        await sleep(0.01)
        peak = max(peak, proxy_buffered(proxy))
    assert peak < 1 << 20, peak
    client.transport.resumeProducing()
    await until(lambda: len(client.received) >= size, "the whole answer", 30)
    received = parse_response(client.received)[2]
    assert len(received) == size
    assert hashlib.sha256(received).digest() == hashlib.sha256(body).digest()
    client.transport.loseConnection()
    assert log.errors == []


# -- the coalescing client transport ----------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pipelined_answers_of_mixed_sizes_arrive_whole_and_in_order(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """
    Twenty pipelined requests in one segment, some answers large enough to
    fill the socket while the client is not reading: every answer arrives
    in order with every byte.
    """
    fapi: HostileFAPI = hostile()
    sizes = [2, 300000, 5, 70000, 1, 1 << 20, 3, 64 << 10, 0, 17] * 2

    def body(head: bytes) -> bytes:
        n = int(head.split(b" ")[1].rsplit(b"/", 1)[1])
        return (b"%d:" % n) + pattern(sizes[n])

    fapi.answer(body)
    proxy = await edge(fapi.portNumber)
    client = await connect_raw(proxy.port)
    client.transport.pauseProducing()
    client.transport.write(
        b"".join(
            b"GET /__clerk/v1/%d HTTP/1.1\r\nHost: app.test\r\n\r\n" % n
            for n in range(len(sizes))
        )
    )
    await sleep(0.3)
    client.transport.resumeProducing()
    last = body(b"GET /__clerk/v1/%d " % (len(sizes) - 1))
    await within(client.waitFor(last), 20)
    rest = client.received
    for n in range(len(sizes)):
        code, headers, after = parse_response(rest)
        length = int(dict(headers)[b"content-length"])
        assert code == 200
        assert after[:length] == body(b"GET /__clerk/v1/%d " % n), n
        rest = after[length:]
    assert rest == b""
    client.transport.loseConnection()
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_clients_leaving_with_writes_queued(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """
    Two hundred clients; FAPI answers all of them in one reactor turn (so
    two hundred flushes are queued), and every client resets in that same
    turn: no error, every proxy connection closes, the pool keeps no
    half-used connection, and the proxy still answers.
    """
    fapi: HostileFAPI = hostile()
    held: list[Peer] = []
    fapi.onRequest = lambda peer, head, body: held.append(peer)
    proxy = await edge(fapi.portNumber, pool_size=256)
    clients = [await connect_raw(proxy.port) for _ in range(200)]
    for client in clients:
        client.transport.write(
            b"GET /__clerk/v1/big HTTP/1.1\r\nHost: app.test\r\n\r\n"
        )
    await until(lambda: len(held) == 200, "all requests at FAPI", 10)
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n" + b"y" * 200000

    def burst() -> None:
        for peer in held:
            peer.send(answer)

    burst()
    await sleep(0.02)  # the answers start to flow ...
    for client in clients:
        client.transport.abortConnection()  # ... and every client resets
    await until(lambda: server_transports(proxy) == [], "client sockets closed", 10)
    await until(
        lambda: proxy.pool.busyConnections + proxy.pool.relayingConnections == 0,
        "the pool settles",
        10,
    )
    fapi.answer()
    assert status(await fetch(proxy)) == 200
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_write_then_lose_connection_in_one_turn_sends_everything(
    log: LogWatch,
) -> None:
    """A protocol that writes and closes at once (as a 502 does): the peer
    gets every byte, then the close; also for writes larger than one send."""
    sizes = [1, 70000, 5 << 20]

    class Writer(Protocol):
        def connectionMade(self) -> None:
            n = sizes.pop(0)
            self.transport.write(b"a" * (n // 2))  # type: ignore[union-attr]
            self.transport.write(b"b" * (n - n // 2))  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]
            self.transport.write(b"ignored?")  # type: ignore[union-attr]

    port = coalesce_port(
        reactor.listenTCP(0, Factory.forProtocol(Writer), interface="127.0.0.1")
    )
    try:
        for n in list(sizes):
            client = await connect_raw(port.getHost().port)  # type: ignore[attr-defined]
            data = await within(client.closed, 10)
            # FileDescriptor also sends what is written after loseConnection
            assert data == b"a" * (n // 2) + b"b" * (n - n // 2) + b"ignored?"
    finally:
        await port.stopListening()  # type: ignore[attr-defined]
    assert log.errors == []


@pytest_twisted.ensureDeferred
async def test_a_peer_that_resets_while_a_large_write_is_queued(
    log: LogWatch,
) -> None:
    """The peer resets before the flush: the flush finds the error, the
    connection is lost once, no Unhandled Error and no busy loop."""
    lost: list[Any] = []
    made: list[Any] = []

    class Writer(Protocol):
        def connectionMade(self) -> None:
            made.append(self)

        def dataReceived(self, data: bytes) -> None:
            self.transport.write(b"z" * (8 << 20))  # type: ignore[union-attr]

        def connectionLost(self, reason: Any = None) -> None:
            lost.append(reason)

    port = coalesce_port(
        reactor.listenTCP(0, Factory.forProtocol(Writer), interface="127.0.0.1")
    )
    try:
        client = await connect_raw(port.getHost().port)  # type: ignore[attr-defined]
        client.transport.pauseProducing()
        client.transport.write(b"go")
        await until(lambda: bool(made) and made[0].transport.offset > 0, "sending")
        client.transport.abortConnection()
        await until(lambda: len(lost) == 1, "the server side lost it")
        await sleep(0.1)
        assert len(lost) == 1
        assert isinstance(made[0].transport, CoalescingServer)
    finally:
        await port.stopListening()  # type: ignore[attr-defined]
    assert log.errors == []
