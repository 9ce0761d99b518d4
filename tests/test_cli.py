"""
`twistd -n clerkproxy` as a user runs it: bad configuration ends at start
with one clear sentence; a good one serves, terminates TLS and stops cleanly.
"""

from __future__ import annotations

import http.client
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from conftest import SECRET
from helpers import free_port, start_against, stop, twistd, wait_listening
from twisted.internet.threads import deferToThread

GOOD = ["--proxy-url", "https://app.test/__clerk"]


@pytest.fixture(scope="module")
def pems(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    where = tmp_path_factory.mktemp("pems")
    ca = trustme.CA()
    leaf = ca.issue_cert("app.test", "127.0.0.1")
    other = ca.issue_cert("other.test")
    files = {
        "ca": ca.cert_pem,
        "cert": leaf.cert_chain_pems[0],
        "key": leaf.private_key_pem,
        "other_key": other.private_key_pem,
    }
    paths = {}
    for name, blob in files.items():
        path = where / f"{name}.pem"
        blob.write_to_path(str(path))
        paths[name] = str(path)
    chain = where / "fullchain.pem"
    chain.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    paths["fullchain"] = str(chain)
    garbage = where / "garbage.pem"
    garbage.write_text("not a certificate\n")
    paths["garbage"] = str(garbage)
    paths["ca_obj"] = ca  # type: ignore[assignment]
    return paths


def assert_one_clear_line(
    result: subprocess.CompletedProcess[str], *needles: str
) -> None:
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_missing_secret_key_names_the_variable() -> None:
    assert_one_clear_line(twistd(*GOOD), "CLERK_SECRET_KEY")


def test_development_key_is_refused_without_printing_it() -> None:
    key = "sk_test_" + "d3v" * 10
    result = twistd(*GOOD, env={"CLERK_SECRET_KEY": key})
    assert_one_clear_line(result, "development")
    assert key not in result.stdout + result.stderr


def test_missing_proxy_url() -> None:
    assert_one_clear_line(
        twistd(env={"CLERK_SECRET_KEY": SECRET}), "--proxy-url", "CLERK_PROXY_URL"
    )


@pytest.mark.parametrize(
    "url", ["/__clerk", "app.test/__clerk", "ftp://app.test/x", "https://"]
)
def test_bad_proxy_url(url: str) -> None:
    result = twistd("--proxy-url", url, env={"CLERK_SECRET_KEY": SECRET})
    assert_one_clear_line(result, "--proxy-url")
    assert SECRET not in result.stdout + result.stderr


def test_proxy_url_and_fapi_from_the_environment_are_checked() -> None:
    result = twistd(
        env={
            "CLERK_SECRET_KEY": SECRET,
            "CLERK_PROXY_URL": "https://app.test/__clerk",
            "CLERK_FAPI": "http://plain.test",
        }
    )
    assert_one_clear_line(result, "CLERK_FAPI", "https")


def test_unreadable_secret_key_file(tmp_path: Path) -> None:
    assert_one_clear_line(
        twistd(*GOOD, "--secret-key-file", str(tmp_path / "nope")), "--secret-key-file"
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tls-cert", "{fullchain}"], "--tls-key"),
        (["--tls-cert", "/nonexistent.pem", "--tls-key", "{key}"], "--tls-cert"),
        (["--tls-cert", "{garbage}", "--tls-key", "{key}"], "--tls-cert"),
        (["--tls-cert", "{fullchain}", "--tls-key", "{garbage}"], "--tls-key"),
        (["--tls-cert", "{fullchain}", "--tls-key", "{other_key}"], "does not match"),
        (["--fapi-ca", "{garbage}"], "--fapi-ca"),
        (["--fapi-ca", "/nonexistent.pem"], "--fapi-ca"),
        (["--port", "nonsense:1"], "--port"),
        (["--port", "systemd:domain=INET:index=0"], "LISTEN_FDS"),
        (["--port", "tls:tcp:8443"], "--tls-cert"),
        (["--max-body-size", "lots"], "--max-body-size"),
        (["--upstream-timeout", "-1"], "--upstream-timeout"),
        (["--body-timeout", "0"], "--body-timeout"),
        (["--upstream-read-timeout", "soon"], "--upstream-read-timeout"),
        (["--send-timeout", "-5"], "--send-timeout"),
        (["--trusted-proxy", "10.0.0.0/40"], "--trusted-proxy"),
        (["--http2", "maybe"], "--http2"),
        (["--h2-max-concurrent-streams", "0"], "--h2-max-concurrent-streams"),
        (["--h2-max-concurrent-streams", "many"], "--h2-max-concurrent-streams"),
    ],
)
def test_bad_files_and_values_name_the_option(
    pems: dict[str, str], args: list[str], needle: str
) -> None:
    filled = [a.format(**pems) for a in args]
    result = twistd(*GOOD, *filled, env={"CLERK_SECRET_KEY": SECRET})
    assert_one_clear_line(result, needle)
    assert SECRET not in result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_a_real_run_over_plain_tcp(
    fapi: Any, ca: trustme.CA, tmp_path: Path
) -> None:
    port = free_port()
    process = start_against(
        fapi, ca, tmp_path, ["--port", f"tcp:{port}:interface=127.0.0.1"]
    )
    try:
        await deferToThread(wait_listening, port, process)

        def get() -> tuple[int, bytes]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("POST", "/__clerk/v1/client?_clerk_js_version=5", body=b"a=1")
            response = conn.getresponse()
            return response.status, response.read()

        status, body = await deferToThread(get)
    finally:
        output = await deferToThread(stop, process)
    assert status == 200
    assert fapi.header("Clerk-Secret-Key") == [SECRET]
    assert fapi.seen[-1]["uri"] == "/v1/client?_clerk_js_version=5"
    assert SECRET not in output


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1")
@pytest_twisted.ensureDeferred
async def test_tls_termination_with_the_operators_certificate(
    fapi: Any, ca: trustme.CA, pems: dict[str, Any], tmp_path: Path
) -> None:
    port = free_port()
    process = start_against(
        fapi,
        ca,
        tmp_path,
        [
            "--port",
            str(port),
            "--tls-cert",
            pems["fullchain"],
            "--tls-key",
            pems["key"],
        ],
    )
    try:
        await deferToThread(wait_listening, port, process)

        def get(maximum: ssl.TLSVersion | None = None) -> tuple[int, str, bytes]:
            context = ssl.create_default_context(cafile=None)
            pems["ca_obj"].configure_trust(context)
            if maximum is not None:
                context.minimum_version = ssl.TLSVersion.TLSv1
                context.maximum_version = maximum
                context.set_ciphers("ALL:@SECLEVEL=0")
            conn = http.client.HTTPSConnection(
                "127.0.0.1", port, timeout=10, context=context
            )
            conn.request("GET", "/__clerk/v1/environment")
            response = conn.getresponse()
            version = conn.sock.version()
            return response.status, version, response.read()

        status, version, _ = await deferToThread(get)
        with pytest.raises((ssl.SSLError, OSError)):
            await deferToThread(get, ssl.TLSVersion.TLSv1_1)
    finally:
        await deferToThread(stop, process)
    assert status == 200
    assert version in ("TLSv1.2", "TLSv1.3")
