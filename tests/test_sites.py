"""Many sites in one process: the config file, SNI, routing by host, 421, redirect."""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from helpers import KEY_A, KEY_B, _read_response, settings_for
from pebble import free_port
from twisted.internet import reactor as _reactor
from twisted.internet.threads import deferToThread

from clerkproxy._config import ConfigError
from clerkproxy._endpoints import server_endpoint
from clerkproxy._serve import build_service
from clerkproxy._sites import ACME_KEYS, GLOBAL_KEYS, SITE_KEYS, load_config

reactor: Any = _reactor
DOCS = Path(__file__).parent.parent / "docs"


def _write_cert(ca: trustme.CA, where: Path, *names: str) -> tuple[str, str]:
    leaf = ca.issue_cert(*names)
    cert, key = where / f"{names[0]}.pem", where / f"{names[0]}.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return str(cert), str(key)


def two_sites(tmp_path: Path, ca: trustme.CA, fapi: Any, extra: str = "") -> Path:
    certA, keyA = _write_cert(ca, tmp_path, "a.test", "www.a.test")
    certB, keyB = _write_cert(ca, tmp_path, "b.test")
    (tmp_path / "a.key").write_text(KEY_A + "\n")
    ca.cert_pem.write_to_path(str(tmp_path / "fapi-ca.pem"))
    config = tmp_path / "sites.toml"
    config.write_text(
        f"""
fapi = "{fapi.url}"
fapi_ca = "fapi-ca.pem"
{extra}

[[site]]
hosts = ["a.test", "www.a.test"]
proxy_url = "https://a.test/__clerk"
secret_key_file = "a.key"
tls_cert = "{certA}"
tls_key = "{keyA}"

[[site]]
hosts = ["b.test"]
proxy_url = "https://b.test/auth"
secret_key_env = "KEY_FOR_B"
tls_cert = "{certB}"
tls_key = "{keyB}"
"""
    )
    return config


def https_get(
    port: int, ca: trustme.CA, sni: str, requests: list[bytes]
) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Send C{requests} on one keep-alive TLS connection."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    answers = []
    with context.wrap_socket(raw, server_hostname=sni) as tls:
        for request in requests:
            tls.sendall(request)
            answers.append(_read_response(tls))
    return answers


def get(host: str, path: str = "/v1/client") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


class Running:
    def __init__(self, settings: Any, ports: list[str]) -> None:
        endpoints = [server_endpoint(reactor, d, settings.tls) for d in ports]
        self.service = build_service(settings, reactor, endpoints, installSignals=False)
        self.service.startService()

    async def stop(self) -> None:
        await self.service.stopService()


# -- the config file ---------------------------------------------------------


def test_the_documented_example_loads_and_documents_every_key() -> None:
    example = DOCS / "clerkproxy.example.toml"
    loaded = load_config(
        str(example),
        {"CLERK_SECRET_KEY_SHOP": KEY_B, "CLERK_SECRET_KEY_APP": KEY_A},
    )
    assert [s.name for s in loaded.sites] == ["app.example.com", "shop.example.com"]
    assert loaded.sites[0].acme and not loaded.sites[1].acme
    text = example.read_text()
    doc = (DOCS / "configuration.md").read_text()
    for key in [*GLOBAL_KEYS, *SITE_KEYS]:
        assert f"{key} =" in text or f"# {key} =" in text, key
        assert f"`{key}`" in doc, key
    for key in ACME_KEYS:
        assert f"{key} =" in text, key
        assert f"`acme.{key}`" in doc, key
    assert "sk_live_" not in text


def test_secret_key_never_in_the_file(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[[site]]\nproxy_url = "https://a.test/__clerk"\nsecret_key = "sk_live_x"\n'
    )
    with pytest.raises(ConfigError, match="never put the key in the file") as e:
        load_config(str(config), {})
    assert "sk_live_x" not in str(e.value)


def test_flags_that_disagree_with_the_file_are_refused(
    tmp_path: Path, ca: trustme.CA, fapi: Any
) -> None:
    config = two_sites(tmp_path, ca, fapi)
    with pytest.raises(ConfigError, match="--proxy-url conflicts with --config"):
        settings_for(["--config", str(config), "--proxy-url", "https://c.test/x"])
    with pytest.raises(ConfigError) as e:
        settings_for(["--config", str(config), "--fapi", "https://other.test"])
    assert "--fapi 'https://other.test' conflicts with --config" in str(e.value)
    assert fapi.url in str(e.value)
    # The same value twice is no disagreement.
    settings = settings_for(["--config", str(config), "--fapi", fapi.url])
    assert [s.name for s in settings.sites] == ["a.test", "b.test"]


def test_two_sites_with_one_host_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        '[[site]]\nproxy_url = "https://a.test/__clerk"\nsecret_key_env = "K"\n'
        '[[site]]\nhosts = ["A.test"]\nproxy_url = "https://b.test/__clerk"\n'
        'secret_key_env = "K"\n'
    )
    with pytest.raises(ConfigError, match=r"host a\.test belongs to two sites"):
        load_config(str(config), {"K": KEY_A})


# -- serving -----------------------------------------------------------------


def _fapi_requests(fapi: Any) -> list[tuple[str, list[str], str]]:
    out = []
    for seen in fapi.seen:
        headers = seen["headers"]
        urls = [v for n, v in headers if n.lower() == "clerk-proxy-url"]
        keys = [v for n, v in headers if n.lower() == "clerk-secret-key"]
        assert len(urls) == 1, headers
        out.append((urls[0], keys, seen["uri"]))
    return out


