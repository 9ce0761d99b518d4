"""
TLS to FAPI on the standard library's C{ssl} (C{clerkproxy._upstream_tls}),
over real loopback sockets: verification, the client context and the
choice of TLS stack, the data path (held writes, large reads, both kinds
of backpressure, every way of closing), and the proxy on top.

The server is Twisted's own TLS (pyOpenSSL), an implementation independent
of the one under test, which also keeps every byte it read off TCP, the
names clients asked for (SNI) and the protocols they offered (ALPN).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import random
import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
import trustme
from conftest import parse_response, raw_request, reactor, trust_root, within
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from helpers import HEAD, Recorder
from OpenSSL import SSL, crypto
from twisted.internet import task
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    connectProtocol,
)
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    TLSVersion,
    platformTrust,
    trustRootFromCertificates,
)
from twisted.protocols.tls import (
    BufferingTLSTransport,
    TLSMemoryBIOFactory,
    TLSMemoryBIOProtocol,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from clerkproxy._client import UpstreamConnection
from clerkproxy._twisted_compat import is_platform_trust, trust_root_pems
from clerkproxy._upstream import app_endpoint, fapi_endpoint
from clerkproxy._upstream_tls import UpstreamTLS, UpstreamTLSEndpoint, client_context

#: What a client writes before its handshake: it must never leave in clear.
SECRET = b"GET /v1/client HTTP/1.1\r\nAuthorization: Bearer not-for-strangers\r\n\r\n"

# OpenSSL's verification error codes (X509_V_ERR_*).
UNTRUSTED = 20  # unable to get local issuer certificate
EXPIRED = 10  # certificate has expired
NAME_MISMATCH = 62
IP_MISMATCH = 64


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds)


async def until(what: Callable[[], object], seconds: float = 10.0) -> None:
    """Wait, a bounded number of short sleeps, for C{what()} to be true."""
    for _ in range(int(seconds / 0.01)):
        if what():
            return
        await sleep(0.01)
    raise AssertionError(f"still false after {seconds}s: {what}")


async def ended(protocol: Client | ServerApp, seconds: float = 5.0) -> Failure:
    """Wait for C{protocol} to lose its connection; the reason it was given."""
    await within(protocol.lost, seconds)
    assert protocol.reason is not None
    return protocol.reason


def unsent(transport: Any) -> int:
    """Bytes a Twisted TCP transport holds, not yet taken by its socket."""
    held = len(transport.dataBuffer) - transport.offset
    return held + sum(len(chunk) for chunk in transport._tempDataBuffer)


# -- the server: Twisted's TLS -------------------------------------------------


class ServerApp(Protocol):
    """The application above the server's TLS, for one connection."""

    def __init__(self, server: TLSServer) -> None:
        self.server = server
        self.chunks: list[bytes] = []
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.server.apps.append(self)

    @property
    def received(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def tcp(self) -> Any:
        """The TCP transport under the server's TLS."""
        return self.transport.transport

    @property
    def handle(self) -> SSL.Connection:
        return self.transport.getHandle()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if self.server.onData is not None:
            self.server.onData(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.reason = reason
        self.lost.callback(None)


class _Building(Factory):
    """A quiet factory whose protocols C{build} makes."""

    noisy = False

    def __init__(self, build: Callable[[], Protocol]) -> None:
        self.build = build

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.build()


class RecordingTLS(BufferingTLSTransport):
    """The server's TLS layer, keeping every byte that came over TCP."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.server.raw.append(data)
        super().dataReceived(data)


def _options(cert: trustme.LeafCert, **versions: Any) -> CertificateOptions:
    key = load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    chain = [
        x509.load_pem_x509_certificate(blob.bytes()) for blob in cert.cert_chain_pems
    ]
    return CertificateOptions(
        privateKey=key, certificate=chain[0], extraCertChain=chain[1:], **versions
    )


class TLSServer:
    """
    A TLS server on loopback.

    @ivar names: The SNI name of each handshake (L{None}: none sent).
    @ivar offered: The ALPN protocols each handshake offered.
    @ivar raw: Every byte read off TCP, before TLS.
    @ivar onData: Called with each application and the bytes it received.
    """

    def __init__(
        self,
        cert: trustme.LeafCert,
        onData: Callable[[ServerApp, bytes], None] | None = None,
        legacy: bool = False,
        **versions: Any,
    ) -> None:
        self.names: list[bytes | None] = []
        self.offered: list[list[bytes]] = []
        self.raw: list[bytes] = []
        self.apps: list[ServerApp] = []
        self.onData = onData
        options = _options(cert, **versions)
        context = options.getContext()
        context.set_tlsext_servername_callback(
            lambda connection: self.names.append(connection.get_servername())
        )
        context.set_alpn_select_callback(self._alpn)
        if legacy:
            # OpenSSL 3 speaks TLS 1.0 and 1.1 only at security level 0.
            context.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
        apps = _Building(lambda: ServerApp(self))
        factory = TLSMemoryBIOFactory(options, False, apps)
        factory.protocol = RecordingTLS
        factory.server = self
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.portNumber: int = self.port.getHost().port

    def _alpn(self, connection: SSL.Connection, protocols: list[bytes]) -> bytes:
        self.offered.append(list(protocols))
        if b"http/1.1" in protocols:
            return b"http/1.1"
        return SSL.NO_OVERLAPPING_PROTOCOLS

    @property
    def rawBytes(self) -> bytes:
        return b"".join(self.raw)

    async def app(self) -> ServerApp:
        await until(lambda: self.apps)
        return self.apps[0]


def upper(app: ServerApp, data: bytes) -> None:
    """Answer each read with its bytes upper-cased."""
    app.transport.write(data.upper())


# -- the client: the protocol above UpstreamTLS --------------------------------


class Client(Protocol):
    """
    The protocol above L{UpstreamTLS} (as C{UpstreamConnection} is in
    production): writes C{early} as soon as it is connected (before any
    handshake), keeps what arrives and how it ended.
    """

    def __init__(self, *early: bytes) -> None:
        self.early = early
        self.chunks: list[bytes] = []
        self.deliveries = 0  # dataReceived calls
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()
        self.namesAtConnect: list[bytes | None] | None = None
        self.onData: Callable[[Client, bytes], None] | None = None
        self.server: TLSServer | None = None

    def connectionMade(self) -> None:
        if self.server is not None:
            self.namesAtConnect = list(self.server.names)
        for data in self.early:
            self.transport.write(data)

    @property
    def received(self) -> bytes:
        if len(self.chunks) > 1:
            self.chunks = [b"".join(self.chunks)]
        return self.chunks[0] if self.chunks else b""

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        self.deliveries += 1
        if self.onData is not None:
            self.onData(self, data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        assert self.reason is None, "connectionLost twice"
        self.reason = reason
        self.lost.callback(None)


class _RelayOut(Protocol):
    def __init__(self, hop: _RelayIn) -> None:
        self.hop = hop

    def dataReceived(self, data: bytes) -> None:
        self.hop.transport.write(data)


class _RelayIn(Protocol):
    """One connection through a L{Relay}."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.pending: list[bytes] = []
        self.out: _RelayOut | None = None
        self.closed = False
        self.closedByClient: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.relay.hops.append(self)
        target = TCP4ClientEndpoint(reactor, "127.0.0.1", self.relay.target)
        connectProtocol(target, _RelayOut(self)).addCallback(self._connected)

    def _connected(self, out: _RelayOut) -> None:
        self.out = out
        for data in self.pending:
            out.transport.write(data)
        if self.closed:
            out.transport.loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.out is None:
            self.pending.append(data)
        else:
            self.out.transport.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        if self.out is not None:
            self.out.transport.loseConnection()
        self.closedByClient.callback(None)


class Relay:
    """
    A TCP hop in front of a server that passes bytes both ways but never
    closes toward the client: a client whose connection through it ends
    closed it itself.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.hops: list[_RelayIn] = []
        self.port = reactor.listenTCP(
            0, _Building(lambda: _RelayIn(self)), interface="127.0.0.1"
        )
        self.portNumber: int = self.port.getHost().port


class Rig:
    """Servers and clients made by one test, all closed after it."""

    def __init__(self, ca: trustme.CA) -> None:
        self.ca = ca
        self.servers: list[TLSServer] = []
        self.clients: list[Client] = []
        self.relays: list[Relay] = []

    def relay(self, server: TLSServer) -> Relay:
        relay = Relay(server.portNumber)
        self.relays.append(relay)
        return relay

    def server(
        self, *identities: str, ca: trustme.CA | None = None, **kw: Any
    ) -> TLSServer:
        cert = (ca or self.ca).issue_cert(*(identities or ("localhost",)))
        return self.serve(cert, **kw)

    def serve(self, cert: trustme.LeafCert, **kw: Any) -> TLSServer:
        server = TLSServer(cert, **kw)
        self.servers.append(server)
        return server

    def endpoint(
        self,
        server: TLSServer,
        hostname: str = "localhost",
        context: ssl.SSLContext | None = None,
    ) -> UpstreamTLSEndpoint:
        if context is None:
            context = client_context(trust_root(self.ca))
            assert context is not None
        tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", server.portNumber)
        return UpstreamTLSEndpoint(reactor, tcp, context, hostname)

    async def connect(
        self,
        server: TLSServer,
        client: Client | None = None,
        hostname: str = "localhost",
        context: ssl.SSLContext | None = None,
        endpoint: Any = None,
    ) -> Client:
        client = client or Client()
        client.server = server
        self.clients.append(client)
        if endpoint is None:
            endpoint = self.endpoint(server, hostname, context)
        got = await within(connectProtocol(endpoint, client))
        assert got is client  # the protocol above, not the TLS layer
        return client

    def close(self) -> None:
        waiting: list[Deferred[Any]] = []
        for client in self.clients:
            if client.reason is None and client.transport is not None:
                client.transport.abortConnection()
                waiting.append(client.lost)
        for server in self.servers:
            for app in server.apps:
                if app.reason is None:
                    app.transport.abortConnection()
                    waiting.append(app.lost)
            waiting.append(server.port.stopListening())
        for relay in self.relays:
            for hop in relay.hops:
                if not hop.closed:
                    hop.transport.abortConnection()
                    waiting.append(hop.closedByClient)
            waiting.append(relay.port.stopListening())
        pytest_twisted.blockon(within(DeferredList(waiting), 10))


@pytest.fixture
def rig(ca: trustme.CA) -> Iterator[Rig]:
    made = Rig(ca)
    yield made
    made.close()


async def failed_handshake(
    rig: Rig, server: TLSServer, alert: bool = True, **kw: Any
) -> Failure:
    """
    Connect to C{server} writing L{SECRET} before the handshake, expecting
    the handshake to fail: the reason the protocol above was given, after
    checking (once the server has read all there was) that the secret never
    reached the server, in clear or otherwise, and, with C{alert}, that the
    client said why with an alert.
    """
    before = len(server.apps)
    client = await rig.connect(server, Client(SECRET), **kw)
    reason = await ended(client)
    assert client.chunks == []
    apps = server.apps[before:]
    for app in apps:
        serverReason = await ended(app)  # read until the end
        assert app.received == b""
        if alert:
            assert serverReason.check(SSL.Error), serverReason
            assert "alert" in str(serverReason.value), serverReason
    assert SECRET not in server.rawBytes and b"Bearer" not in server.rawBytes
    return reason


def verify_error(reason: Failure) -> int:
    """The X509_V_ERR code of a certificate verification failure."""
    assert reason.check(ssl.SSLCertVerificationError), reason
    code: int = reason.value.verify_code
    return code


# -- handshake and verification ------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connects_and_exchanges_bytes(rig: Rig) -> None:
    server = rig.server(onData=upper)
    client = await rig.connect(server)
    assert isinstance(client.transport, UpstreamTLS)
    client.transport.write(b"hello over tls")
    await until(lambda: client.received == b"HELLO OVER TLS")
    app = await server.app()
    assert app.received == b"hello over tls"
    assert app.handle.get_protocol_version_name() in ("TLSv1.2", "TLSv1.3")
    assert b"hello over tls" not in server.rawBytes  # it was encrypted


@pytest_twisted.ensureDeferred
async def test_the_server_name_is_sent(rig: Rig) -> None:
    server = rig.server(onData=upper)
    client = await rig.connect(server, Client(b"x"))
    await until(lambda: client.received == b"X")
    assert server.names == [b"localhost"]


@pytest_twisted.ensureDeferred
async def test_alpn_offers_exactly_http_1_1(rig: Rig) -> None:
    server = rig.server(onData=upper)
    client = await rig.connect(server, Client(b"x"))
    await until(lambda: client.received == b"X")
    assert server.offered == [[b"http/1.1"]]
    assert (await server.app()).handle.get_alpn_proto_negotiated() == b"http/1.1"


@pytest_twisted.ensureDeferred
async def test_an_untrusted_ca_fails_the_handshake(rig: Rig) -> None:
    server = rig.server(ca=trustme.CA(), onData=upper)
    reason = await failed_handshake(rig, server)
    assert verify_error(reason) == UNTRUSTED


@pytest_twisted.ensureDeferred
async def test_a_certificate_for_another_name_fails_the_handshake(rig: Rig) -> None:
    server = rig.server("wrong.example", onData=upper)
    reason = await failed_handshake(rig, server)
    assert verify_error(reason) == NAME_MISMATCH


@pytest_twisted.ensureDeferred
async def test_an_expired_certificate_fails_the_handshake(rig: Rig) -> None:
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = rig.ca.issue_cert(
        "localhost",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    server = rig.serve(cert, onData=upper)
    reason = await failed_handshake(rig, server)
    assert verify_error(reason) == EXPIRED


@pytest_twisted.ensureDeferred
async def test_an_ip_address_is_verified_against_an_ip_san(rig: Rig) -> None:
    server = rig.server("127.0.0.1", onData=upper)
    client = await rig.connect(server, Client(b"by address"), hostname="127.0.0.1")
    await until(lambda: client.received == b"BY ADDRESS")
    assert server.names == [None]  # no SNI for an address (RFC 6066)


@pytest_twisted.ensureDeferred
async def test_an_ip_address_not_in_the_certificate_fails(rig: Rig) -> None:
    server = rig.server("localhost", "127.0.0.2", onData=upper)
    reason = await failed_handshake(rig, server, hostname="127.0.0.1")
    assert verify_error(reason) == IP_MISMATCH


@pytest_twisted.ensureDeferred
async def test_a_failed_handshake_closes_the_connection_itself(rig: Rig) -> None:
    server = rig.server("wrong.example", onData=upper)
    relay = rig.relay(server)  # never closes toward the client
    tcp = TCP4ClientEndpoint(reactor, "127.0.0.1", relay.portNumber)
    context = client_context(trust_root(rig.ca))
    assert context is not None
    endpoint = UpstreamTLSEndpoint(reactor, tcp, context, "localhost")
    client = await rig.connect(server, Client(SECRET), endpoint=endpoint)
    reason = await ended(client)  # Client asserts it hears of it only once
    assert verify_error(reason) == NAME_MISMATCH
    [hop] = relay.hops
    await within(hop.closedByClient)
    client.transport.write(b"after the failure")  # ignored, no error
    app = await server.app()
    await ended(app)
    assert b"after the failure" not in server.rawBytes
    assert SECRET not in server.rawBytes


# -- the client context and the choice of TLS stack ------------------------------


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1 is deprecated")
@pytest.mark.parametrize(
    ("version", "name"),
    [(TLSVersion.TLSv1_0, "TLSv1"), (TLSVersion.TLSv1_1, "TLSv1.1")],
)
@pytest_twisted.ensureDeferred
async def test_servers_that_speak_only_tls_1_0_or_1_1_are_refused(
    rig: Rig, version: Any, name: str
) -> None:
    server = rig.server(
        onData=upper,
        legacy=True,
        insecurelyLowerMinimumTo=version,
        lowerMaximumSecurityTo=version,
    )
    # The server really does speak that version, to a client that lets it:
    lenient = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    rig.ca.configure_trust(lenient)
    lenient.minimum_version = ssl.TLSVersion.TLSv1
    lenient.set_ciphers("DEFAULT:@SECLEVEL=0")
    control = await rig.connect(server, Client(b"old"), context=lenient)
    await until(lambda: control.received == b"OLD")
    assert server.apps[0].handle.get_protocol_version_name() == name
    # ... but not to ours (the server is the one to say so, by an alert).
    reason = await failed_handshake(rig, server, alert=False)
    assert reason.check(ssl.SSLError), reason


def test_the_client_context_verifies_and_speaks_tls_1_2_or_later(
    ca: trustme.CA,
) -> None:
    for root in (None, platformTrust(), trust_root(ca)):
        context = client_context(root)
        assert context is not None
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert context.check_hostname
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_RENEGOTIATION


@pytest_twisted.ensureDeferred
async def test_a_server_cannot_renegotiate(rig: Rig) -> None:
    def renegotiate(app: ServerApp, data: bytes) -> None:
        app.handle.renegotiate()
        with contextlib.suppress(SSL.WantReadError):
            app.handle.do_handshake()  # a HelloRequest ...
        app.transport.write(b"...and this flushes it")

    server = rig.server(onData=renegotiate, lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
    client = await rig.connect(server, Client(b"go"))
    reason = await ended(client)
    assert reason.check(ssl.SSLError), reason
    app = await server.app()
    serverReason = await ended(app)
    assert "no renegotiation" in str(serverReason.value), serverReason


def test_the_client_context_trusts_exactly_the_roots_given(ca: trustme.CA) -> None:
    context = client_context(trust_root(ca))
    assert context is not None
    [only] = context.get_ca_certs(binary_form=True)
    assert only == ssl.PEM_cert_to_DER_cert(ca.cert_pem.bytes().decode())


@pytest.mark.parametrize("root", [None, "platform"])
def test_the_platform_roots_are_the_default_ones(root: Any) -> None:
    context = client_context(platformTrust() if root else None)
    assert context is not None
    platform = ssl.create_default_context()
    assert context.cert_store_stats() == platform.cert_store_stats()


def test_platform_trust_is_told_apart_from_an_empty_root() -> None:
    """platformTrust() means the platform's roots; an empty
    trustRootFromCertificates root means none (and trusts nothing)."""
    assert is_platform_trust(platformTrust())
    assert trust_root_pems(platformTrust()) is None
    empty = trustRootFromCertificates([])
    assert not is_platform_trust(empty)
    assert trust_root_pems(empty) == b""


def test_trust_root_pems_are_the_certificates_given() -> None:
    first, second = trustme.CA(), trustme.CA()
    root = trustRootFromCertificates(
        [Certificate.loadPEM(ca.cert_pem.bytes()) for ca in (first, second)]
    )
    assert trust_root_pems(root) == first.cert_pem.bytes() + second.cert_pem.bytes()
    one = trustRootFromCertificates([Certificate.loadPEM(first.cert_pem.bytes())])
    assert trust_root_pems(one) == first.cert_pem.bytes()


@implementer(IOpenSSLTrustRoot)
class CustomRoot:
    """A kind of trust root whose certificates cannot be read back."""

    def __init__(self, ca: trustme.CA) -> None:
        self._pem = ca.cert_pem.bytes()

    def _addCACertsToContext(self, context: SSL.Context) -> None:
        store = context.get_cert_store()
        assert store is not None
        store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, self._pem))


def test_a_custom_trust_root_has_no_pems_and_no_context(ca: trustme.CA) -> None:
    assert trust_root_pems(CustomRoot(ca)) is None
    assert client_context(CustomRoot(ca)) is None


@pytest_twisted.ensureDeferred
async def test_fapi_endpoint_uses_our_tls_for_certificates_it_can_read(
    rig: Rig,
) -> None:
    server = rig.server(onData=upper)
    endpoint = fapi_endpoint(
        reactor, "localhost", server.portNumber, trust_root(rig.ca), 5.0
    )
    assert isinstance(endpoint, UpstreamTLSEndpoint)
    client = await rig.connect(server, Client(b"new"), endpoint=endpoint)
    assert isinstance(client.transport, UpstreamTLS)
    await until(lambda: client.received == b"NEW")
    assert server.names == [b"localhost"] and server.offered == [[b"http/1.1"]]


@pytest_twisted.ensureDeferred
async def test_fapi_endpoint_falls_back_to_twisted_tls_for_other_roots(
    rig: Rig,
) -> None:
    server = rig.server(onData=upper)
    endpoint = fapi_endpoint(
        reactor, "localhost", server.portNumber, CustomRoot(rig.ca), 5.0
    )
    assert not isinstance(endpoint, UpstreamTLSEndpoint)
    client = await rig.connect(server, Client(b"fallback"), endpoint=endpoint)
    assert isinstance(client.transport, TLSMemoryBIOProtocol)
    await until(lambda: client.received == b"FALLBACK")
    assert server.names == [b"localhost"] and server.offered == [[b"http/1.1"]]


@pytest_twisted.ensureDeferred
async def test_the_fallback_still_verifies_the_name(rig: Rig) -> None:
    server = rig.server("wrong.example", onData=upper)
    endpoint = fapi_endpoint(
        reactor, "localhost", server.portNumber, CustomRoot(rig.ca), 5.0
    )
    client = await rig.connect(server, Client(SECRET), endpoint=endpoint)
    await ended(client)
    for app in server.apps:
        await ended(app)
        assert app.received == b""
    assert client.chunks == [] and SECRET not in server.rawBytes


@pytest_twisted.ensureDeferred
async def test_app_endpoint_verifies_https_apps_against_the_platform(
    rig: Rig,
) -> None:
    assert isinstance(app_endpoint(reactor, "h", 1, False, 5.0), HostnameEndpoint)
    server = rig.server(onData=upper)  # from a CA the platform does not know
    endpoint = app_endpoint(reactor, "localhost", server.portNumber, True, 5.0)
    assert isinstance(endpoint, UpstreamTLSEndpoint)
    client = await rig.connect(server, Client(SECRET), endpoint=endpoint)
    reason = await ended(client)
    assert verify_error(reason) == UNTRUSTED
    for app in server.apps:
        await ended(app)
    assert SECRET not in server.rawBytes


# -- the data path -------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_writes_before_the_handshake_arrive_after_it_in_order(
    rig: Rig,
) -> None:
    server = rig.server()

    class Early(Client):
        def connectionMade(self) -> None:
            super().connectionMade()
            self.transport.writeSequence([b"three,", b"", b"four,"])

    client = Early(b"one,", b"", b"two,")
    await rig.connect(server, client)
    # Still in the turn TCP connected in: nothing, not even the
    # ClientHello, has been sent yet.
    assert client.namesAtConnect == [] and server.names == []
    client.transport.write(b"five")
    app = await server.app()
    await until(lambda: len(app.received) >= len(b"one,two,three,four,five"))
    await sleep(0.05)
    assert app.received == b"one,two,three,four,five"
    assert b"one," not in server.rawBytes


def _payload(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


@pytest_twisted.ensureDeferred
async def test_a_large_response_arrives_whole_one_delivery_per_read(
    rig: Rig,
) -> None:
    size = 6 * 1024 * 1024 + 12345
    payload = _payload(size)
    server = rig.server(onData=lambda app, data: app.transport.write(payload))
    client = await rig.connect(server, Client(b"go"))
    tls = client.transport
    perRead: list[int] = []
    below = tls.dataReceived

    def counting(data: bytes) -> None:
        before = client.deliveries
        below(data)
        perRead.append(client.deliveries - before)

    tls.dataReceived = counting  # what the TCP transport calls for each read
    await until(lambda: len(client.received) >= size, 30)
    assert client.received == payload
    assert sum(perRead) > 1  # many TLS records, several reads
    assert max(perRead) == 1  # never more than one delivery per TCP read


@implementer(IPushProducer)
class Stream:
    """
    Writes random bytes to C{transport}, 64 KiB a reactor turn, while not
    paused, until L{finish} is called (then up to C{after} bytes more) or
    C{limit} bytes in all.
    """

    limit = 256 << 20

    def __init__(self, transport: Any, seed: int) -> None:
        self.transport = transport
        self.random = random.Random(seed)
        self.sent: list[bytes] = []
        self.total = 0
        self.paused = False
        self.stopAt = self.limit
        self.done: Deferred[None] = Deferred()
        self.stopped = False

    def start(self) -> None:
        reactor.callLater(0, self._step)

    def finish(self, after: int) -> None:
        self.stopAt = min(self.limit, self.total + after)

    def _step(self) -> None:
        if self.paused or self.stopped:
            return
        if self.total >= self.stopAt:
            self.stopped = True
            self.done.callback(None)
            return
        chunk = self.random.randbytes(65536)
        self.sent.append(chunk)
        self.total += len(chunk)
        self.transport.write(chunk)
        reactor.callLater(0, self._step)

    @property
    def data(self) -> bytes:
        return b"".join(self.sent)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        if self.paused:
            self.paused = False
            reactor.callLater(0, self._step)

    def stopProducing(self) -> None:
        self.stopped = True


async def backed_up(stream: Stream, tcp: Any) -> None:
    """
    Wait for C{stream} to be paused, with bytes held in C{tcp} (the
    transport it writes to, or the one under it), and to stay so for a few
    turns: its reader has stopped reading.
    """
    for _ in range(100):
        await until(lambda: stream.paused and unsent(tcp) > 0, 30)
        total = stream.total
        await sleep(0.05)
        if stream.paused and stream.total == total and unsent(tcp) > 0:
            return
    raise AssertionError("the writer never stayed paused")


@pytest_twisted.ensureDeferred
async def test_pausing_from_above_stops_reading_and_resuming_loses_nothing(
    rig: Rig,
) -> None:
    streams: list[Stream] = []

    def serve(app: ServerApp, data: bytes) -> None:
        if not streams:
            stream = Stream(app.transport, seed=2)
            app.transport.registerProducer(stream, True)
            streams.append(stream)
            stream.start()

    def pauseAtOnce(client: Client, data: bytes) -> None:
        client.transport.pauseProducing()

    server = rig.server(onData=serve)
    client = Client(b"go")
    client.onData = pauseAtOnce
    await rig.connect(server, client)
    await until(lambda: streams)
    [stream] = streams
    app = await server.app()
    await backed_up(stream, app.tcp)  # the server's writes back up
    for _ in range(5):
        await sleep(0.02)
    assert client.deliveries == 1  # paused in the first delivery, none since
    client.onData = None
    client.transport.resumeProducing()
    stream.finish(1 << 20)
    await within(stream.done, 30)
    assert stream.total < stream.limit
    await until(lambda: len(client.received) >= stream.total, 30)
    assert client.received == stream.data


@pytest_twisted.ensureDeferred
async def test_a_request_body_producer_pauses_while_the_server_reads_nothing(
    rig: Rig,
) -> None:
    server = rig.server()
    client = await rig.connect(server, Client(b"start:"))
    app = await server.app()
    await until(lambda: app.received == b"start:")
    app.tcp.pauseProducing()  # the server stops reading
    stream = Stream(client.transport, seed=3)
    client.transport.registerProducer(stream, True)
    stream.start()
    await backed_up(stream, client.transport.transport)
    app.tcp.resumeProducing()
    stream.finish(1 << 20)
    await within(stream.done, 30)
    assert stream.total < stream.limit
    client.transport.unregisterProducer()
    await until(lambda: len(app.received) >= len(b"start:") + stream.total, 30)
    assert app.received == b"start:" + stream.data


@pytest_twisted.ensureDeferred
async def test_the_server_closing_tls_then_tcp_ends_the_connection_cleanly(
    rig: Rig,
) -> None:
    def goodbye(app: ServerApp, data: bytes) -> None:
        app.transport.write(b"goodbye")
        app.transport.loseConnection()  # close_notify
        reactor.callLater(0.05, app.tcp.loseConnection)  # and then FIN

    server = rig.server(onData=goodbye)
    client = await rig.connect(server, Client(b"bye?"))
    reason = await ended(client)
    assert client.received == b"goodbye"
    assert reason.check(ConnectionDone), reason


@pytest_twisted.ensureDeferred
async def test_a_reset_mid_response_is_a_failure(rig: Rig) -> None:
    def partly(app: ServerApp, data: bytes) -> None:
        app.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")

    server = rig.server(onData=partly)
    client = await rig.connect(server, Client(b"go"))
    await until(lambda: client.received.startswith(b"HTTP/1.1 200"))
    app = await server.app()
    # Close with SO_LINGER 0: the kernel sends RST, not FIN.
    app.tcp.getHandle().setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    app.tcp.abortConnection()
    reason = await ended(client)
    assert reason.check(ConnectionLost), reason
    assert not reason.check(ConnectionDone)


@pytest_twisted.ensureDeferred
async def test_lose_connection_says_close_notify_then_closes(rig: Rig) -> None:
    server = rig.server()
    client = await rig.connect(server, Client(b"first,"))
    app = await server.app()
    await until(lambda: app.received == b"first,")
    client.transport.write(b"last")
    client.transport.loseConnection()
    client.transport.write(b"dropped")  # after loseConnection: ignored
    appReason = await ended(app)
    assert app.received == b"first,last"
    # Twisted's TLS reports a clean close only after a close_notify (a TCP
    # close without one is an SSL.Error there).
    assert appReason.check(ConnectionDone), appReason
    reason = await ended(client)
    assert reason.check(ConnectionDone), reason


@pytest_twisted.ensureDeferred
async def test_lose_connection_during_the_handshake_sends_nothing_held(
    rig: Rig,
) -> None:
    server = rig.server()

    class Quitter(Client):
        def connectionMade(self) -> None:
            super().connectionMade()
            self.transport.loseConnection()

    client = await rig.connect(server, Quitter(SECRET))
    await ended(client)
    for app in server.apps:
        await ended(app)
    assert SECRET not in server.rawBytes
    assert all(app.received == b"" for app in server.apps)


@pytest_twisted.ensureDeferred
async def test_abort_connection_closes_at_once(rig: Rig) -> None:
    server = rig.server()
    client = await rig.connect(server, Client(b"hello,"))
    app = await server.app()
    await until(lambda: app.received == b"hello,")
    client.transport.abortConnection()
    reason = await ended(client, 2)
    assert reason.check(ConnectionAborted), reason
    client.transport.write(b"after the abort")  # ignored, no error
    appReason = await ended(app)
    assert not appReason.check(ConnectionDone)  # no close_notify
    assert app.received == b"hello,"


@pytest_twisted.ensureDeferred
async def test_stop_producing_aborts(rig: Rig) -> None:
    server = rig.server()
    client = await rig.connect(server, Client(b"x"))
    app = await server.app()
    await until(lambda: app.received == b"x")
    client.transport.stopProducing()
    reason = await ended(client, 2)
    assert reason.check(ConnectionAborted), reason


@pytest_twisted.ensureDeferred
async def test_the_writes_of_a_turn_leave_in_one_send(rig: Rig) -> None:
    server = rig.server()
    client = await rig.connect(server, Client(b"x"))
    app = await server.app()
    await until(lambda: app.received == b"x")
    tcp = client.transport.transport
    sends: list[int] = []
    below = tcp.writeSomeData

    def counting(data: bytes) -> Any:
        sends.append(len(data))
        return below(data)

    tcp.writeSomeData = counting
    client.transport.write(b"one,")
    client.transport.write(b"two,")
    client.transport.writeSequence([b"three,", b"four"])
    assert sends == []  # not yet: at the end of the turn
    await until(lambda: app.received == b"xone,two,three,four")
    assert len(sends) == 1


@pytest_twisted.ensureDeferred
async def test_an_upstream_connection_exchanges_over_it(rig: Rig) -> None:
    def answer(app: ServerApp, data: bytes) -> None:
        if app.received.endswith(b"\r\n\r\n"):
            app.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = rig.server(onData=answer)
    idle: list[UpstreamConnection] = []
    connection = UpstreamConnection(onIdle=idle.append)
    endpoint = rig.endpoint(server)
    got = await within(connectProtocol(endpoint, connection))
    assert got is connection and isinstance(connection.transport, UpstreamTLS)
    tcp = connection.transport.transport
    # TCP_NODELAY reached the socket under the TLS layer.
    assert tcp.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    exchange = Recorder()
    connection.send(exchange, HEAD, False, None)
    await until(lambda: idle)
    assert [e[0] for e in exchange.events] == ["start", "data", "done"]
    assert exchange.events[1] == ("data", b"ok")
    assert (await server.app()).received == HEAD
    connection.close()
    await until(lambda: connection.state == "LOST")


@pytest_twisted.ensureDeferred
async def test_get_peer_and_get_host_are_the_tcp_connections(rig: Rig) -> None:
    server = rig.server()
    client = await rig.connect(server, Client(b"x"))
    app = await server.app()
    peer, host = client.transport.getPeer(), client.transport.getHost()
    assert (peer.host, peer.port) == ("127.0.0.1", server.portNumber)
    serverSide = app.tcp.getPeer()
    assert (host.host, host.port) == (serverSide.host, serverSide.port)
    assert peer.port != host.port


# -- through the proxy ---------------------------------------------------------------


def _scraped_upstream_errors(proxy: Any) -> dict[str, float]:
    """clerkproxy_upstream_errors_total as /metrics shows it."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from clerkproxy._metrics import MetricsCollector

    registry = CollectorRegistry()
    registry.register(MetricsCollector(proxy.resource.metrics))
    text = generate_latest(registry).decode()
    return {
        sample.labels["kind"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "clerkproxy_upstream_errors_total"
    }


@pytest_twisted.ensureDeferred
async def test_a_fapi_with_the_wrong_name_is_a_502_counted_as_tls(
    make_proxy: Any, rig: Rig
) -> None:
    server = rig.server("wrong.example", onData=upper)
    proxy = make_proxy(fapi_url=f"https://localhost:{server.portNumber}")
    endpoint = proxy.resource.upstream._endpoint
    assert isinstance(endpoint, UpstreamTLSEndpoint)  # the standard library's TLS
    data = await raw_request(
        proxy.port,
        b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        15,
    )
    status, _, body = parse_response(data)
    assert status == 502
    assert json.loads(body)["errors"][0]["code"] == "proxy_request_failed"
    assert server.names and set(server.names) == {b"localhost"}
    assert all(app.received == b"" for app in server.apps)
    assert b"/v1/client" not in server.rawBytes
    assert proxy.resource.metrics.upstreamErrors == {"tls": 1}
    assert _scraped_upstream_errors(proxy) == {"tls": 1.0}
