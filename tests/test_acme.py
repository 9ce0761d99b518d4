"""Automatic certificates, against a real Pebble on loopback."""

from __future__ import annotations

import os
import socket
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from pebble import Pebble, needs_pebble
from twisted.internet import reactor as _reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Site

from clerkproxy._acme import (
    HTTP_01,
    TLS_ALPN_01,
    AcmeManager,
    AcmeSettings,
    Http01Responses,
)
from clerkproxy._sni import SNIServerTLS

reactor: Any = _reactor
pytestmark = needs_pebble


class Hello(Resource):
    isLeaf = True

    def render_GET(self, request: Any) -> bytes:
        return b"hello"


class Edge:
    """A TLS listener (SNI) and a plain one (http-01), as the proxy has."""

    def __init__(self, pebble: Pebble) -> None:
        self.tls = SNIServerTLS()
        self.http01 = Http01Responses()
        root = Resource()
        wellKnown = Resource()
        wellKnown.putChild(b"acme-challenge", self.http01)
        root.putChild(b".well-known", wellKnown)
        root.putChild(b"hello", Hello())
        self.site = Site(root)
        self.tlsPort = reactor.listenSSL(
            pebble.tlsPort, Site(Hello()), self.tls, interface="127.0.0.1"
        )
        self.httpPort = reactor.listenTCP(
            pebble.httpPort, self.site, interface="127.0.0.1"
        )
        self.managers: list[AcmeManager] = []

    def manager(
        self, pebble: Pebble, path: Path, *names: str, **kw: Any
    ) -> AcmeManager:
        challenges = kw.pop("challenges", (TLS_ALPN_01, HTTP_01))
        settings = AcmeSettings(
            domains=names,
            path=str(path),
            directory=pebble.directory,
            email="ops@example.com",
            ca=pebble.ca,
            challenges=challenges,
        )
        manager = AcmeManager(
            reactor, settings, self.tls, self.http01, retryBase=0.2, **kw
        )
        self.managers.append(manager)
        return manager

    async def close(self) -> None:
        for manager in self.managers:
            manager.stop()
        await maybeDeferred(self.tlsPort.stopListening)
        await maybeDeferred(self.httpPort.stopListening)


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    server = Pebble(tmp_path / "pebble")
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def events() -> Iterator[list[str]]:
    """What the manager logged, shown when a test fails."""
    seen: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "clerkproxy":
            seen.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    LOGGED[:] = []
    yield seen
    globalLogPublisher.removeObserver(observe)


LOGGED: list[str] = []


