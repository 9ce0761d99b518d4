"""
C{clerkproxy check}: a doctor for a proxy deployment.

It reads the same options and variables as C{twistd clerkproxy} and checks,
in order, what a proxy needs to work: the configuration, FAPI's name, a TCP
connection, a verified TLS handshake, FAPI accepting our C{Clerk-Proxy-Url}
and key, and the public proxy URL answering C{/v1/proxy-health} within the
one second Clerk's own validation allows.  Each check prints one line, and
each failure says how to fix it.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import treq
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.python import usage
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS

from ._config import ConfigError
from ._settings import ServeSettings, read_settings
from .tap import Options

__all__ = ["CheckOptions", "run_checks"]

#: What Clerk's proxy validation waits for /v1/proxy-health (Go's default).
PUBLIC_DEADLINE = 1.0
_KEY_ERRORS = {
    "host_invalid": (
        "FAPI does not know this proxy URL",
        "register exactly {proxy} as the proxy URL (Dashboard: Domains > "
        "Frontend API > Advanced, or PATCH /v1/domains/{{id}})",
    ),
    "proxy_request_invalid_secret_key": (
        "FAPI refused the secret key",
        "use the secret key (sk_live_...) of the instance whose proxy URL is {proxy}",
    ),
    "proxy_request_missing_secret_key": (
        "FAPI saw no secret key",
        "make sure nothing between here and FAPI strips Clerk-Secret-Key",
    ),
}


class CheckOptions(Options):
    """C{twistd clerkproxy}'s options, plus where the public side is."""

    synopsis = "check [options]"
    optParameters = [
        *Options.optParameters,
        ["public", None, None, "Public proxy URL to test (default: the proxy URL)."],
        [
            "domain-id",
            None,
            None,
            "The Clerk domain id (dmn_...) for /v1/proxy-health.",
        ],
    ]

    configError: str | None = None

    def postOptions(self) -> None:
        # Configuration errors are the first check's to report.
        try:
            self.settings = read_settings(self, _environ(), self.argv)
        except ConfigError as e:
            self.configError = str(e)


def _environ() -> Any:
    import os

    return os.environ


@attrs.frozen
class Result:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok    {self.name}: {self.detail}"
        return f"FAIL  {self.name}: {self.detail}" + (
            f" -- fix: {self.fix}" if self.fix else ""
        )


async def run_checks(
    reactor: Any,
    settings: ServeSettings | None,
    configError: str | None = None,
    public: str | None = None,
    domainId: str | None = None,
    say: Callable[[str], object] = print,
) -> int:
    """
    Run every check that can run; the number that failed.

    @param settings: What C{twistd clerkproxy} would serve, or L{None} if
        the configuration is wrong, as C{configError} says.
    @param public: The public proxy URL to test, if not the proxy URL.
    @param domainId: The Clerk domain id, for C{/v1/proxy-health}.
    """
    results: list[Result] = []

    def record(result: Result) -> bool:
        results.append(result)
        say(result.line())
        return result.ok

    if settings is None:
        detail = configError or "no configuration"
        record(Result("configuration", False, detail, "see docs/configuration.md"))
        return 1
    config = settings.config
    record(
        Result(
            "configuration",
            True,
            f"proxy URL {config.proxy_url}, FAPI {config.fapi_url}, key sk_live_...",
        )
    )
    host, port = config.fapi_host, config.fapi_port
    ok = record(await _dns(host, port))
    ok = ok and record(await _tcp(host, port, config.connect_timeout))
    ok = ok and record(await _tls(host, port, settings.fapiCA, config.connect_timeout))
    if ok:
        record(await _fapi(reactor, settings))
    public = public or config.proxy_url
    record(await _public(reactor, public.rstrip("/"), domainId))
    failed = sum(not r.ok for r in results)
    say(
        f"clerkproxy check: all {len(results)} checks passed"
        if not failed
        else f"clerkproxy check: {failed} of {len(results)} checks failed"
    )
    return failed


async def _dns(host: str, port: int) -> Result:
    try:
        infos = await deferToThread(
            socket.getaddrinfo, host, port, type=socket.SOCK_STREAM
        )
    except OSError as e:
        return Result(
            "dns",
            False,
            f"{host} does not resolve ({e.strerror or e})",
            "check the --fapi host and this machine's DNS resolver",
        )
    addresses = sorted({str(info[4][0]) for info in infos})
    return Result("dns", True, f"{host} is {', '.join(addresses[:4])}")


async def _tcp(host: str, port: int, timeout: float) -> Result:
    def connect() -> None:
        socket.create_connection((host, port), timeout=timeout).close()

    try:
        await deferToThread(connect)
    except OSError as e:
        return Result(
            "tcp",
            False,
            f"cannot connect to {host}:{port} ({e.strerror or e})",
            "allow outbound connections to it on port "
            f"{port} (firewall, egress proxy, security group)",
        )
    return Result("tcp", True, f"connected to {host}:{port}")


