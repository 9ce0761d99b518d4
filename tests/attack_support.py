"""
Support for the I/O attack probes (C{test_attack_io.py} and
C{test_attack_io_bugs.py}): a FAPI stand-in whose TLS the test drives byte
by byte (the standard library's C{ssl} over memory buffers, server side),
a proxy in front of it listening exactly as C{twistd clerkproxy} does (a
coalescing port from L{clerkproxy._endpoints.server_endpoint}, the pool on
L{clerkproxy._upstream.fapi_endpoint}), and a log watcher.
"""

from __future__ import annotations

import ctypes
import gc
import re
import ssl
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
import trustme
from conftest import SECRET, reactor, trust_root
from twisted.internet import task, tcp
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import provider

from clerkproxy import FrontendAPIProxy, ProxyConfig, build_site
from clerkproxy._endpoints import _server_endpoint, server_endpoint
from clerkproxy._tcp_compat import CoalescingServer
from clerkproxy._tls import ReloadableServerTLS

PROXY_URL = "https://app.test/__clerk"
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)", re.IGNORECASE)


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds)


async def until(condition: Callable[[], bool], what: str, seconds: float = 5.0) -> None:
    """Poll the real reactor, boundedly."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await sleep(0.01)
    raise AssertionError(f"never happened: {what}")


# -- the log ------------------------------------------------------------------


class LogWatch:
    """Every log event, as text (failures with their tracebacks)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.texts: list[str] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        text = formatEvent(event) or ""
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            text += "\n" + failure.getTraceback()
        self.texts.append(text)

    @property
    def errors(self) -> list[str]:
        """Error and critical events, Unhandled Error and failures included."""
        return [
            text
            for event, text in zip(self.events, self.texts, strict=True)
            if "log_failure" in event
            or event.get("log_level") in (LogLevel.error, LogLevel.critical)
        ]

    def mentions(self, needle: str) -> list[str]:
        return [text for text in self.texts if needle in text]


@pytest.fixture
def log() -> Iterator[LogWatch]:
    watch = LogWatch()
    observer = provider(ILogObserver)(watch)
    globalLogPublisher.addObserver(observer)
    try:
        yield watch
    finally:
        globalLogPublisher.removeObserver(observer)
    # Nothing may ever put the secret into a log line.
    assert watch.mentions(SECRET) == []
    assert watch.mentions(SECRET[-12:]) == []


# -- a FAPI whose TLS the test drives ------------------------------------------


