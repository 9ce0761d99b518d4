"""
C{twistd clerkproxy}: options, and the service they describe.

Every configuration mistake is found while the options are parsed and ends
the process with one sentence on stderr and a non-zero exit; the reactor is
imported only when the service is built.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import SSL4ServerEndpoint, serverFromString
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger
from twisted.python import usage

from ._config import DEFAULT_FAPI, ConfigError, MiB, ProxyConfig
from ._proxy import FrontendAPIProxy
from ._site import build_site
from ._tls import load_trust_root, server_tls_options
from ._upstream import UpstreamPool
from ._workers import WorkerSupervisor, bind, worker_listen_spec

__all__ = ["Options", "makeService"]

_log = Logger(namespace="clerkproxy")


def _number(options: usage.Options, name: str, kind: type[float] | type[int]) -> Any:
    value = options[name]
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except (TypeError, ValueError):
        what = "a whole number" if kind is int else "a number"
        raise ConfigError(f"--{name} must be {what}, got {value!r}") from None


class Options(usage.Options):
    """Command-line options; see docs/configuration.md."""

    synopsis = "[options]"
    longdesc = (
        "Serve Clerk's Frontend API from your own domain.  The secret key "
        "comes from CLERK_SECRET_KEY or --secret-key-file, never the command line."
    )

    optParameters = [
        [
            "proxy-url",
            None,
            None,
            "Public proxy URL as registered with Clerk "
            "[env: CLERK_PROXY_URL] (required).",
        ],
        [
            "fapi",
            None,
            None,
            f"Frontend API URL [env: CLERK_FAPI] (default {DEFAULT_FAPI}).",
        ],
        [
            "fapi-ca",
            None,
            None,
            "PEM file of CA certificates to trust for FAPI "
            "instead of the system store.",
        ],
        [
            "secret-key-file",
            None,
            None,
            "File holding the secret key (else CLERK_SECRET_KEY).",
        ],
        ["tls-cert", None, None, "PEM certificate chain for serving HTTPS."],
        ["tls-key", None, None, "PEM private key for --tls-cert."],
        ["max-body-size", None, 16 * MiB, "Largest request body relayed, in bytes."],
        ["connect-timeout", None, 10.0, "Seconds to connect to FAPI."],
        ["upstream-timeout", None, 30.0, "Seconds for FAPI to start answering."],
        [
            "workers",
            None,
            "1",
            "Worker processes sharing the ports: a number, or auto for one per CPU.",
        ],
    ]

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["port"] = []
        self["trusted-proxy"] = []

    def opt_port(self, description: str) -> None:
        """Listen here: an endpoint description, or a bare port number
        (TLS when --tls-cert is given).  Repeatable; default tcp:8080."""
        self["port"].append(description)

    def opt_trusted_proxy(self, cidr: str) -> None:
        """A peer range whose X-Forwarded-For is believed.  Repeatable."""
        self["trusted-proxy"].append(cidr)

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # Kept verbatim so that worker processes can parse the same options.
        self.argv = list(sys.argv[1:] if options is None else options)
        usage.Options.parseOptions(self, options)

    def postOptions(self) -> None:
        try:
            self._configure(os.environ)
        except ConfigError as e:
            raise SystemExit(f"clerkproxy: {e}") from None

    def _configure(self, environ: Any) -> None:
        proxyURL = self["proxy-url"] or environ.get("CLERK_PROXY_URL")
        if not proxyURL:
            raise ConfigError(
                "no proxy URL: pass --proxy-url or set CLERK_PROXY_URL to the "
                "public URL registered with Clerk, e.g. https://app.example.com/__clerk"
            )
        keyFile = self["secret-key-file"]
        if keyFile:
            try:
                with open(keyFile, "rb") as f:
                    secret: str | bytes = f.read()
            except OSError as e:
                raise ConfigError(
                    f"cannot read --secret-key-file {keyFile}: {e.strerror}"
                ) from None
        else:
            secret = environ.get("CLERK_SECRET_KEY", "")
        certPath, keyPath = self["tls-cert"], self["tls-key"]
        if bool(certPath) != bool(keyPath):
            raise ConfigError("--tls-cert and --tls-key must be given together")
        self.tlsOptions = server_tls_options(certPath, keyPath) if certPath else None
        self.trustRoot = load_trust_root(self["fapi-ca"]) if self["fapi-ca"] else None
        self.config = ProxyConfig(
            proxy_url=proxyURL,
            secret_key=secret,
            fapi_url=self["fapi"] or environ.get("CLERK_FAPI") or DEFAULT_FAPI,
            trusted_proxies=self["trusted-proxy"],
            max_body_size=_number(self, "max-body-size", int),
            connect_timeout=_number(self, "connect-timeout", float),
            upstream_timeout=_number(self, "upstream-timeout", float),
        )
        self.ports = self["port"] or ["tcp:8080"]
        self.workers = _workers_count(self["workers"])
        if self.workers > 1:
            tls = self.tlsOptions is not None
            self.listenSpecs = [
                worker_listen_spec(description, tls and description.isdigit())
                for description in self.ports
            ]
        for description in self.ports:
            self._endpoint(MemoryReactor(), description)  # syntax check only

    def _endpoint(self, reactor: Any, description: str) -> Any:
        if description.isdigit():
            port = int(description)
            if self.tlsOptions is not None:
                return SSL4ServerEndpoint(reactor, port, self.tlsOptions)
            description = f"tcp:{port}"
        try:
            return serverFromString(reactor, description)
        except Exception as e:  # parsers raise anything from KeyError to IndexError
            hint = ""
            if description.startswith("systemd:"):
                hint = "; systemd passed no such socket (LISTEN_FDS)"
            raise ConfigError(
                f"--port {description!r} is not a usable endpoint description "
                f"({type(e).__name__}: {e}{hint})"
            ) from None


class _PoolCloser(Service):
    """Closes FAPI connections when the process stops."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        return self._pool.close()


