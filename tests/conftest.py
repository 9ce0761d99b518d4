"""Shared fixtures: a TLS stand-in FAPI, a proxy in front of it, clients."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
import trustme
from standin import Recorder, make_site
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import Certificate, trustRootFromCertificates

from clerkproxy import FrontendAPIProxy, ProxyConfig, build_site
from clerkproxy._tcp_compat import coalesce_port
from clerkproxy._upstream import UpstreamPool

reactor: Any = _reactor
SECRET = "sk_live_" + "s3cr3t" * 6
PROXY_URL = "https://app.test/__clerk"


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


class FAPI:
    def __init__(self, ca: trustme.CA) -> None:
        self.recorder = Recorder()
        self.site = make_site(self.recorder, reactor)
        cert = ca.issue_cert("localhost", "127.0.0.1")
        options = _server_options(cert)
        self.server_names: list[bytes | None] = []
        options.getContext().set_tlsext_servername_callback(
            lambda connection: self.server_names.append(connection.get_servername())
        )
        self.port = reactor.listenSSL(0, self.site, options, interface="127.0.0.1")
        self.url = f"https://localhost:{self.port.getHost().port}"

    @property
    def seen(self) -> list[dict[str, Any]]:
        return self.recorder.seen

    def header(self, name: str, index: int = -1) -> list[str]:
        return [v for n, v in self.seen[index]["headers"] if n.lower() == name.lower()]


def _server_options(cert: trustme.LeafCert) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from twisted.internet.ssl import CertificateOptions

    key = load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    chain = [
        x509.load_pem_x509_certificate(blob.bytes()) for blob in cert.cert_chain_pems
    ]
    return CertificateOptions(
        privateKey=key, certificate=chain[0], extraCertChain=chain[1:]
    )


@pytest.fixture
def fapi(ca: trustme.CA) -> Iterator[FAPI]:
    server = FAPI(ca)
    yield server
    for request in server.recorder.stalled:
        if not request.finished and request.channel is not None:
            request.channel.transport.abortConnection()
    pytest_twisted.blockon(maybeDeferred(server.port.stopListening))


def trust_root(ca: trustme.CA) -> Any:
    return trustRootFromCertificates([Certificate.loadPEM(ca.cert_pem.bytes())])


class Proxy:
    def __init__(self, resource: FrontendAPIProxy, site: Any) -> None:
        self.resource = resource
        self.site = site
        # Listening as --port does: connections get the coalescing transport.
        self.listening = coalesce_port(
            reactor.listenTCP(0, site, interface="127.0.0.1")
        )
        self.port = self.listening.getHost().port
        self.url = f"http://127.0.0.1:{self.port}"


@pytest.fixture
def make_proxy(ca: trustme.CA, fapi: FAPI) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def make(
        site_factory: Callable[..., Any] | None = None,
        endpoint: Any = None,
        **overrides: Any,
    ) -> Proxy:
        """
        A proxy to the stand-in FAPI, on loopback.

        @param endpoint: Where the pool connects instead of FAPI.
        """
        settings: dict[str, Any] = {
            "proxy_url": PROXY_URL,
            "secret_key": SECRET,
            "fapi_url": fapi.url,
            "upstream_timeout": 5.0,
            "connect_timeout": 5.0,
        }
        settings.update(overrides)
        config = ProxyConfig(**settings)
        upstream = None
        if endpoint is not None:
            upstream = UpstreamPool(
                reactor,
                endpoint,
                maxConnections=config.pool_size,
                idleTimeout=config.pool_idle_timeout,
            )
        resource = FrontendAPIProxy(
            config, reactor, trustRoot=trust_root(ca), upstream=upstream
        )
        site = (site_factory or build_site)(resource, reactor)
        proxy = Proxy(resource, site)
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        pytest_twisted.blockon(proxy.listening.stopListening())
        pytest_twisted.blockon(proxy.resource.upstream.close())


@pytest.fixture
def proxy(make_proxy: Callable[..., Proxy]) -> Proxy:
    return make_proxy()


class RawClient(Protocol):
    """Sends bytes as told, collects everything until the server closes."""

    def __init__(self) -> None:
        self._chunks: list[bytes] = []
        self.closed: Deferred[bytes] = Deferred()
        self._waiters: list[tuple[bytes, Deferred[bytes]]] = []

    @property
    def received(self) -> bytes:
        if len(self._chunks) > 1:
            self._chunks = [b"".join(self._chunks)]
        return self._chunks[0] if self._chunks else b""

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)
        for item in list(self._waiters):
            marker, d = item
            if marker in self.received:
                self._waiters.remove(item)
                d.callback(self.received)

    def waitFor(self, marker: bytes) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        if marker in self.received:
            d.callback(self.received)
        else:
            self._waiters.append((marker, d))
        return d

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(self.received)


async def connect_raw(port: int) -> RawClient:
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    return client


def within(d: Deferred[Any], seconds: float = 5.0) -> Deferred[Any]:
    """Fail the test rather than hang when something never happens."""
    return d.addTimeout(seconds, reactor)


async def raw_request(port: int, payload: bytes, seconds: float = 5.0) -> bytes:
    client = await connect_raw(port)
    client.transport.write(payload)
    return await within(client.closed, seconds)


def parse_response(data: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.append((name.strip().lower(), value.strip()))
    return status, headers, body
