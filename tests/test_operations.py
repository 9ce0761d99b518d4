"""
Running it at the edge, over real sockets: drain on SIGTERM, certificate
reload on SIGHUP, metrics and health, the access log, app routing, and
PROXY protocol with TLS behind it.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from conftest import SECRET, connect_raw, parse_response, raw_request, reactor, within
from helpers import (
    AppEcho,
    edge_with_app,
    free_port,
    start_against,
    start_with_admin,
    wait_listening,
)
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import task
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.threads import deferToThread
from twisted.web.server import Site

from clerkproxy import build_site
from clerkproxy._accesslog import AccessLog
from clerkproxy._admin import admin_site


def sleep(seconds: float) -> Any:
    return task.deferLater(reactor, seconds)


async def admin_get(port: int, path: str) -> tuple[int, bytes]:
    data = await raw_request(
        port,
        f"GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n".encode(),
    )
    status, _, body = parse_response(data)
    return status, body


# -- drain ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_in_flight_requests_then_exits_zero(
    fapi: Any, ca: trustme.CA, tmp_path: Path
) -> None:
    process, port, admin = start_with_admin(fapi, ca, tmp_path, "--drain-timeout", "10")
    await deferToThread(wait_listening, port, process)
    await deferToThread(wait_listening, admin, process)
    assert (await admin_get(admin, "/readyz"))[0] == 200
    idle = await connect_raw(port)
    idle.transport.write(b"GET /__clerk/v1/environment HTTP/1.1\r\nHost: a\r\n\r\n")
    await within(idle.waitFor(b'"method"'))
    busy = []
    for i in range(20):
        client = await connect_raw(port)
        client.transport.write(
            f"GET /__clerk/slow/{i} HTTP/1.1\r\nHost: a\r\n\r\n".encode()
        )
        busy.append(client)
    while len([s for s in fapi.seen if s["uri"].startswith("/slow")]) < 20:
        await sleep(0.02)
    os.kill(process.pid, signal.SIGTERM)
    await sleep(0.2)
    assert (await admin_get(admin, "/readyz"))[0] == 503
    assert (await admin_get(admin, "/healthz"))[0] == 200
    with pytest.raises(ConnectionRefusedError):
        await connect_raw(port)  # no longer accepting
    await within(idle.closed, 2)  # the idle keep-alive connection was closed
    for client in busy:
        status, headers, body = parse_response(await within(client.closed, 10))
        assert status == 200 and b'{"slow":true}' in body
        assert (b"connection", b"close") in headers
    output, _ = await deferToThread(process.communicate, timeout=20)
    assert process.returncode == 0, output
    assert "drained" in output


# -- certificate reload ----------------------------------------------------------


def _serial(port: int, ca: trustme.CA) -> tuple[int, ssl.SSLSocket]:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    sock = context.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10),
        server_hostname="app.test",
    )
    der = sock.getpeercert(binary_form=True)
    from cryptography import x509

    return x509.load_der_x509_certificate(der).serial_number, sock


def _get_on(sock: ssl.SSLSocket) -> bytes:
    sock.sendall(
        b"GET /__clerk/v1/environment HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    )
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_the_certificate_without_dropping_connections(
    fapi: Any, ca: trustme.CA, tmp_path: Path
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def issue() -> None:
        leaf = ca.issue_cert("app.test")
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        key.write_bytes(leaf.private_key_pem.bytes())

    issue()
    port = free_port()
    process = start_against(
        fapi,
        ca,
        tmp_path,
        ["--port", str(port), "--tls-cert", str(cert), "--tls-key", str(key)],
    )

    def scenario() -> tuple[int, int, int, bytes]:
        wait_listening(port, process)
        first, old = _serial(port, ca)
        issue()  # certbot renews
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        second, new = _serial(port, ca)
        new.close()
        cert.write_text("garbage\n")  # a broken renewal
        process.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        third, s3 = _serial(port, ca)
        s3.close()
        return first, second, third, _get_on(old)

    try:
        first, second, third, oldAnswer = await deferToThread(scenario)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await deferToThread(process.communicate, timeout=20)
    assert first != second, "new handshakes should see the renewed certificate"
    assert third == second, "a broken pair must leave the last good one serving"
    assert oldAnswer.startswith(b"HTTP/1.1 200 ")  # the old connection survived
    assert output.count("certificate reloaded") == 1
    assert "certificate reload failed" in output and "--tls-cert" in output
    assert process.returncode == 0


# -- metrics and health -----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_metrics_count_what_happened(make_proxy: Any, fapi: Any) -> None:
    proxy = make_proxy()
    site = proxy.site
    admin = reactor.listenTCP(
        0,
        admin_site(site.metrics, lambda: site.draining, reactor),
        interface="127.0.0.1",
    )
    adminPort = admin.getHost().port
    try:
        for _ in range(3):
            await raw_request(
                proxy.port,
                b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
            )
        await raw_request(
            proxy.port,
            b"POST /__clerk/status/422 HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nConnection: close\r\n\r\nx",
        )
        await raw_request(
            proxy.port,
            b"GET /elsewhere HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        await raw_request(
            proxy.port,
            b"BREW /__clerk/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        status, text = await admin_get(adminPort, "/metrics")
        assert status == 200
        families = {f.name: f for f in text_string_to_metric_families(text.decode())}
        requests = {
            (s.labels["method"], s.labels["code"]): s.value
            for s in families["clerkproxy_requests"].samples
            if s.name.endswith("_total")
        }
        assert requests[("GET", "200")] == 3
        assert requests[("POST", "422")] == 1
        assert requests[("GET", "404")] == 1
        assert ("other", "200") in requests  # unknown methods share one label
        duration = {
            s.labels.get("le"): s.value
            for s in families["clerkproxy_request_duration_seconds"].samples
            if s.name.endswith("_bucket")
        }
        assert duration["+Inf"] == 6
        upstream = [
            s
            for s in families["clerkproxy_upstream_response_seconds"].samples
            if s.name.endswith("_count")
        ]
        assert upstream[0].value == 5
        assert families["clerkproxy_in_flight_requests"].samples[0].value == 0
        assert families["clerkproxy_client_connections"].samples[0].value >= 0
        opened = [
            s
            for s in families["clerkproxy_upstream_connections_opened"].samples
            if s.name.endswith("_total")
        ]
        assert opened[0].value == 1
        assert "clerkproxy_upstream_errors" in families
        assert (await admin_get(adminPort, "/healthz"))[0] == 200
        assert (await admin_get(adminPort, "/readyz"))[0] == 200
        site.draining = True
        assert (await admin_get(adminPort, "/readyz"))[0] == 503
        assert SECRET not in text.decode()
    finally:
        await admin.stopListening()


@pytest_twisted.ensureDeferred
async def test_upstream_errors_are_counted_by_kind(make_proxy: Any, fapi: Any) -> None:
    port = fapi.port.getHost().port
    await fapi.port.stopListening()
    proxy = make_proxy(fapi_url=f"https://localhost:{port}")
    await raw_request(
        proxy.port, b"GET /__clerk/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert proxy.site.metrics.upstreamErrors == {"connect": 1}
    slow = make_proxy(
        fapi_url=f"https://localhost:{port}", upstream_timeout=0.2, endpoint=_Never()
    )
    await raw_request(
        slow.port, b"GET /__clerk/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert slow.site.metrics.upstreamErrors == {"timeout": 1}


class _Never:
    def connect(self, factory: Any) -> Any:
        from twisted.internet.defer import Deferred

        return Deferred()


# -- access log ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_access_log_lines_are_json_and_redacted(
    make_proxy: Any, fapi: Any
) -> None:
    sink = io.StringIO()
    proxy = make_proxy(
        site_factory=lambda resource, clock: build_site(
            resource,
            clock,
            access_log=AccessLog(sink),
            client_address=resource.clientAddress,
        )
    )
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyXzEifQ.c2lnbmF0dXJl"
    redirect = f"https://app.test/after?__clerk_handshake={jwt}&ok=1"
    target = (
        f"/__clerk/v1/client/handshake?redirect_url={redirect.replace(':', '%3A').replace('/', '%2F').replace('?', '%3F').replace('=', '%3D').replace('&', '%26')}"
        f"&__session={jwt}&__clerk_db_jwt=dvb_123&rotating_token_nonce=nonce123&__clerk_ticket=tkt&other={jwt}&keep=visible"
    )
    await raw_request(
        proxy.port,
        f"GET {target} HTTP/1.1\r\nHost: a\r\nCookie: __session={jwt}\r\nAuthorization: Bearer {jwt}\r\nConnection: close\r\n\r\n".encode(),
    )
    await raw_request(
        proxy.port,
        b"POST /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    client = await connect_raw(proxy.port)
    client.transport.write(b"GET /__clerk/stall HTTP/1.1\r\nHost: a\r\n\r\n")
    while not fapi.recorder.stalled:
        await sleep(0.01)
    client.transport.abortConnection()
    await within(client.closed)
    await sleep(0.05)
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert len(lines) == 3
    first, second, aborted = lines
    assert set(first) == {
        "time",
        "client",
        "method",
        "path",
        "status",
        "bytes",
        "total_ms",
        "upstream_ms",
        "upstream_reused",
        "protocol",
    }
    assert first["protocol"] == "HTTP/1.1"
    assert (
        first["client"] == "127.0.0.1"
        and first["method"] == "GET"
        and first["status"] == 200
    )
    assert (
        first["bytes"] > 0
        and first["upstream_ms"] is not None
        and first["total_ms"] >= first["upstream_ms"]
    )
    assert first["upstream_reused"] is False and second["upstream_reused"] is True
    path = first["path"]
    for secret in (jwt, "dvb_123", "nonce123", "tkt"):
        assert secret not in path
    assert "keep=visible" in path and "REDACTED" in path
    assert "ok=1" in path  # the redirect URL kept its harmless parts
    assert aborted["status"] == 499 and aborted["path"] == "/__clerk/stall"
    text = sink.getvalue()
    assert SECRET not in text and "Bearer" not in text and "Cookie" not in text


# -- app routing ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_everything_outside_the_prefix_goes_to_the_app(
    make_proxy: Any, fapi: Any
) -> None:
    echo = AppEcho()
    appSite = Site(echo)
    appSite.log = lambda request: None
    appPort = reactor.listenTCP(0, appSite, interface="127.0.0.1")
    try:
        proxy = make_proxy(site_factory=edge_with_app(appPort))
        data = await raw_request(
            proxy.port,
            (
                b"POST /dashboard?tab=1 HTTP/1.1\r\nHost: app.test\r\nContent-Length: 5\r\n"
                b"Clerk-Secret-Key: sk_live_from_client\r\nClerk-Proxy-Url: x\r\nX-Forwarded-Proto: gopher\r\n"
                b"X-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\nhello"
            ),
        )
        assert parse_response(data)[2] == b"app says hi"
        [seen] = echo.seen
        headers = seen["headers"]
        assert seen["uri"] == b"/dashboard?tab=1" and seen["body"] == b"hello"
        assert headers["Host"] == ["app.internal"]
        assert headers["X-Forwarded-For"] == ["127.0.0.1"]
        assert headers["X-Forwarded-Proto"] == ["http"]
        assert headers["X-Forwarded-Host"] == ["app.test"]
        assert not any(name.lower().startswith("clerk-") for name in headers)
        data = await raw_request(
            proxy.port,
            b"GET /__clerk/v1/client HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
        )
        assert parse_response(data)[0] == 200 and fapi.seen[-1]["uri"] == "/v1/client"
        assert len(echo.seen) == 1
    finally:
        await appPort.stopListening()


# -- PROXY protocol ----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_proxy_protocol_v2_with_tls_behind_it(
    make_proxy: Any, fapi: Any, ca: trustme.CA, tmp_path: Path
) -> None:
    from clerkproxy._endpoints import server_endpoint
    from clerkproxy.tap import Options

    leaf = ca.issue_cert("app.test")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    options = Options()
    options.parseOptions(
        [
            "--proxy-url",
            "https://app.test/__clerk",
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
            "--secret-key-file",
            str(_key(tmp_path)),
        ]
    )
    proxy = make_proxy()
    listening = await server_endpoint(
        reactor, "haproxy:tcp:0:interface=127.0.0.1", options.settings.tls
    ).listen(proxy.site)
    port = listening.getHost().port

    def client() -> bytes:
        import struct

        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        # PROXY v2: TCP over IPv4 from 203.0.113.9:4242 to 10.0.0.1:443.
        addresses = (
            socket.inet_aton("203.0.113.9")
            + socket.inet_aton("10.0.0.1")
            + struct.pack("!HH", 4242, 443)
        )
        raw.sendall(
            b"\r\n\r\n\x00\r\nQUIT\n"
            + bytes([0x21, 0x11])
            + struct.pack("!H", len(addresses))
            + addresses
        )
        context = ssl.create_default_context()
        ca.configure_trust(context)
        sock = context.wrap_socket(raw, server_hostname="app.test")
        return _get_on(sock)

    try:
        data = await deferToThread(client)
    finally:
        await listening.stopListening()
    assert parse_response(data)[0] == 200
    assert fapi.header("X-Forwarded-For") == ["203.0.113.9"]


def _key(where: Path) -> Path:
    path = where / "secret"
    path.write_text(SECRET)
    return path


# -- JSON operational logs ------------------------------------------------------------------


def test_twist_emits_json_events(ca: trustme.CA, tmp_path: Path) -> None:
    from helpers import TWISTD

    twist = str(Path(TWISTD).with_name("twist"))
    port = free_port()
    process = subprocess.Popen(
        [
            twist,
            "--log-format=json",
            "clerkproxy",
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--proxy-url",
            "https://app.test/__clerk",
            "--secret-key-file",
            str(_key(tmp_path)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("CLERK_")},
    )
    try:
        wait_listening(port, process)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
    events = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert any("clerkproxy" in json.dumps(event) for event in events)
    assert process.returncode == 0
    assert SECRET not in output
