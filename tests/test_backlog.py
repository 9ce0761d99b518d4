"""
Every listening socket the proxy creates gets a real listen backlog, not
Twisted's 50, unless its description sets one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from conftest import reactor
from twisted.internet.protocol import Factory, Protocol

from clerkproxy._endpoints import (
    admin_endpoint,
    default_backlog,
    server_endpoint,
    with_backlog,
)
from clerkproxy._tls import ReloadableServerTLS


def test_the_default_is_the_kernels_ceiling(tmp_path: Path) -> None:
    somaxconn = tmp_path / "somaxconn"
    somaxconn.write_text("4096\n")
    assert default_backlog(str(somaxconn)) == 4096
    for text in ("", "many", "0", "-1", "70000"):
        somaxconn.write_text(text)
        assert default_backlog(str(somaxconn)) == 1024
    assert default_backlog(str(tmp_path / "absent")) == 1024


def test_descriptions_that_take_a_backlog_get_one_unless_they_set_it() -> None:
    n = default_backlog()
    assert with_backlog("tcp:8080") == f"tcp:8080:backlog={n}"
    assert with_backlog("tcp6:port=8080:interface=\\:\\:1", 7) == (
        "tcp6:port=8080:interface=\\:\\:1:backlog=7"
    )
    assert with_backlog("unix:/run/p.sock", 9) == "unix:/run/p.sock:backlog=9"
    assert with_backlog("ssl:443:privateKey=k.pem", 9).endswith(":backlog=9")
    for unchanged in (
        "tcp:8080:backlog=10",
        "tcp:port=8080:backlog=10:interface=127.0.0.1",
        "systemd:domain=INET:index=0",
        "bogus:1",
    ):
        assert with_backlog(unchanged, 9) == unchanged


async def listen(endpoint: Any) -> Any:
    return await endpoint.listen(Factory.forProtocol(Protocol))


def kernel_backlog(port: int) -> int | None:
    """The backlog the kernel reports for a listening socket (ss's Send-Q)."""
    if shutil.which("ss") is None:
        return None
    out = subprocess.run(
        ["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"LISTEN\s+\d+\s+(\d+)", out)
    return int(match.group(1)) if match else None


@pytest.mark.parametrize(
    ("description", "expected"),
    [
        ("tcp:0:interface=127.0.0.1", None),
        ("haproxy:tcp:0:interface=127.0.0.1", None),
        ("tcp:0:interface=127.0.0.1:backlog=17", 17),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_port_listens_with_the_backlog(
    description: str, expected: int | None
) -> None:
    expected = expected or default_backlog()
    port = await listen(server_endpoint(reactor, description, None))
    try:
        assert port.backlog == expected
        seen = kernel_backlog(port.getHost().port)
        assert seen in (None, expected)
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_bare_port_with_a_certificate_listens_with_the_backlog(
    ca: trustme.CA, tmp_path: Path
) -> None:
    leaf = ca.issue_cert("localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    tls = ReloadableServerTLS(str(cert), str(key))
    for description in ("0", "tls:tcp:0:interface=127.0.0.1"):
        port = await listen(server_endpoint(reactor, description, tls))
        try:
            assert port.backlog == default_backlog(), description
        finally:
            await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_admin_port_listens_with_the_backlog() -> None:
    port = await listen(admin_endpoint(reactor, "tcp:0:interface=127.0.0.1"))
    try:
        assert port.backlog == default_backlog()
    finally:
        await port.stopListening()
