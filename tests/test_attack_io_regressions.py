"""
Attack probes that failed against 160de2d, the first version of the
coalesced writes and the standard-library upstream TLS: each asserts what
a careful proxy does and names the bug it found (see the docstrings).  Same harness as
C{test_attack_io.py} (C{attack_support.py}).
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
import trustme
from attack_support import (
    EdgeProxy,
    HostileFAPI,
    LogWatch,
    Peer,
    TLSClient,
    edge,
    hostile,
    log,
    server_tls,
    sleep,
    until,
)
from conftest import (
    _server_options,
    connect_raw,
    parse_response,
    reactor,
    trust_root,
    within,
)
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import trustRootFromCertificates

from clerkproxy._tcp_compat import CoalescingServer, coalesce_port
from clerkproxy._upstream_tls import UpstreamTLS, UpstreamTLSEndpoint, client_context

GET = b"GET /__clerk/v1/client HTTP/1.1\r\nHost: app.test\r\n\r\n"

__all__ = ["edge", "hostile", "log"]  # fixtures


def upstream_tls(proxy: EdgeProxy) -> list[UpstreamTLS]:
    pool: Any = proxy.pool
    conns = [*pool._open, *pool._busy, *pool._relaying, *pool._idle]
    return list({id(c.transport): c.transport for c in conns}.values())


@pytest_twisted.ensureDeferred
async def test_an_upload_is_held_back_while_the_handshake_is_pending(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """
    BUG (_upstream_tls.py:209-215, UpstreamTLS.write): bytes written before
    the handshake completes go to C{_held}, an unbounded list, and nothing
    pauses the producer registered for the request body (Twisted's
    C{TLSMemoryBIOProtocol._bufferedWrite} pauses it).  The exchange
    streams a large body as soon as TCP connects (the connect Deferred fires
    before the handshake) and drops the upstream deadline while the client
    paces the upload, so with FAPI (or anything on the path) stalling the
    handshake a client pushes its whole body, up to --max-body-size (16
    MiB by default, per connection, outside the pool's cap) into the
    proxy's memory.
    """
    fapi: HostileFAPI = hostile()
    fapi.handshake = False
    proxy = await edge(fapi.portNumber, upstream_timeout=2.0)
    size = (16 << 20) - 1
    client = await connect_raw(proxy.port)
    client.transport.write(
        b"POST /__clerk/v1/client HTTP/1.1\r\nHost: app.test\r\n"
        b"Content-Length: %d\r\n\r\n" % size
    )
    client.transport.write(b"x" * size)
    peak = 0
    for _ in range(100):  # a second
        await sleep(0.01)
        for tls in upstream_tls(proxy):
            peak = max(peak, sum(len(chunk) for chunk in tls._held))
    client.transport.abortConnection()
    assert peak <= 1 << 20, f"{peak} bytes of plaintext held before the handshake"


@pytest_twisted.ensureDeferred
async def test_close_notify_from_fapi_ends_the_connection(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """
    BUG (_upstream_tls.py:129-152, UpstreamTLS.dataReceived): the loop
    waits for C{ssl.SSLZeroReturnError} to learn that FAPI sent
    close_notify, but C{SSLObject.read} does not raise it: after a clean
    close_notify it returns C{b""} (CPython's C{_ssl} returns 0 bytes when
    C{SSL_get_shutdown} is C{SSL_RECEIVED_SHUTDOWN}), and the loop breaks
    on the empty chunk.  The C{peerClosed} branch is dead code.

    So a FAPI (or a TLS terminator in front of it) that closes an idle
    keep-alive connection with close_notify and waits for ours before
    sending its FIN (a bidirectional shutdown, as Twisted's own TLS server
    does) leaves a dead connection on the pool's idle stack: it is never
    closed (until the pool's idle sweep), and the next request is written
    into it and waits for the upstream deadline (504; a timeout is not
    retried) instead of going to a new connection.
    """
    fapi: HostileFAPI = hostile()
    closed: list[Peer] = []

    def onRequest(peer: Peer, head: bytes, body: bytes) -> None:
        if peer in closed:
            return  # it said close_notify: it answers nothing more
        peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

        def idleTimeout() -> None:
            closed.append(peer)
            peer.closeNotify()  # and wait for the client's, as TLS allows

        reactor.callLater(0.1, idleTimeout)

    fapi.onRequest = onRequest
    proxy = await edge(fapi.portNumber, upstream_timeout=2.0)
    client = await connect_raw(proxy.port)
    client.transport.write(GET)
    await within(client.waitFor(b"ok"), 5)
    await until(lambda: bool(closed), "FAPI's close_notify")
    first = fapi.peers[0]
    # The proxy answers the close_notify, or at least closes its end.
    await sleep(0.5)
    assert first.closeNotified or first.gone, "close_notify went unanswered"
    # And the next request goes to a new connection.
    client.transport.write(GET)
    await until(lambda: client.received.count(b"HTTP/1.1 ") == 2, "an answer", 5)
    assert client.received.count(b"HTTP/1.1 200 ") == 2, client.received


@pytest_twisted.ensureDeferred
async def test_a_close_delimited_body_ends_at_close_notify(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """
    BUG (same root cause as the test above): a body delimited by the close,
    ended by close_notify from a FAPI that then waits for ours before its
    FIN.  The close_notify is the authenticated end of the body, but the
    proxy does not see it: the answer hangs until --upstream-read-timeout
    and is then cut (the client sees a complete answer as truncated).
    """
    fapi: HostileFAPI = hostile()

    def onRequest(peer: Peer, head: bytes, body: bytes) -> None:
        peer.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nwhole body")
        peer.closeNotify()  # the end; FIN once the client says close_notify

    fapi.onRequest = onRequest
    proxy = await edge(fapi.portNumber, upstream_read_timeout=3.0)
    client = await connect_raw(proxy.port)
    client.transport.write(GET)
    await within(client.waitFor(b"whole body"), 5)
    await sleep(1.0)
    assert client.received.endswith(b"whole body\r\n0\r\n\r\n"), client.received


@pytest_twisted.ensureDeferred
async def test_a_close_delimited_body_cut_without_close_notify_looks_cut(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """
    BUG (_upstream_tls.py:154-161 with _client.py:394-402): a body FAPI
    delimits by closing the connection (no Content-Length, no chunking) is
    authenticated only by close_notify; a bare FIN (or one injected by
    anyone on the path) is a truncation.  C{UpstreamTLS.connectionLost}
    never feeds the EOF to TLS (C{MemoryBIO.write_eof}, then C{read} raises
    C{SSLEOFError}) and passes the TCP reason on unchanged, so a truncation
    and a clean close both arrive as C{ConnectionDone}; and
    C{UpstreamConnection.connectionLost} ends a close-delimited body with
    C{responseDone} whatever the reason.  The client gets a cleanly
    terminated chunked answer (the truncation is hidden).  (Twisted's TLS
    reports such an EOF as C{ConnectionLost}, but C{_client.py} ignores the
    reason there too.)
    """
    fapi: HostileFAPI = hostile()

    def onRequest(peer: Peer, head: bytes, body: bytes) -> None:
        peer.send(
            b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"
            b'{"object":"client","sessions":[{"id":"sess_1"'
        )
        reactor.callLater(0.05, peer.fin)  # no close_notify: truncated

    fapi.onRequest = onRequest
    proxy = await edge(fapi.portNumber)
    client = await connect_raw(proxy.port)
    client.transport.write(GET)
    await within(client.waitFor(b"sess_1"), 5)
    await sleep(0.5)
    code, headers, body = parse_response(client.received)
    assert code == 200 and (b"transfer-encoding", b"chunked") in headers
    assert not body.endswith(b"0\r\n\r\n"), "a truncated body was relayed as whole"
    assert client.closed.called, "the client is not told the body was cut"


@pytest_twisted.ensureDeferred
async def test_an_answer_followed_by_a_bad_record_in_one_read_is_relayed(
    hostile: Any, edge: Any, log: LogWatch
) -> None:
    """
    BUG (_upstream_tls.py:137-139): the read loop gathers the decrypted
    chunks of one TCP read and, if a later record fails (bad MAC, a fatal
    alert), returns through C{_fail} without delivering the chunks it
    already decrypted and authenticated.  A complete answer followed in
    the same segment by a bad record becomes a 502 (Twisted's TLS hands
    each chunk up as it is read, then fails): bytes are lost.
    """
    fapi: HostileFAPI = hostile()

    def onRequest(peer: Peer, head: bytes, body: bytes) -> None:
        answer = peer.records(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        bad = b"\x17\x03\x03\x00\x20" + b"\x00" * 32  # fails authentication
        peer.sendRaw(answer + bad)

    fapi.onRequest = onRequest
    proxy = await edge(fapi.portNumber)
    client = await connect_raw(proxy.port)
    client.transport.write(GET)
    await within(client.waitFor(b"\r\n\r\n"), 5)
    await sleep(0.1)
    code, _, body = parse_response(client.received)
    assert (code, body) == (200, b"hello")


@pytest_twisted.ensureDeferred
async def test_an_empty_trust_root_trusts_nothing(
    ca: trustme.CA,
    hostile: Any,
    edge: Any,
    log: LogWatch,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    BUG (_upstream_tls.py:72-75 with _twisted_compat.py trust_root_pems):
    C{trust_root_pems} returns C{b""} both for the platform's roots and for
    a C{trustRootFromCertificates([])} root, and C{client_context} loads
    the platform's roots for C{b""}.  A trust root that names no
    certificate (which under Twisted's TLS trusts nothing) silently widens
    to every CA the platform trusts.  (C{--fapi-ca} refuses an empty file;
    the embedding API, C{FrontendAPIProxy(trustRoot=...)}, does not.)  Here
    the "platform" is the test CA (C{SSL_CERT_FILE}).
    """
    bundle = tmp_path / "platform.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    fapi: HostileFAPI = hostile()
    fapi.answer()
    proxy = await edge(fapi.portNumber, trustRoot=trustRootFromCertificates([]))
    client = await connect_raw(proxy.port)
    client.transport.write(GET)
    data = await within(client.waitFor(b"\r\n\r\n"), 5)
    assert parse_response(data)[0] == 502, "an empty trust root trusted a CA"
    assert fapi.peers[0].requests == []


@pytest_twisted.ensureDeferred
async def test_abort_connection_discards_what_was_written_this_turn(
    log: LogWatch,
) -> None:
    """
    BUG (_tcp_compat.py:141-158, CoalescingServer.flushNow; same in
    _upstream_tls.py:200-205 with send_direct): C{abortConnection} leaves
    C{connected} set until its C{callLater(0)} runs, and the flush queued
    by an earlier write of the same turn checks only C{connected},
    C{disconnecting} and C{_writeDisconnecting}, so it sends the bytes that
    C{ITCPTransport.abortConnection} promises to discard ("Discards any
    buffered data"), then the RST follows.  (The proxy aborts a client
    connection to show a truncation, and FAPI's when it gives up on an
    exchange.)
    """
    sent: list[bytes] = []

    class WriteThenAbort(Protocol):
        def dataReceived(self, data: bytes) -> None:
            transport: Any = self.transport
            real = transport.writeSomeData

            def spy(data: bytes) -> Any:
                sent.append(bytes(data))
                return real(data)

            transport.writeSomeData = spy
            transport.write(b"must never leave")
            transport.abortConnection()

    port: Any = coalesce_port(
        reactor.listenTCP(0, Factory.forProtocol(WriteThenAbort), interface="127.0.0.1")
    )
    try:
        client = await connect_raw(port.getHost().port)
        client.transport.write(b"go")
        await within(client.closed, 5)
        await sleep(0.05)
        assert isinstance(port.transport, type) and issubclass(
            port.transport, CoalescingServer
        )
        assert sent == [], "bytes went to the socket after abortConnection"
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_cut_relay_does_not_end_in_a_clean_tls_close(
    ca: trustme.CA, hostile: Any, edge: Any, log: LogWatch, tmp_path: Any
) -> None:
    """
    BUG (_tcp_compat.py:141-158, the same root cause as above, on a TLS
    listener): when FAPI breaks off mid-body the exchange aborts the
    client's connection "so that the truncation shows" (C{Exchange._cut}).
    Twisted's C{TLSMemoryBIOProtocol.abortConnection} first writes a
    close_notify into the TCP transport, then aborts it; a plain
    C{tcp.Server} drops it with the rest of its buffer, but the
    C{CoalescingServer} flush queued by that very write sends it.  The
    client reads a clean TLS shutdown where the body was cut: an HTTP/1.0
    client (body delimited by the close) takes the truncated body as
    complete.  (With C{reactor.listenTCP}'s plain transport, no close_notify
    arrives.)
    """
    fapi: HostileFAPI = hostile()

    def onRequest(peer: Peer, head: bytes, body: bytes) -> None:
        peer.send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"10\r\n0123456789abcdef\r\n"
        )
        reactor.callLater(0.05, peer.fin)  # mid-body: no last chunk

    fapi.onRequest = onRequest
    proxy = await edge(fapi.portNumber, listenTLS=server_tls(ca, tmp_path))
    client = TLSClient(ca, b"GET /__clerk/v1/client HTTP/1.0\r\nHost: app.test\r\n\r\n")
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", proxy.port), client)
    await within(client.lost, 5)
    assert client.plain.startswith(b"HTTP/1.0 200 OK\r\n")
    assert client.plain.endswith(b"0123456789abcdef")
    assert not client.closeNotify, "a cut body ended with a clean close_notify"


@pytest_twisted.ensureDeferred
async def test_upstream_tls_abort_discards_what_was_written_this_turn(
    ca: trustme.CA, hostile: Any, log: LogWatch
) -> None:
    """
    BUG (_upstream_tls.py:200-205 and _tcp_compat.py:187-207): the same for
    FAPI's side.  C{UpstreamTLS.abortConnection} marks the layer closing
    and aborts TCP, but the flush queued by a write earlier in the turn
    still reads the TLS output and C{send_direct} finds the TCP transport
    C{connected} (an abort only disconnects on the next turn), so request
    bytes the exchange gave up on go to FAPI anyway.
    """
    fapi: HostileFAPI = hostile()
    endpoint = UpstreamTLSEndpoint(
        reactor,
        TCP4ClientEndpoint(reactor, "127.0.0.1", fapi.portNumber),
        client_context(trust_root(ca)),  # type: ignore[arg-type]
        "localhost",
    )
    client = Protocol()
    await endpoint.connect(Factory.forProtocol(lambda: client))
    tls: Any = client.transport
    await until(lambda: tls._open, "the handshake")
    await sleep(0.05)
    sent: list[bytes] = []
    tcp: Any = tls.transport
    real = tcp.writeSomeData

    def spy(data: bytes) -> Any:
        sent.append(bytes(data))
        return real(data)

    tcp.writeSomeData = spy
    tls.write(b"POST /__clerk/v1/client HTTP/1.1\r\n")
    tls.abortConnection()
    await until(lambda: not fapi.open, "the connection ended")
    assert sent == [], "request bytes went out after abortConnection"


@pytest_twisted.ensureDeferred
async def test_start_tls_on_a_coalescing_transport_still_encrypts(
    ca: trustme.CA, log: LogWatch
) -> None:
    """
    LATENT BUG (_tcp_compat.py:117-139): C{tcp.Server} (through
    C{_newtls.ConnectionMixin}) is an C{ITLSTransport}: after C{startTLS},
    its C{write} hands bytes to the TLS layer.  C{CoalescingServer.write}
    and C{writeSequence} override that and go straight to the socket, so
    after C{startTLS} a coalescing transport sends plaintext.  Nothing in
    clerkproxy calls C{startTLS} today (TLS listeners wrap the factory),
    but the class still claims C{ITLSTransport}.
    """

    class StartsTLS(Protocol):
        def connectionMade(self) -> None:
            transport: Any = self.transport
            transport.startTLS(_server_options(ca.issue_cert("localhost")))
            transport.write(b"must be encrypted")

    port: Any = coalesce_port(
        reactor.listenTCP(0, Factory.forProtocol(StartsTLS), interface="127.0.0.1")
    )
    try:
        client = await connect_raw(port.getHost().port)
        await sleep(0.2)
        assert b"must be encrypted" not in client.received, "plaintext on the wire"
        client.transport.abortConnection()
    finally:
        await port.stopListening()
