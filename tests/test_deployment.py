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
from helpers import TWISTD
from twisted.internet.threads import deferToThread

DOC = (Path(__file__).resolve().parent.parent / "docs" / "deployment.md").read_text()


def block(language: str, marker: str) -> str:
    for found in re.findall(rf"```{language}\n(.*?)```", DOC, re.DOTALL):
        if marker in found:
            return found
    raise AssertionError(f"no {language} block containing {marker!r}")


def test_the_systemd_units_use_socket_activation_drain_and_reload() -> None:
    service = block("ini", "systemd:domain=INET")
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


def _twistd_args(text: str) -> list[str]:
    """The options after C{clerkproxy} in a (continued) twistd command line."""
    import shlex

    joined = text.replace("\\\n", " ")
    line = next(ln for ln in joined.splitlines() if "twistd" in ln)
    words = shlex.split(line)
    return words[words.index("clerkproxy") + 1 :]


def _settings(argv: list[str], environ: dict[str, str]) -> Any:
    from clerkproxy._settings import read_settings
    from clerkproxy.tap import Options

    options = Options()
    options.postOptions = lambda: None  # type: ignore[method-assign]
    options.parseOptions(argv)
    return read_settings(options, environ, argv)


def test_the_bare_vm_commands_and_unit_describe_an_acme_edge(tmp_path: Path) -> None:
    commands = block("sh", "--acme-domain")
    assert commands.count("\n") - commands.count("\\\n") == 2  # two commands
    argv = _twistd_args(commands)
    argv[argv.index("--acme-dir") + 1] = str(tmp_path / "acme")
    settings = _settings(argv, {"CLERK_SECRET_KEY": SECRET})
    assert settings.acme.domains == ("app.example.com",)
    assert settings.acme.directory.startswith("https://acme-v02.api.letsencrypt.org")
    assert settings.redirectHTTP and settings.ports == ("443", "tcp:80")

    unit = block("ini", "--acme-domain")
    assert "StateDirectory=clerkproxy" in unit and "CAP_NET_BIND_SERVICE" in unit
    (tmp_path / "secret-key").write_text(SECRET)
    argv = [
        a.replace("%d", str(tmp_path)).replace("/var/log/clerkproxy", str(tmp_path))
        for a in _twistd_args(unit)
    ]
    settings = _settings(argv, {"STATE_DIRECTORY": str(tmp_path / "state")})
    assert settings.acme.path == str(tmp_path / "state" / "acme")


def test_the_multi_site_example_loads(tmp_path: Path) -> None:
    from clerkproxy._sites import load_config

    text = block("toml", "app.example.org")
    for name in ["app", "org"]:
        (tmp_path / f"{name}.key").write_text(SECRET)
        text = text.replace(
            f"/etc/clerkproxy/{name}.key", str(tmp_path / f"{name}.key")
        )
    (tmp_path / "sites.toml").write_text(text)
    loaded = load_config(str(tmp_path / "sites.toml"), {})
    assert [s.hosts for s in loaded.sites] == [
        ("app.example.com",),
        ("app.example.org",),
    ]
    assert all(s.acme for s in loaded.sites)