async def until(condition: Any, what: str, seconds: float = 60.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


def fetch_certificate(port: int, name: str, root: bytes) -> dict[str, Any]:
    """Handshake as an ordinary client trusting only Pebble's root."""
    context = ssl.create_default_context(cadata=root.decode("ascii"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            peer: dict[str, Any] = tls.getpeercert()
            peer["der"] = tls.getpeercert(binary_form=True)
            return peer


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("challenge", [TLS_ALPN_01, HTTP_01])
async def test_first_certificate(
    pebble: Pebble, tmp_path: Path, challenge: str, events: list[str]
) -> None:
    edge = Edge(pebble)
    try:
        name = f"{challenge.replace('-', '')}.example.test"
        manager = edge.manager(pebble, tmp_path / "acme", name, challenges=(challenge,))
        # Before a certificate exists, ordinary clients fail cleanly.
        root = pebble.root()
        with pytest.raises(ssl.SSLError):
            await deferToThread(fetch_certificate, pebble.tlsPort, name, root)
        assert manager.missing() == [name]
        manager.start()
        await until(lambda: not manager.missing() or manager.failures, "a try")
        assert not manager.missing(), (events, pebble.log())
        peer = await deferToThread(fetch_certificate, pebble.tlsPort, name, root)
        assert ("DNS", name) in peer["subjectAltName"]
        assert manager.issued == 1 and manager.failures == 0
        acme = tmp_path / "acme"
        assert stat.S_IMODE(os.stat(acme).st_mode) == 0o700
        for path in [acme / "account.key", *sorted((acme / "certs").iterdir())]:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    finally:
        await edge.close()


@pytest_twisted.ensureDeferred
async def test_restart_reuses_the_certificate_on_disk(
    pebble: Pebble, tmp_path: Path, events: list[str]
) -> None:
    edge = Edge(pebble)
    try:
        name = "restart.example.test"
        first = edge.manager(pebble, tmp_path / "acme", name)
        first.start()
        await until(lambda: not first.missing() or first.failures, "a try")
        assert not first.missing(), events
        first.stop()
        served = await deferToThread(
            fetch_certificate, pebble.tlsPort, name, pebble.root()
        )
        # A new process: a new listener, the same directory.
        edge.tls = SNIServerTLS()
        second = edge.manager(pebble, tmp_path / "acme", name)
        second.start()
        assert second.missing() == []
        assert second.issued == 0
        assert any("using the certificate in" in line for line in events)
        key = edge.tls._lookup(name)
        assert key is not None and key.notAfter.timestamp() == pytest.approx(
            ssl.cert_time_to_seconds(served["notAfter"]), abs=1
        )
    finally:
        await edge.close()


def _get(tls: ssl.SSLSocket) -> bytes:
    tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(b"hello"):
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.fixture
def short_lived(tmp_path: Path) -> Iterator[Pebble]:
    """Pebble issuing certificates that live 12 seconds."""
    server = Pebble(tmp_path / "pebble", validity=12)
    yield server
    server.stop()


@pytest_twisted.ensureDeferred
async def test_renewal_swaps_without_dropping_and_failure_keeps_the_old(
    short_lived: Pebble, tmp_path: Path, events: list[str]
) -> None:
    pebble = short_lived
    edge = Edge(pebble)
    failures: list[int] = []
    try:
        name = "renew.example.test"
        manager = edge.manager(
            pebble,
            tmp_path / "acme",
            name,
            challenges=(HTTP_01,),
            onFailure=lambda: failures.append(1),
        )
        manager.start()
        await until(lambda: manager.issued or manager.failures, "a try")
        assert manager.issued == 1, events
        root = pebble.root()
        first = await deferToThread(fetch_certificate, pebble.tlsPort, name, root)
        # A connection open across the renewal keeps working.
        context = ssl.create_default_context(cadata=root.decode("ascii"))

        def connect() -> ssl.SSLSocket:
            raw = socket.create_connection(("127.0.0.1", pebble.tlsPort), timeout=5)
            return context.wrap_socket(raw, server_hostname=name)

        kept = await deferToThread(connect)
        assert (await deferToThread(_get, kept)).endswith(b"hello")

        # Renewal fails while nothing answers http-01: the old certificate stays.
        await edge.httpPort.stopListening()
        await until(lambda: manager.failures, "a failed renewal", 30)
        assert failures
        assert manager.issued == 1
        line = [e for e in events if "failed" in e][0]
        assert name in line and "keeping the current certificate" in line
        still = await deferToThread(fetch_certificate, pebble.tlsPort, name, root)
        assert still["der"] == first["der"]

        # http-01 answers again: the next retry renews.
        edge.httpPort = reactor.listenTCP(
            pebble.httpPort, edge.site, interface="127.0.0.1"
        )
        await until(lambda: manager.issued == 2, "a renewal", 30)
        renewed = await deferToThread(fetch_certificate, pebble.tlsPort, name, root)
        assert renewed["der"] != first["der"]
        assert (await deferToThread(_get, kept)).endswith(b"hello")
        kept.close()
    finally:
        await edge.close()


@pytest_twisted.ensureDeferred
async def test_two_sites_get_certificates_and_proxy(
    pebble: Pebble, tmp_path: Path, events: list[str], fapi: Any, ca: Any
) -> None:
    """The whole edge: a config file, Pebble, /readyz, both sites proxying."""
    from helpers import KEY_A, KEY_B, _read_response, settings_for
    from pebble import free_port

    from clerkproxy._endpoints import server_endpoint
    from clerkproxy._serve import build_service

    admin = free_port()
    (tmp_path / "a.key").write_text(KEY_A)
    ca.cert_pem.write_to_path(str(tmp_path / "fapi-ca.pem"))
    config = tmp_path / "sites.toml"
    config.write_text(
        f"""
port = ["tls:tcp:{pebble.tlsPort}:interface=127.0.0.1",
        "tcp:{pebble.httpPort}:interface=127.0.0.1"]
fapi = "{fapi.url}"
fapi_ca = "fapi-ca.pem"
admin_port = "tcp:{admin}:interface=127.0.0.1"

[acme]
directory = "{pebble.directory}"
ca = "{pebble.ca}"
dir = "acme"

[[site]]
proxy_url = "https://one.example.test/__clerk"
secret_key_file = "a.key"
acme = true

[[site]]
hosts = ["two.example.test"]
proxy_url = "https://two.example.test/__clerk"
secret_key_env = "KEY_FOR_B"
acme = true
"""
    )
    settings = settings_for(["--config", str(config)])
    assert settings.redirectHTTP
    endpoints = [server_endpoint(reactor, d, settings.tls) for d in settings.ports]
    service = build_service(settings, reactor, endpoints, installSignals=False)

    def readyz() -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", admin), timeout=5) as s:
            s.sendall(b"GET /readyz HTTP/1.0\r\n\r\n")
            status, _, body = _read_response(s)
            return status, body

    service.startService()
    try:
        status, body = await deferToThread(readyz)
        assert status == 503 and b"no certificate yet" in body
        await until(
            lambda: service._acme.issued == 2 or service._acme.failures, "certs"
        )
        assert service._acme.issued == 2, (events, pebble.log())
        assert (await deferToThread(readyz))[0] == 200
        root = pebble.root()
        context = ssl.create_default_context(cadata=root.decode("ascii"))

        def get(name: str) -> tuple[int, dict[bytes, bytes], bytes]:
            raw = socket.create_connection(("127.0.0.1", pebble.tlsPort), timeout=5)
            with context.wrap_socket(raw, server_hostname=name) as tls:
                tls.sendall(
                    f"GET /__clerk/v1/client HTTP/1.1\r\nHost: {name}\r\n\r\n".encode()
                )
                return _read_response(tls)

        for name in ["one.example.test", "two.example.test"]:
            assert (await deferToThread(get, name))[0] == 200
        keys = [
            [v for n, v in seen["headers"] if n.lower() == "clerk-secret-key"]
            for seen in fapi.seen
        ]
        assert keys == [[KEY_A], [KEY_B]]

        def plain(path: str) -> tuple[int, dict[bytes, bytes], bytes]:
            with socket.create_connection(
                ("127.0.0.1", pebble.httpPort), timeout=5
            ) as s:
                s.sendall(
                    f"GET {path} HTTP/1.1\r\nHost: two.example.test\r\n\r\n".encode()
                )
                return _read_response(s)

        status, headers, _ = await deferToThread(plain, "/__clerk/v1/client")
        assert status == 308
        assert headers[b"location"] == b"https://two.example.test/__clerk/v1/client"
        # Challenge paths are never redirected (no challenge is pending now).
        status, _, _ = await deferToThread(plain, "/.well-known/acme-challenge/x")
        assert status == 404

        def metrics() -> str:
            with socket.create_connection(("127.0.0.1", admin), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                return _read_response(s)[2].decode()

        text = await deferToThread(metrics)
        assert 'clerkproxy_certificate_expiry_seconds{name="two.example.test"}' in text
        assert "clerkproxy_acme_failures_total 0.0" in text
        assert (
            'clerkproxy_site_requests_total{code="200",site="one.example.test"} 1.0'
            in text
        )
    finally:
        await service.stopService()


@pytest_twisted.ensureDeferred
async def test_renewal_over_tls_alpn_while_serving(
    short_lived: Pebble, tmp_path: Path, events: list[str]
) -> None:
    """tls-alpn-01 for a name that already has a certificate: the validator
    gets the challenge, ordinary clients the real certificate."""
    pebble = short_lived
    edge = Edge(pebble)
    try:
        name = "alpn-renew.example.test"
        manager = edge.manager(
            pebble, tmp_path / "acme", name, challenges=(TLS_ALPN_01,)
        )
        manager.start()
        await until(lambda: manager.issued == 2 or manager.failures, "a renewal", 30)
        assert manager.issued == 2 and manager.failures == 0, (events, pebble.log())
        peer = await deferToThread(
            fetch_certificate, pebble.tlsPort, name, pebble.root()
        )
        assert ("DNS", name) in peer["subjectAltName"]
    finally:
        await edge.close()
