"""
Three bugs once in C{clerkproxy._upstream_tls}, one test each that failed
while it was there (see each docstring for the cause).  Each also passes
against Twisted's TLS, which C{UpstreamTLS} replaced.

Real loopback sockets: a Twisted TLS server with a C{trustme}
certificate, and L{UpstreamTLSEndpoint} to it.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
import trustme
from conftest import _server_options, reactor, trust_root, within
from twisted.internet import task
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from clerkproxy._upstream_tls import UpstreamTLSEndpoint, client_context


class Peer(Protocol):
    """Either end's application: keeps what arrives and how it ended."""

    def __init__(self, onData: Callable[[Peer, bytes], None] | None = None) -> None:
        self.onData = onData
        self.chunks: list[bytes] = []
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.onData is not None:
            self.onData(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)

    async def ended(self) -> Failure:
        await within(self.lost, 5)
        assert self.reason is not None
        return self.reason


class Pair:
    """A TLS server (Twisted's) on loopback and our client to it."""

    def __init__(self, ca: trustme.CA) -> None:
        self.ca = ca
        self.servers: list[Peer] = []
        self.clients: list[Peer] = []
        self.ports: list[Any] = []

    async def connect(
        self, onData: Callable[[Peer, bytes], None] | None = None
    ) -> tuple[Peer, Peer]:
        """Connect, write C{b"go"}; the client and the server's application."""
        factory = Factory()
        factory.buildProtocol = lambda addr: self._server(onData)  # type: ignore[method-assign]
        options = _server_options(self.ca.issue_cert("localhost"))
        # Twisted's own ALPN callback fails a handshake it finds no
        # protocol for; this server speaks what we offer.
        options.getContext().set_alpn_select_callback(lambda conn, offered: b"http/1.1")
        port = reactor.listenSSL(0, factory, options, interface="127.0.0.1")
        self.ports.append(port)
        context = client_context(trust_root(self.ca))
        assert context is not None
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        client = Peer()
        self.clients.append(client)
        endpoint = UpstreamTLSEndpoint(reactor, tcp, context, "localhost")
        await within(connectProtocol(endpoint, client))
        client.transport.write(b"go")
        for _ in range(500):
            if self.servers and self.servers[-1].received:
                break
            await task.deferLater(reactor, 0.01)
        return client, self.servers[-1]

    def _server(self, onData: Callable[[Peer, bytes], None] | None) -> Peer:
        server = Peer(onData)
        self.servers.append(server)
        return server

    def close(self) -> None:
        waiting: list[Deferred[Any]] = []
        for peer in self.clients + self.servers:
            if peer.reason is None and peer.transport is not None:
                peer.transport.abortConnection()
                waiting.append(peer.lost)
        waiting += [port.stopListening() for port in self.ports]
        pytest_twisted.blockon(within(DeferredList(waiting), 10))


@pytest.fixture
def pair(ca: trustme.CA) -> Iterator[Pair]:
    made = Pair(ca)
    yield made
    made.close()


@pytest_twisted.ensureDeferred
async def test_bug_close_notify_alone_ends_the_connection(pair: Pair) -> None:
    """
    FAPI's close_notify must end the connection, even before its TCP FIN.

    C{_upstream_tls.py}, C{UpstreamTLS.dataReceived}: C{SSLObject.read}
    returns C{b""} once close_notify has arrived (it never raises the
    C{SSLZeroReturnError} the code waits for), and the loop takes an empty
    read for "nothing more to decrypt" (C{if not chunk: break}).  The close
    goes unnoticed: against a server that waits for our close_notify before
    closing TCP (Twisted's TLS does; TLS allows it) the connection stays
    open for ever, and a pooled idle connection in that state is handed out
    for the next request, which then waits for its timeout.

    Fix: C{if not chunk: peerClosed = True; break}; then answer with our
    own close_notify (C{tls.unwrap()}, send what it wrote) before closing
    TCP.
    """

    def goodbye(server: Peer, data: bytes) -> None:
        server.transport.write(b"goodbye")
        server.transport.loseConnection()  # close_notify; TCP stays open

    client, server = await pair.connect(goodbye)
    reason = await client.ended()
    assert client.received == b"goodbye"
    assert reason.check(ConnectionDone), reason


@pytest_twisted.ensureDeferred
async def test_bug_abort_connection_discards_what_is_not_yet_sent(
    pair: Pair,
) -> None:
    """
    C{abortConnection} drops what is buffered (C{ITCPTransport}); bytes
    written earlier in the same reactor turn are sent all the same.

    C{write} leaves its record in C{_outgoing} for C{flushNow} at the end
    of the turn.  C{UpstreamTLS.abortConnection} neither empties it nor
    stops the flush, and Twisted's TCP C{abortConnection} only closes the
    socket from a C{callLater(0)} queued after the flush, so C{send_direct}
    finds it still connected and sends (C{_tcp_compat.send_direct} does
    not look at C{_aborting}).  Harmless for a request FAPI will not see
    completed, but not what the interface promises.

    Fix: C{self._outgoing.read()} (discard) in C{abortConnection}, or have
    C{flushNow} skip a connection that is closing.
    """
    client, server = await pair.connect()
    client.transport.write(b"written before the abort")
    client.transport.abortConnection()
    await client.ended()
    await server.ended()
    assert server.received == b"go"