async def _tls(host: str, port: int, caFile: str | None, timeout: float) -> Result:
    def handshake() -> str:
        context = ssl.create_default_context(cafile=caFile)
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as sock,
        ):
            return f"{sock.version()}, certificate verified for {host}"

    try:
        detail = await deferToThread(handshake)
    except ssl.SSLCertVerificationError as e:
        return Result(
            "tls",
            False,
            f"{host}'s certificate was not accepted ({e.verify_message})",
            "install the system CA certificates (ca-certificates), or pass --fapi-ca "
            "for a private upstream",
        )
    except (OSError, ssl.SSLError) as e:
        return Result(
            "tls",
            False,
            f"TLS handshake with {host} failed ({e})",
            "check that --fapi points at an HTTPS server",
        )
    return Result("tls", True, detail)


async def _fapi(reactor: Any, settings: ServeSettings) -> Result:
    config = settings.config
    url = config.fapi_url.rstrip("/") + "/v1/environment"
    policy = BrowserLikePolicyForHTTPS(trustRoot=settings.trustRoot)
    client = treq.client.HTTPClient(Agent(reactor, contextFactory=policy))
    headers: Any = {
        b"Clerk-Proxy-Url": [config.proxy_url_header],
        b"Clerk-Secret-Key": [config.secret_key.headerValue()],
        b"X-Forwarded-For": [b"127.0.0.1"],
    }
    try:
        response = await client.get(
            url, headers=headers, timeout=config.upstream_timeout
        )
        body = await response.content()
    except Exception as e:
        return Result(
            "fapi",
            False,
            f"no answer from {url} ({type(e).__name__})",
            "rerun; if it persists, check https://status.clerk.com",
        )
    code = _error_code(body)
    if response.code == 200:
        return Result("fapi", True, "FAPI accepts this proxy URL and secret key")
    if code in _KEY_ERRORS:
        what, fix = _KEY_ERRORS[code]
        return Result(
            "fapi",
            False,
            f"{what} ({response.code} {code})",
            fix.format(proxy=config.proxy_url),
        )
    return Result(
        "fapi",
        False,
        f"FAPI answered {response.code} {code or ''}".strip(),
        "see the error code in Clerk's Frontend API reference",
    )


async def _public(reactor: Any, public: str, domainId: str | None) -> Result:
    url = public + "/v1/proxy-health" + (f"?domain_id={domainId}" if domainId else "")
    started = time.monotonic()
    try:
        response = await treq.get(url, allow_redirects=False, timeout=5)
        body = await response.content()
    except Exception as e:
        return Result(
            "public",
            False,
            f"{url} did not answer ({type(e).__name__}: {e})",
            "make sure the proxy URL's host resolves to this proxy (or the load "
            "balancer before it) and its port is open",
        )
    elapsed = time.monotonic() - started
    location = response.headers.getRawHeaders(b"Location")
    if 300 <= response.code < 400:
        return Result(
            "public",
            False,
            f"{url} redirects to {location[0].decode() if location else '?'}",
            "serve the proxy path directly: Clerk's check and clerk-js "
            "must not be redirected",
        )
    status = _json(body).get("status")
    if response.code == 200 and status == "healthy":
        if elapsed > PUBLIC_DEADLINE:
            return Result(
                "public",
                False,
                f"healthy, but took {elapsed:.2f}s",
                f"Clerk's validation gives up after {PUBLIC_DEADLINE:g}s; "
                "check latency to FAPI and to the proxy",
            )
        return Result("public", True, f"{url} is healthy in {elapsed * 1000:.0f} ms")
    code = _error_code(body)
    if response.code == 404 and not code:
        return Result(
            "public",
            False,
            f"{url} answered 404",
            "the proxy URL's path must match the prefix the proxy serves",
        )
    if code and "domain" in code and not domainId:
        return Result(
            "public",
            True,
            f"{url} reaches FAPI in {elapsed * 1000:.0f} ms "
            f"(pass --domain-id for the full health check; FAPI said {code})",
        )
    if code in _KEY_ERRORS:
        what, fix = _KEY_ERRORS[code]
        return Result(
            "public", False, f"{what}, through {url}", fix.format(proxy=public)
        )
    return Result(
        "public",
        False,
        f"{url} answered {response.code} {code or ''}".strip(),
        "check the proxy's log for this request",
    )


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _error_code(body: bytes) -> str | None:
    errors = _json(body).get("errors")
    if isinstance(errors, list) and errors and isinstance(errors[0], dict):
        code = errors[0].get("code")
        return code if isinstance(code, str) else None
    return None


def main(argv: Sequence[str]) -> int:
    """Parse C{check}'s options and run it; the process exit status."""
    options = CheckOptions()
    try:
        options.parseOptions(list(argv))
    except usage.UsageError as e:
        print(f"clerkproxy check: {e}", file=sys.stderr)
        return 2
    outcome: list[int] = []

    async def go(reactor: Any) -> None:
        outcome.append(
            await run_checks(
                reactor,
                options.settings if options.configError is None else None,
                options.configError,
                options["public"],
                options["domain-id"],
            )
        )

    from twisted.internet.task import react

    try:
        react(lambda r: Deferred.fromCoroutine(go(r)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return 1 if outcome and outcome[0] else (0 if outcome else 1)
