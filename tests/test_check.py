"""`clerkproxy check`, the doctor, against the stand-in FAPI and a proxy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest_twisted
import trustme
from conftest import PROXY_URL, SECRET
from twisted.internet.threads import deferToThread

CLERKPROXY = str(Path(sys.executable).with_name("clerkproxy"))


def check(*args: str, key: str = SECRET) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_")}
    env["CLERK_SECRET_KEY"] = key
    return subprocess.run(
        [CLERKPROXY, "check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ca_file(ca: trustme.CA, where: Path) -> str:
    path = where / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


def lines(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    out = {}
    for line in result.stdout.splitlines():
        status, _, rest = line.partition(" ")
        name = rest.strip().split(":", 1)[0]
        if status in ("ok", "FAIL"):
            out[name] = line
    return out


@pytest_twisted.ensureDeferred
async def test_a_healthy_deployment_passes_every_check(
    make_proxy: Any, fapi: Any, ca: trustme.CA, tmp_path: Path
) -> None:
    fapi.recorder.expected = (PROXY_URL, SECRET)
    proxy = make_proxy()
    result = await deferToThread(
        check,
        "--proxy-url",
        PROXY_URL,
        "--fapi",
        fapi.url,
        "--fapi-ca",
        ca_file(ca, tmp_path),
        "--public",
        f"{proxy.url}/__clerk",
    )
    found = lines(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(found) == {"configuration", "dns", "tcp", "tls", "fapi", "public"}
    assert all(line.startswith("ok") for line in found.values())
    assert "all 6 checks passed" in result.stdout
    assert SECRET not in result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_an_unregistered_proxy_url_and_a_wrong_key_say_how_to_fix(
    make_proxy: Any, fapi: Any, ca: trustme.CA, tmp_path: Path
) -> None:
    fapi.recorder.expected = ("https://registered.test/__clerk", SECRET)
    proxy = make_proxy()
    result = await deferToThread(
        check,
        "--proxy-url",
        PROXY_URL,
        "--fapi",
        fapi.url,
        "--fapi-ca",
        ca_file(ca, tmp_path),
        "--public",
        f"{proxy.url}/__clerk",
    )
    found = lines(result)
    assert result.returncode == 1
    assert (
        found["fapi"].startswith("FAIL")
        and "host_invalid" in found["fapi"]
        and "fix:" in found["fapi"]
    )
    assert "PATCH /v1/domains" in found["fapi"]
    wrong = "sk_live_" + "wrong" * 5
    result = await deferToThread(
        check,
        "--proxy-url",
        "https://registered.test/__clerk",
        "--fapi",
        fapi.url,
        "--fapi-ca",
        ca_file(ca, tmp_path),
        "--public",
        f"{proxy.url}/__clerk",
        key=wrong,
    )
    found = lines(result)
    assert "refused the secret key" in found["fapi"]
    assert wrong not in result.stdout and SECRET not in result.stdout


@pytest_twisted.ensureDeferred
async def test_unreachable_and_untrusted_fapi(fapi: Any, tmp_path: Path) -> None:
    other = trustme.CA()
    result = await deferToThread(
        check,
        "--proxy-url",
        PROXY_URL,
        "--fapi",
        fapi.url,
        "--fapi-ca",
        ca_file(other, tmp_path),
        "--public",
        "http://127.0.0.1:9/__clerk",
    )
    found = lines(result)
    assert found["tls"].startswith("FAIL") and "fix:" in found["tls"]
    assert "fapi" not in found  # no point asking FAPI over a connection we do not trust
    assert found["public"].startswith("FAIL")
    result = await deferToThread(
        check,
        "--proxy-url",
        PROXY_URL,
        "--fapi",
        "https://nonexistent.invalid",
        "--public",
        "http://127.0.0.1:9/__clerk",
    )
    assert lines(result)["dns"].startswith("FAIL")
    assert result.returncode == 1


def test_bad_configuration_is_the_first_failed_check() -> None:
    result = check("--proxy-url", "/relative", key="sk_test_nope")
    found = lines(result)
    assert found["configuration"].startswith("FAIL")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "sk_test_nope" not in result.stdout


def test_unknown_command_and_help() -> None:
    result = subprocess.run(
        [CLERKPROXY, "frobnicate"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2 and "usage: clerkproxy check" in result.stderr
    result = subprocess.run(
        [CLERKPROXY, "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "twistd -n clerkproxy" in result.stdout