@pytest_twisted.ensureDeferred
async def test_bug_tcp_close_without_close_notify_is_not_a_clean_end(
    pair: Pair,
) -> None:
    """
    A TCP FIN without close_notify is a truncation, which anyone on the
    path can forge; C{UpstreamTLS} passes it up as a clean
    C{ConnectionDone}, as if FAPI had closed TLS.  Twisted's TLS reports
    C{ConnectionLost} ("non-clean"), for this and for a TCP close during
    the handshake (where C{UpstreamTLS} also says C{ConnectionDone}).

    C{UpstreamTLS.connectionLost} passes on the TCP reason as it is.  Fix:
    when neither side closed TLS (no close_notify read, no
    C{loseConnection}), report C{ConnectionLost} (or feed
    C{_incoming.write_eof()} and report the C{SSLEOFError} C{read} raises).
    """

    def cut(server: Peer, data: bytes) -> None:
        server.transport.write(b"HTTP/1.1 200 OK\r\n\r\npart of a body")
        tcp = server.transport.transport
        reactor.callLater(0.05, tcp.loseConnection)  # FIN, no close_notify

    client, server = await pair.connect(cut)
    reason = await client.ended()
    assert client.received.endswith(b"part of a body")
    assert not reason.check(ConnectionDone), reason


# -- found by the final review ------------------------------------------------


class _AnswerThenBadRecord(Protocol):
    """
    A TLS FAPI on the standard library's C{ssl}: the first connection it
    accepts answers its first request and, in the same TCP segment, sends
    a record that cannot be decrypted; later connections answer normally.
    """

    accepted = 0

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._in, self._out, server_side=True)
        self._buffer = b""
        _AnswerThenBadRecord.accepted += 1
        self._first = _AnswerThenBadRecord.accepted == 1

    def dataReceived(self, data: bytes) -> None:
        self._in.write(data)
        try:
            self._tls.do_handshake()
            for _ in range(64):
                chunk = self._tls.read(65536)
                if not chunk:
                    break  # the proxy's close_notify
                self._buffer += chunk
        except ssl.SSLError:
            pass  # wants more, or the proxy's alert
        out = self._out.read()
        if out:
            self.transport.write(out)  # type: ignore[union-attr]
        while b"\r\n\r\n" in self._buffer:
            _, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
            self._answer()

    def _answer(self) -> None:
        self._tls.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        data = self._out.read()
        if self._first:
            data += b"\x17\x03\x03\x00\x20" + b"\x00" * 32  # a bad record
        self.transport.write(data)  # type: ignore[union-attr]


@pytest_twisted.ensureDeferred
async def test_a_request_handed_a_connection_a_bad_record_broke_is_retried(
    make_proxy: Any, ca: trustme.CA
) -> None:
    """
    FAPI's answer and a record that cannot be decrypted arrive in one read.
    Relaying the answer hands the connection back to the pool, and a
    waiting request takes it at once, before the bad record is dealt with.
    That request's write into the broken TLS connection used to raise
    SSLEOFError out of UpstreamTLS.write (an unhandled error, and a 502 for
    the waiting client); now the connection is known broken before the
    answer goes up, the write is dropped, and the request is retried on a
    new connection.
    """
    from conftest import connect_raw
    from twisted.logger import globalLogPublisher

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    _AnswerThenBadRecord.accepted = 0
    port = reactor.listenTCP(
        0,
        Factory.forProtocol(lambda: _AnswerThenBadRecord(context)),
        interface="127.0.0.1",
    )
    errors: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        proxy = make_proxy(
            fapi_url=f"https://localhost:{port.getHost().port}", pool_size=1
        )
        first = await connect_raw(proxy.port)
        second = await connect_raw(proxy.port)
        # Both requests in one turn: the second queues for the only
        # connection while the first is at FAPI.
        first.transport.write(b"GET /__clerk/v1/a HTTP/1.1\r\nHost: app.test\r\n\r\n")
        second.transport.write(b"GET /__clerk/v1/b HTTP/1.1\r\nHost: app.test\r\n\r\n")
        answers = [
            await within(first.waitFor(b"ok"), 5),
            await within(second.waitFor(b"\r\n\r\n"), 5),
        ]
        for answer in answers:
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:80]
        assert b"ok" in await within(second.waitFor(b"ok"), 5)
        assert _AnswerThenBadRecord.accepted == 2  # the retry's new connection
        assert errors == []
    finally:
        globalLogPublisher.removeObserver(observe)
        await port.stopListening()


def test_a_common_name_alone_does_not_name_the_server(ca: trustme.CA) -> None:
    """
    A certificate from a trusted CA that names the host only in its
    subject's common name, with no subjectAltName, is refused, as
    service_identity (Twisted's TLS) refuses it.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    issuerKey = serialization.load_pem_private_key(
        ca.private_key_pem.bytes(), password=None
    )
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=10))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(issuerKey, hashes.SHA256())  # type: ignore[arg-type]
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        cert, keyFile = Path(d) / "cert.pem", Path(d) / "key.pem"
        cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        keyFile.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        server.load_cert_chain(str(cert), str(keyFile))
    context = client_context(trust_root(ca))
    assert context is not None
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    client = context.wrap_bio(pipes[0], pipes[1], server_hostname="localhost")
    serving = server.wrap_bio(pipes[1], pipes[0], server_side=True)
    # pipes[1] carries the client's bytes to the server, pipes[0] back.
    refused = None
    for _ in range(10):
        for side in (client, serving):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as e:
                refused = e
            except ssl.SSLError:
                pass
        if refused is not None:
            break
    assert refused is not None
    assert "Hostname mismatch" in str(refused) or refused.verify_code == 62