def _workers_count(value: str) -> int:
    if value == "auto":
        return os.cpu_count() or 1
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise ConfigError(
            f"--workers must be a whole number of at least 1, or auto; got {value!r}"
        )
    return count


def makeService(options: Options) -> IService:
    """The listening ports, the proxy behind them, and its FAPI pool."""
    from twisted.internet import reactor

    if options.workers > 1:
        return _workersService(options, reactor)
    config = options.config
    proxy = FrontendAPIProxy(config, reactor, trustRoot=options.trustRoot)
    site = build_site(proxy, reactor)
    service = MultiService()
    for description in options.ports:
        endpoint = options._endpoint(reactor, description)
        service.addService(StreamServerEndpointService(endpoint, site))
    service.addService(_PoolCloser(proxy.upstream))
    # Everything built so far lives as long as the process: keep it out of
    # the cyclic collector's full passes, which otherwise add tail latency.
    reactor.callWhenRunning(gc.freeze)
    _log.info(
        "clerkproxy: {prefix}/* -> {fapi} on {ports}",
        prefix=config.prefix.decode("ascii"),
        fapi=config.fapi_url,
        ports=", ".join(options.ports),
    )
    return service


def _workersService(options: Options, reactor: Any) -> IService:
    try:
        sockets = [(bind(spec), spec) for spec in options.listenSpecs]
    except ConfigError as e:
        raise SystemExit(f"clerkproxy: {e}") from None
    _log.info(
        "clerkproxy: {workers} workers, {prefix}/* -> {fapi} on {ports}",
        workers=options.workers,
        prefix=options.config.prefix.decode("ascii"),
        fapi=options.config.fapi_url,
        ports=", ".join(options.ports),
    )
    return WorkerSupervisor(reactor, options.workers, sockets, options.argv)
