"""
HTTP/2 through the proxy with real clients: nghttp and h2load (Debian's
nghttp2-client), and a headless Chromium that loads a page from the app
and a script from FAPI and reports which protocol it used.

``.ci/run`` installs both packages and sets CLERKPROXY_REQUIRE_HTTP2_CLIENTS,
so that there they fail rather than skip when a program is missing.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from conftest import reactor
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers import H2Proxy, edge_with_app, make_h2  # noqa: F401  (fixture)
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Site

from clerkproxy._h2 import HTTP2Settings

NGHTTP = shutil.which("nghttp")
H2LOAD = shutil.which("h2load")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = bool(os.environ.get("CLERKPROXY_REQUIRE_HTTP2_CLIENTS"))


def need(*programs: str | None) -> Any:
    """Skip without the programs, unless CI requires them."""
    return pytest.mark.skipif(
        None in programs and not REQUIRED, reason="nghttp2-client or chromium"
    )


def run(*args: str, timeout: float = 60) -> Any:
    return deferToThread(
        subprocess.run, list(args), capture_output=True, text=True, timeout=timeout
    )


@need(NGHTTP, H2LOAD)
@pytest_twisted.ensureDeferred
async def test_nghttp_and_h2load_over_tls_and_h2c(
    make_h2: Callable[..., H2Proxy], fapi: Any
) -> None:
    h2proxy = make_h2(HTTP2Settings(h2c=True))
    url = f"https://localhost:{h2proxy.tlsPort}/__clerk/cookies?x=1"
    result = await run(str(NGHTTP), "-v", "-n", url)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "negotiated protocol: h2" in out
    assert ":status: 200" in out
    assert out.count("set-cookie:") == 3
    assert fapi.seen[-1]["uri"] == "/cookies?x=1"
    # Cleartext with prior knowledge.
    result = await run(
        str(NGHTTP), "-n", "-s", f"http://127.0.0.1:{h2proxy.port}/__clerk/v1/client"
    )
    assert result.returncode == 0, result.stderr
    before = len(fapi.seen)
    result = await run(
        str(H2LOAD),
        "-n",
        "200",
        "-c",
        "4",
        "-m",
        "10",
        f"https://localhost:{h2proxy.tlsPort}/__clerk/v1/client",
    )
    assert result.returncode == 0, result.stderr
    assert "200 succeeded" in result.stdout, result.stdout
    assert re.search(r"status codes: 200 2xx", result.stdout), result.stdout
    assert "Application protocol: h2" in result.stdout
    assert len(fapi.seen) - before == 200


class _App(Resource):
    """The app's origin: one page that loads a script from FAPI."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        return (
            b"<!doctype html><html><head><title>app</title></head><body>"
            b'<p id="out">pending</p>'
            b'<script src="/__clerk/npm/probe.js"></script>'
            b"</body></html>"
        )


def _spki_hash(cert: trustme.LeafCert) -> str:
    leaf = x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes())
    spki = leaf.public_key().public_bytes(
        Encoding.DER, PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


@need(CHROMIUM)
@pytest_twisted.ensureDeferred
async def test_a_browser_loads_page_and_script_over_http2(
    make_proxy: Callable[..., Any], fapi: Any, ca: trustme.CA
) -> None:
    appSite = Site(_App())
    appSite.log = lambda request: None  # type: ignore[method-assign]
    appPort = reactor.listenTCP(0, appSite, interface="127.0.0.1")

    from conftest import _server_options

    proxy = make_proxy(site_factory=edge_with_app(appPort, http2=HTTP2Settings()))
    cert = ca.issue_cert("localhost", "127.0.0.1")
    tls = reactor.listenSSL(0, proxy.site, _server_options(cert), interface="127.0.0.1")
    try:
        with tempfile.TemporaryDirectory() as profile:
            result = await run(
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                f"--user-data-dir={Path(profile)}",
                f"--ignore-certificate-errors-spki-list={_spki_hash(cert)}",
                "--virtual-time-budget=10000",
                "--dump-dom",
                f"https://localhost:{tls.getHost().port}/",
                timeout=120,
            )
    finally:
        await tls.stopListening()
        await appPort.stopListening()
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r'<p id="out">([^<]*)</p>', result.stdout)
    assert found is not None, result.stdout[-2000:]
    protocols = dict(item.split("=", 1) for item in found.group(1).split())
    # The page came from the app and the script from FAPI, both over h2.
    assert protocols == {"page": "h2", "probe.js": "h2"}, found.group(1)
    assert fapi.seen[-1]["uri"] == "/npm/probe.js"
    families = proxy.resource.metrics.requests
    assert (
        sum(n for (_, _, protocol), n in families.items() if protocol == b"HTTP/2") >= 2
    )
