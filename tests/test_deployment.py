"""What docs/deployment.md tells operators to run, run for real where it can be."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from conftest import PROXY_URL, SECRET
from test_cli import TWISTD
from twisted.internet.threads import deferToThread

DOC = (Path(__file__).resolve().parent.parent / "docs" / "deployment.md").read_text()


def block(language: str, marker: str) -> str:
    for found in re.findall(rf"```{language}\n(.*?)```", DOC, re.DOTALL):
        if marker in found:
            return found
    raise AssertionError(f"no {language} block containing {marker!r}")


def test_the_systemd_units_use_socket_activation_drain_and_reload() -> None:
    service = block("ini", "ExecStart=")
    socket_unit = block("ini", "ListenStream=")
    assert "systemd:domain=INET:index=0" in service
    assert "ExecReload=/bin/kill -HUP $MAINPID" in service
    assert "KillSignal=SIGTERM" in service
    assert "CLERK_SECRET_KEY" in service or "--secret-key-file" in service
    assert "ListenStream=443" in socket_unit


def test_the_kubernetes_manifest_probes_readiness_and_drains() -> None:
    manifest = block("yaml", "kind: Deployment")
    assert "path: /readyz" in manifest and "path: /healthz" in manifest
    assert "preStop" in manifest
    grace = int(re.search(r"terminationGracePeriodSeconds: (\d+)", manifest).group(1))  # type: ignore[union-attr]
    drain = int(re.search(r"--drain-timeout[\", ]+(\d+)", manifest).group(1))  # type: ignore[union-attr]
    assert grace > drain
    assert "kind: Service" in DOC


def test_the_container_recipe_runs_the_plugin() -> None:
    recipe = block("dockerfile", "FROM")
    assert "pip install" in recipe and "twistd" in recipe and "clerkproxy" in recipe
    assert "STOPSIGNAL SIGTERM" in recipe and "USER" in recipe


@pytest.mark.parametrize("tls", [False, True])
@pytest_twisted.ensureDeferred
async def test_systemd_socket_activation(
    fapi: Any, ca: trustme.CA, tmp_path: Path, tls: bool
) -> None:
    """The socket unit's listening socket, handed over as systemd does."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    key = tmp_path / "secret"
    key.write_text(SECRET)
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    description = "systemd:domain=INET:index=0"
    extra: list[str] = []
    if tls:
        leaf = ca.issue_cert("app.test")
        cert, pkey = tmp_path / "c.pem", tmp_path / "k.pem"
        cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
        pkey.write_bytes(leaf.private_key_pem.bytes())
        description = "tls:" + description
        extra = ["--tls-cert", str(cert), "--tls-key", str(pkey)]
    fd = listener.fileno()
    # What systemd does: the socket at descriptor 3, LISTEN_* naming this
    # very process (the launcher execs twistd, keeping its pid).
    launcher = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', "
        "LISTEN_FDNAMES='clerkproxy.socket'); os.execv(sys.argv[2], sys.argv[2:])"
    )
    argv = [
        sys.executable,
        "-c",
        launcher,
        str(fd),
        TWISTD,
        "-n",
        "--pidfile=",
        "clerkproxy",
        "--port",
        description,
        "--proxy-url",
        PROXY_URL,
        "--fapi",
        fapi.url,
        "--fapi-ca",
        str(cafile),
        "--secret-key-file",
        str(key),
        *extra,
    ]
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("CLERK_", "LISTEN_"))
    }
    process = subprocess.Popen(
        argv,
        pass_fds=(fd,),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    listener.close()

    def get() -> bytes:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls:
            context = ssl.create_default_context()
            ca.configure_trust(context)
            raw = context.wrap_socket(raw, server_hostname="app.test")
        raw.sendall(
            b"GET /__clerk/v1/environment HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
        )
        data = b""
        while chunk := raw.recv(65536):
            data += chunk
        return data

    try:
        data = await deferToThread(get)
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await deferToThread(process.communicate, timeout=20)
    assert data.startswith(b"HTTP/1.1 200 "), output
    assert process.returncode == 0, output