class Peer(Protocol):
    """
    One connection to L{HostileFAPI}: the server side of TLS on
    C{ssl.SSLObject}, or raw bytes when the server is not speaking TLS.
    """

    def __init__(self, server: HostileFAPI) -> None:
        self.server = server
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = server.context.wrap_bio(
            self.incoming, self.outgoing, server_side=True
        )
        self.handshaken = False
        self.raw = bytearray()  # every byte received, as received
        self.plain = bytearray()  # decrypted bytes not yet taken as requests
        self.received = 0  # decrypted bytes, all told
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body)
        self._head: bytes | None = None  # a head whose body is still due
        self._due = 0
        self.closeNotified = False  # the client said close_notify
        self.tlsError: ssl.SSLError | None = None
        self.lost: Deferred[None] = Deferred()
        self.gone = False

    def connectionMade(self) -> None:
        self.server.peers.append(self)
        self.server.onConnect(self)

    def dataReceived(self, data: bytes) -> None:
        self.raw += data
        if not self.server.tlsOn:
            self.server.onRaw(self, data)
            return
        self.incoming.write(data)
        if not self.handshaken:
            if not self.server.handshake:
                return  # a server that never answers the ClientHello
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self.pump()
                return
            except ssl.SSLError as e:
                self.tlsError = e
                self.pump()
                self.transport.loseConnection()  # type: ignore[union-attr]
                return
            self.handshaken = True
            self.pump()
            self.server.onHandshake(self)
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLError as e:
                self.tlsError = e
                break
            if not chunk:
                self.closeNotified = True
                break
            self.received += len(chunk)
            self.plain += chunk
        self.pump()
        self._takeRequests()

    def _takeRequests(self) -> None:
        while True:
            if self._head is None:
                end = self.plain.find(b"\r\n\r\n")
                if end < 0:
                    return
                self._head = bytes(self.plain[:end])
                del self.plain[: end + 4]
                found = _LENGTH.search(self._head)
                self._due = int(found.group(1)) if found else 0
            if len(self.plain) < self._due:
                return
            head, body = self._head, bytes(self.plain[: self._due])
            del self.plain[: self._due]
            self._head = None
            self.requests.append((head, body))
            self.server.onRequest(self, head, body)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.gone = True
        self.server.onLost(self)
        self.lost.callback(None)

    # -- what a test makes it do --------------------------------------------

    def pump(self) -> None:
        data = self.outgoing.read()
        if data and not self.gone:
            self.transport.write(data)  # type: ignore[union-attr]

    def records(self, plaintext: bytes) -> bytes:
        """C{plaintext} as TLS records, not sent."""
        self.tls.write(plaintext)
        return self.outgoing.read()

    def send(self, plaintext: bytes) -> None:
        self.tls.write(plaintext)
        self.pump()

    def sendRaw(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def closeNotify(self) -> None:
        try:
            self.tls.unwrap()
        except ssl.SSLError:
            pass  # the client's close_notify is not awaited
        self.pump()

    def fin(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def reset(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]

    def pauseReading(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeReading(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def keyUpdate(self, requested: bool = True) -> bool:
        """
        Send a TLS 1.3 KeyUpdate (asking the client to update too): the
        standard library has no call for it, so OpenSSL's own is called on
        the C{SSL *} the C{_ssl} object wraps.  Whether it could be done.
        """
        return _key_update(self.tls, requested) and (self.pump() is None)


def _key_update(tls: ssl.SSLObject, requested: bool) -> bool:
    try:
        libssl = ctypes.CDLL("libssl.so.3")
    except OSError:
        return False
    libssl.SSL_version.argtypes = [ctypes.c_void_p]
    libssl.SSL_key_update.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libssl.SSL_do_handshake.argtypes = [ctypes.c_void_p]
    # CPython's PySSLSocket: PyObject_HEAD, PyObject *Socket, SSL *ssl.
    obj = tls._sslobj  # type: ignore[attr-defined]
    pointer = ctypes.c_void_p.from_address(id(obj) + 3 * ctypes.sizeof(ctypes.c_void_p))
    if not pointer.value or libssl.SSL_version(pointer.value) != 0x0304:
        return False
    if libssl.SSL_key_update(pointer.value, 1 if requested else 0) != 1:
        return False
    libssl.SSL_do_handshake(pointer.value)  # writes the KeyUpdate out
    return True


class HostileFAPI:
    """
    A TCP server on loopback that a test scripts: by default it completes
    handshakes and answers nothing; set the C{on*} hooks.

    @ivar tlsOn: Speak TLS (else C{onRaw} gets the bytes as they come).
    @ivar handshake: Answer ClientHellos (else the handshake stalls).
    """

    def __init__(
        self,
        ca: trustme.CA,
        names: tuple[str, ...] = ("localhost", "127.0.0.1"),
        maxVersion: ssl.TLSVersion | None = None,
        cert: trustme.LeafCert | None = None,
        interface: str = "127.0.0.1",
    ) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        (cert or ca.issue_cert(*names)).configure_cert(self.context)
        if maxVersion is not None:
            self.context.maximum_version = maxVersion
        self.sni: list[str | None] = []

        def sni(obj: Any, name: str | None, context: Any) -> None:
            self.sni.append(name)

        self.context.sni_callback = sni
        self.alpn: list[str | None] = []
        self.context.set_alpn_protocols(["http/1.1"])
        self.tlsOn = True
        self.handshake = True
        self.peers: list[Peer] = []
        self.onConnect: Callable[[Peer], None] = lambda peer: None
        self.onRaw: Callable[[Peer, bytes], None] = lambda peer, data: None
        self.onHandshake: Callable[[Peer], None] = lambda peer: None
        self.onRequest: Callable[[Peer, bytes, bytes], None] = lambda p, h, b: None
        self.onLost: Callable[[Peer], None] = lambda peer: None
        factory = Factory.forProtocol(lambda: Peer(self))
        factory.noisy = False
        self.port = reactor.listenTCP(0, factory, interface=interface)
        self.portNumber: int = self.port.getHost().port

    def answer(self, body: Callable[[bytes], bytes] = lambda head: b"ok") -> None:
        """Answer every request: C{200}, C{Content-Length}, kept alive."""

        def onRequest(peer: Peer, head: bytes, _: bytes) -> None:
            data = body(head)
            peer.send(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)
            )

        self.onRequest = onRequest

    @property
    def open(self) -> list[Peer]:
        return [peer for peer in self.peers if not peer.gone]

    def stop(self) -> None:
        for peer in self.open:
            peer.reset()
        pytest_twisted.blockon(self.port.stopListening())


@pytest.fixture
def hostile(ca: trustme.CA) -> Iterator[Callable[..., HostileFAPI]]:
    made: list[HostileFAPI] = []

    def make(**kwargs: Any) -> HostileFAPI:
        server = HostileFAPI(ca, **kwargs)
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()


# -- the proxy, listening as twistd clerkproxy does -------------------------------


class EdgeProxy:
    def __init__(self, resource: FrontendAPIProxy, port: Any) -> None:
        self.resource = resource
        self.listening = port
        self.port: int = port.getHost().port
        self.pool = resource.upstream
        self.metrics = resource.metrics


@pytest.fixture
def edge(ca: trustme.CA) -> Iterator[Callable[..., Deferred[EdgeProxy]]]:
    """
    C{await edge(fapiPort, **config)}: a proxy on a coalescing port, its
    pool connecting with the production FAPI endpoint (our upstream TLS,
    trusting the test CA).
    """
    started: list[EdgeProxy] = []

    async def start(
        fapiPort: int,
        host: str = "localhost",
        listenTLS: Any = None,
        coalesce: bool = True,
        **overrides: Any,
    ) -> Any:
        settings: dict[str, Any] = {
            "proxy_url": PROXY_URL,
            "secret_key": SECRET,
            "fapi_url": f"https://{host}:{fapiPort}",
            "upstream_timeout": 5.0,
            "connect_timeout": 5.0,
        }
        settings.update(overrides)
        trust = settings.pop("trustRoot", trust_root(ca))
        resource = FrontendAPIProxy(ProxyConfig(**settings), reactor, trustRoot=trust)
        site = build_site(resource, reactor)
        description = "tcp:0:interface=127.0.0.1"
        if listenTLS is not None:
            description = "tls:" + description
        if coalesce:
            endpoint = server_endpoint(reactor, description, listenTLS)
        else:  # Twisted's own transport, for comparison
            endpoint = _server_endpoint(reactor, description, listenTLS)
        port = await endpoint.listen(site)
        assert port.transport is (CoalescingServer if coalesce else tcp.Server)
        proxy = EdgeProxy(resource, port)
        started.append(proxy)
        return proxy

    def startDeferred(fapiPort: int, **overrides: Any) -> Deferred[EdgeProxy]:
        return Deferred.fromCoroutine(start(fapiPort, **overrides))

    yield startDeferred
    for proxy in started:
        pytest_twisted.blockon(proxy.listening.stopListening())
        pytest_twisted.blockon(proxy.pool.close())


def server_transports(proxy: EdgeProxy) -> list[CoalescingServer]:
    """The proxy's client connections still open (found by the GC)."""
    return [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, CoalescingServer)
        and obj.server is proxy.listening
        and obj.connected
    ]


def server_tls(ca: trustme.CA, where: Any) -> ReloadableServerTLS:
    """The proxy's own certificate, as C{--tls-cert}/C{--tls-key} give it."""
    leaf = ca.issue_cert("localhost")
    cert, key = where / "cert.pem", where / "key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return ReloadableServerTLS(str(cert), str(key))


class TLSClient(Protocol):
    """
    A client speaking TLS with the standard library over memory buffers,
    so that the test sees exactly how the server ends the connection:
    C{closeNotify} is set if a close_notify arrived before the end.
    """

    def __init__(self, ca: trustme.CA, request: bytes) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ca.configure_trust(context)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(
            self.incoming, self.outgoing, server_hostname="localhost"
        )
        self.request = request
        self.handshaken = False
        self.plain = b""
        self.closeNotify = False
        self.lost: Deferred[list[Failure]] = Deferred()

    def _pump(self) -> None:
        data = self.outgoing.read()
        if data:
            self.transport.write(data)  # type: ignore[union-attr]

    def connectionMade(self) -> None:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            pass
        self._pump()

    def dataReceived(self, data: bytes) -> None:
        self.incoming.write(data)
        if not self.handshaken:
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._pump()
                return
            self.handshaken = True
            self.tls.write(self.request)
            self._pump()
        while not self.closeNotify:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                break
            if not chunk:
                self.closeNotify = True
                break
            self.plain += chunk

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost.callback([reason])