@pytest_twisted.ensureDeferred
async def test_sni_routing_421_and_no_site_ever_carries_another_sites_key(
    tmp_path: Path, ca: trustme.CA, fapi: Any
) -> None:
    config = two_sites(tmp_path, ca, fapi)
    log = tmp_path / "access.log"
    settings = settings_for(["--config", str(config), "--access-log", str(log)])
    port = free_port()
    running = Running(settings, [f"tls:tcp:{port}:interface=127.0.0.1"])
    try:
        # Each name gets its own certificate.
        def names(sni: str) -> list[Any]:
            context = ssl.create_default_context()
            ca.configure_trust(context)
            raw = socket.create_connection(("127.0.0.1", port), timeout=10)
            with context.wrap_socket(raw, server_hostname=sni) as tls:
                return [v for _, v in tls.getpeercert()["subjectAltName"]]

        assert await deferToThread(names, "www.a.test") == ["a.test", "www.a.test"]
        assert await deferToThread(names, "b.test") == ["b.test"]

        # Interleaved requests for both sites, on shared connections.
        prefix = {"a": "/__clerk", "w": "/__clerk", "b": "/auth", "B": "/auth"}
        mixed = [
            get(h, prefix[h[0]] + "/v1/client")
            for h in ["a.test", "b.test", "www.a.test:443", "B.TEST"] * 5
        ]
        for sni in ["a.test", "b.test"]:
            answers = await deferToThread(https_get, port, ca, sni, mixed)
            assert [a[0] for a in answers] == [200] * len(mixed)
        # An unknown host: 421, and FAPI never hears of it.
        before = len(fapi.seen)
        [(status, headers, body)] = await deferToThread(
            https_get, port, ca, "a.test", [get("c.test")]
        )
        assert status == 421
        assert json.loads(body)["errors"][0]["code"] == "misdirected_request"
        assert len(fapi.seen) == before
        # An unknown name by SNI: no certificate, a clean handshake failure.
        with pytest.raises(ssl.SSLError):
            await deferToThread(https_get, port, ca, "c.test", [get("c.test")])
    finally:
        await running.stop()
    seen = _fapi_requests(fapi)
    assert len(seen) == 2 * len(mixed)
    keyOf = {"https://a.test/__clerk": [KEY_A], "https://b.test/auth": [KEY_B]}
    for url, keys, _ in seen:
        assert keys == keyOf[url]
    assert {url for url, _, _ in seen} == set(keyOf)
    # The access log names the site of each request.
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert {r.get("site") for r in records} == {"a.test", "b.test", None}
    assert [r["status"] for r in records].count(421) == 1


@pytest_twisted.ensureDeferred
async def test_plain_listener_redirects_to_https(
    tmp_path: Path, ca: trustme.CA, fapi: Any
) -> None:
    tlsPort, plainPort = free_port(), free_port()
    ports = f'port = ["tls:tcp:{tlsPort}:interface=127.0.0.1", "tcp:{plainPort}:interface=127.0.0.1"]'
    config = two_sites(tmp_path, ca, fapi, ports)
    settings = settings_for(["--config", str(config)])
    assert settings.redirectHTTP
    running = Running(settings, list(settings.ports))

    def plain(request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        with socket.create_connection(("127.0.0.1", plainPort), timeout=10) as s:
            s.sendall(request)
            return _read_response(s)

    try:
        status, headers, _ = await deferToThread(
            plain, get("www.a.test:80", "/__clerk/v1/client?x=1")
        )
        assert status == 308
        assert headers[b"location"] == b"https://www.a.test/__clerk/v1/client?x=1"
        status, _, _ = await deferToThread(plain, get("c.test", "/"))
        assert status == 421
        assert fapi.seen == []
    finally:
        await running.stop()
    # Behind a trusted proxy, the plain listener is that proxy's: no redirect.
    trusted = settings_for(["--config", str(config), "--trusted-proxy", "10.0.0.0/8"])
    assert not trusted.redirectHTTP
    off = settings_for(["--config", str(config), "--no-redirect-http"])
    assert not off.redirectHTTP


def test_single_site_flags_still_work_and_redirect_by_default(tmp_path: Path) -> None:
    (tmp_path / "k").write_text(KEY_A)
    base = [
        "--proxy-url",
        "https://a.test/__clerk",
        "--secret-key-file",
        str(tmp_path / "k"),
    ]
    settings = settings_for(base)
    assert settings.sites == () and not settings.redirectHTTP and settings.tls is None
    acme = settings_for(
        [
            *base,
            "--acme-domain",
            "a.test",
            "--acme-dir",
            str(tmp_path / "acme"),
            "--port",
            "443",
            "--port",
            "tcp:80",
        ]
    )
    assert acme.acme.domains == ("a.test",)
    assert acme.redirectHTTP
    with pytest.raises(ConfigError, match="--acme-challenge"):
        settings_for([*base, "--acme-domain", "a.test", "--acme-challenge", "dns-01"])


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_every_sites_certificate(
    tmp_path: Path, ca: trustme.CA, fapi: Any
) -> None:
    config = two_sites(tmp_path, ca, fapi)
    settings = settings_for(["--config", str(config)])
    port = free_port()
    running = Running(settings, [f"tls:tcp:{port}:interface=127.0.0.1"])

    def serial(sni: str) -> int:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with context.wrap_socket(raw, server_hostname=sni) as tls:
            return int(tls.getpeercert()["serialNumber"], 16)

    try:
        before = {n: await deferToThread(serial, n) for n in ["a.test", "b.test"]}
        _write_cert(ca, tmp_path, "a.test", "www.a.test")
        _write_cert(ca, tmp_path, "b.test")
        running.service.reloadCertificates()
        after = {n: await deferToThread(serial, n) for n in ["a.test", "b.test"]}
        assert all(after[n] != before[n] for n in before)
    finally:
        await running.stop()
