"""
Pebble (Let's Encrypt's test ACME server) and pebble-challtestsrv (its DNS
server, answering 127.0.0.1 for every name) on loopback, for the ACME tests.

Pebble validates http-01 and tls-alpn-01 by connecting to fixed ports
(C{httpPort}, C{tlsPort} in its configuration): each harness picks free
ones, and the proxy under test listens there.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import trustme

PEBBLE = shutil.which("pebble")
CHALLTESTSRV = shutil.which("pebble-challtestsrv")

# CI sets CLERKPROXY_REQUIRE_PEBBLE, so that a missing Pebble fails there
# instead of skipping the ACME tests.
needs_pebble = pytest.mark.skipif(
    (PEBBLE is None or CHALLTESTSRV is None)
    and not os.environ.get("CLERKPROXY_REQUIRE_PEBBLE"),
    reason="Debian's pebble package is not installed (apt-get install pebble)",
)


def free_port(udp: bool = False) -> int:
    """A loopback port free for TCP (and for UDP too when C{udp})."""
    for _ in range(50):
        tcp = socket.socket()
        tcp.bind(("127.0.0.1", 0))
        port = tcp.getsockname()[1]
        try:
            if udp:
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    u.bind(("127.0.0.1", port))
                except OSError:
                    continue
                finally:
                    u.close()
            return int(port)
        finally:
            tcp.close()
    raise RuntimeError("no free port")


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(200):
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}")


class Pebble:
    """
    A running Pebble and its DNS server.

    @ivar directory: The ACME directory URL.
    @ivar ca: A PEM file of the CA that signed Pebble's own HTTPS
        certificate (for C{--acme-ca}).
    @ivar httpPort: Where Pebble sends http-01 validations.
    @ivar tlsPort: Where Pebble sends tls-alpn-01 validations.
    """

    def __init__(
        self,
        workdir: Path,
        httpPort: int | None = None,
        tlsPort: int | None = None,
        validity: int | None = None,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.httpPort = httpPort or free_port()
        self.tlsPort = tlsPort or free_port()
        self.apiPort = free_port()
        self.managementPort = free_port()
        self.dnsPort = free_port(udp=True)
        self.challManagementPort = free_port()
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        leaf.cert_chain_pems[0].write_to_path(str(workdir / "pebble-cert.pem"))
        leaf.private_key_pem.write_to_path(str(workdir / "pebble-key.pem"))
        ca.cert_pem.write_to_path(str(workdir / "pebble-ca.pem"))
        self.ca = str(workdir / "pebble-ca.pem")
        self._sslContext = ssl.create_default_context(cafile=self.ca)
        config = {
            "pebble": {
                "listenAddress": f"127.0.0.1:{self.apiPort}",
                "managementListenAddress": f"127.0.0.1:{self.managementPort}",
                "certificate": str(workdir / "pebble-cert.pem"),
                "privateKey": str(workdir / "pebble-key.pem"),
                "httpPort": self.httpPort,
                "tlsPort": self.tlsPort,
                "ocspResponderURL": "",
                "externalAccountBindingRequired": False,
            }
        }
        if validity is not None:
            config["pebble"]["certificateValidityPeriod"] = validity
        (workdir / "pebble.json").write_text(json.dumps(config))
        self._log = open(workdir / "pebble.log", "wb")
        self.logPath = workdir / "pebble.log"
        assert CHALLTESTSRV is not None and PEBBLE is not None
        self._dns = subprocess.Popen(
            [
                CHALLTESTSRV,
                "-defaultIPv4",
                "127.0.0.1",
                "-defaultIPv6",
                "",
                "-dns01",
                f"127.0.0.1:{self.dnsPort}",
                "-http01",
                "",
                "-https01",
                "",
                "-tlsalpn01",
                "",
                "-management",
                f"127.0.0.1:{self.challManagementPort}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        # No reused authorisations: every order is validated afresh.
        env = dict(
            os.environ,
            PEBBLE_VA_NOSLEEP="1",
            PEBBLE_WFE_NONCEREJECT="0",
            PEBBLE_AUTHZREUSE="0",
        )
        self._pebble = subprocess.Popen(
            [
                PEBBLE,
                "-config",
                str(workdir / "pebble.json"),
                "-dnsserver",
                f"127.0.0.1:{self.dnsPort}",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            _wait_for_port(self.challManagementPort, self._dns, "pebble-challtestsrv")
            _wait_for_port(self.apiPort, self._pebble, "pebble")
            _wait_for_port(self.managementPort, self._pebble, "pebble management")
        except Exception:
            self.stop()
            raise
        self.directory = f"https://localhost:{self.apiPort}/dir"

    def root(self) -> bytes:
        """The PEM root every certificate Pebble issues chains to."""
        url = f"https://localhost:{self.managementPort}/roots/0"
        with urllib.request.urlopen(url, context=self._sslContext) as response:
            data: bytes = response.read()
        return data

    def log(self) -> str:
        self._log.flush()
        return self.logPath.read_text(errors="replace")

    def stop(self) -> None:
        for process in (self._pebble, self._dns):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self._log.close()
