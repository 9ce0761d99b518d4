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

from twisted.application.service import IService
from twisted.internet.endpoints import SSL4ServerEndpoint, _parse, serverFromString
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.testing import MemoryReactor
from twisted.logger import Logger
from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from zope.interface import implementer

from ._accesslog import AccessLog
from ._admin import admin_site
from ._config import DEFAULT_FAPI, ConfigError, MiB, ProxyConfig
from ._metrics import Metrics
from ._proxy import AppProxy, EdgeRouter, FrontendAPIProxy
from ._service import ProxyService
from ._site import build_site
from ._tls import ReloadableServerTLS, load_trust_root
from ._upstream import UpstreamPool, app_endpoint
from ._workers import WorkerSupervisor, bind, worker_listen_spec

__all__ = ["Options", "makeService"]

_log = Logger(namespace="clerkproxy")


def _number(options: usage.Options, name: str, kind: type[float] | type[int]) -> Any:
    value = options[name]
    if isinstance(value, kind):
        return value
    try:
        number = kind(value)
    except (TypeError, ValueError):
        number = -1
    if number < 0 or (kind is float and number == 0):
        what = "a whole number" if kind is int else "a positive number"
        raise ConfigError(f"--{name} must be {what}, got {value!r}")
    return number


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
            "Public proxy URL as registered with Clerk [env: CLERK_PROXY_URL].",
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
            "PEM file of CA certificates to trust for FAPI (not the system's).",
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
            "body-timeout",
            None,
            30.0,
            "Seconds a request body may go without a byte from the client.",
        ],
        [
            "upstream-read-timeout",
            None,
            60.0,
            "Seconds FAPI's response body may go without a byte.",
        ],
        [
            "send-timeout",
            None,
            60.0,
            "Seconds a client may go without taking a byte of its response.",
        ],
        ["header-timeout", None, 10.0, "Seconds a request head may take to arrive."],
        ["idle-timeout", None, 60.0, "Seconds an idle keep-alive connection is kept."],
        [
            "drain-timeout",
            None,
            30.0,
            "Seconds in-flight requests get to finish on SIGTERM.",
        ],
        [
            "admin-port",
            None,
            None,
            "Endpoint for /metrics, /healthz and /readyz, e.g. tcp:9901.",
        ],
        ["access-log", None, None, "JSON access log file, or - for standard output."],
        [
            "app",
            None,
            None,
            "The application's origin URL, for every path outside the proxy prefix.",
        ],
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
        self.tls = ReloadableServerTLS(certPath, keyPath) if certPath else None
        self.trustRoot = load_trust_root(self["fapi-ca"]) if self["fapi-ca"] else None
        self.config = ProxyConfig(
            proxy_url=proxyURL,
            secret_key=secret,
            fapi_url=self["fapi"] or environ.get("CLERK_FAPI") or DEFAULT_FAPI,
            trusted_proxies=self["trusted-proxy"],
            max_body_size=_number(self, "max-body-size", int),
            connect_timeout=_number(self, "connect-timeout", float),
            upstream_timeout=_number(self, "upstream-timeout", float),
            body_timeout=_number(self, "body-timeout", float),
            upstream_read_timeout=_number(self, "upstream-read-timeout", float),
            send_timeout=_number(self, "send-timeout", float),
            app_url=self["app"],
        )
        self.headerTimeout = _number(self, "header-timeout", float)
        self.idleTimeout = _number(self, "idle-timeout", float)
        self.drainTimeout = _number(self, "drain-timeout", float)
        accessLog = self["access-log"]
        if accessLog and accessLog != "-":
            try:
                open(accessLog, "a").close()
            except OSError as e:
                raise ConfigError(
                    f"cannot write --access-log {accessLog}: {e.strerror}"
                ) from None
        self.ports = self["port"] or ["tcp:8080"]
        self.workers = _workers_count(self["workers"])
        if self.workers > 1:
            tls = self.tls is not None
            self.listenSpecs = [
                worker_listen_spec(
                    description,
                    tls
                    and (description.isdigit() or description.startswith("haproxy:")),
                )
                for description in self.ports
            ]
        for description in self.ports:
            self._endpoint(MemoryReactor(), description)  # syntax check only
        if self["admin-port"]:
            self.adminEndpoint(MemoryReactor(), 0)

    def _endpoint(self, reactor: Any, description: str) -> IStreamServerEndpoint:
        """
        A C{--port} value as an endpoint.  A bare number is TLS when a
        certificate is configured; C{tls:ENDPOINT} puts the certificate on
        any endpoint; C{haproxy:ENDPOINT} with a certificate reads the PROXY
        header first and then terminates TLS.  Anything else is Twisted's
        own endpoint syntax, used as written.
        """
        tls = self.tls
        if description.startswith("tls:"):
            if tls is None:
                raise ConfigError(
                    f"--port {description!r} needs --tls-cert and --tls-key"
                )
            return _TLSEndpoint(self._plain(reactor, description[len("tls:") :]), tls)
        if description.startswith("haproxy:") and tls is not None:
            # A load balancer's PROXY header comes first, in clear; TLS
            # (with our certificate) follows it on the same connection.
            inner = self._plain(reactor, description[len("haproxy:") :])
            return _ProxiedTLSEndpoint(inner, tls)
        if description.isdigit() and tls is not None:
            endpoint: IStreamServerEndpoint = SSL4ServerEndpoint(
                reactor, int(description), tls
            )
            return endpoint
        return self._plain(reactor, description)

    def _plain(self, reactor: Any, description: str) -> IStreamServerEndpoint:
        if description.isdigit():
            description = f"tcp:{description}"
        try:
            parsed: IStreamServerEndpoint = serverFromString(reactor, description)
        except Exception as e:  # parsers raise anything from KeyError to IndexError
            hint = ""
            if "systemd:" in description:
                hint = "; systemd passed no such socket (LISTEN_FDS)"
            raise ConfigError(
                f"--port {description!r} is not a usable endpoint description "
                f"({type(e).__name__}: {e}{hint})"
            ) from None
        return parsed

    def adminEndpoint(self, reactor: Any, index: int) -> IStreamServerEndpoint:
        """
        The admin endpoint; worker C{index} of C{--workers} listens C{index}
        ports above the one given.
        """
        description = self["admin-port"]
        if index or self.workers > 1:
            args, kwargs = _parse(description)
            if not args or args[0] != "tcp" or len(args) != 2 or not args[1].isdigit():
                raise ConfigError(
                    "with --workers, --admin-port must be tcp:PORT[:interface=...] "
                    "(worker N serves it on PORT+N)"
                )
            port = int(args[1]) + index
            extra = "".join(
                ":{}={}".format(k, v.replace(":", "\\:")) for k, v in kwargs.items()
            )
            description = f"tcp:{port}{extra}"
        try:
            endpoint: IStreamServerEndpoint = serverFromString(reactor, description)
        except Exception as e:
            raise ConfigError(
                f"--admin-port {description!r} is not a usable endpoint "
                f"description ({type(e).__name__}: {e})"
            ) from None
        return endpoint


@implementer(IStreamServerEndpoint)
class _ProxiedTLSEndpoint:
    """PROXY protocol, then TLS, then HTTP, on any stream endpoint."""

    def __init__(self, inner: IStreamServerEndpoint, tls: ReloadableServerTLS) -> None:
        self._inner = inner
        self._tls = tls

    def listen(self, factory: Any) -> Any:
        wrapped = HAProxyWrappingFactory(TLSMemoryBIOFactory(self._tls, False, factory))
        return self._inner.listen(wrapped)


@implementer(IStreamServerEndpoint)
class _TLSEndpoint:
    """TLS with the reloadable serving certificate, on any stream endpoint."""

    def __init__(self, inner: IStreamServerEndpoint, tls: ReloadableServerTLS) -> None:
        self._inner = inner
        self._tls = tls

    def listen(self, factory: Any) -> Any:
        return self._inner.listen(TLSMemoryBIOFactory(self._tls, False, factory))


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


def build_service(
    options: Options,
    reactor: Any,
    endpoints: Sequence[IStreamServerEndpoint],
    index: int = 0,
    installSignals: bool = True,
) -> ProxyService:
    """One serving process: proxy, site, admin listener, drain and reload."""
    config = options.config
    metrics = Metrics()
    fapi = FrontendAPIProxy(
        config, reactor, trustRoot=options.trustRoot, metrics=metrics
    )
    pools = [fapi.upstream]
    app = None
    if config.app is not None:
        origin = config.app
        appPool = UpstreamPool(
            reactor,
            app_endpoint(
                reactor, origin.host, origin.port, origin.tls, config.connect_timeout
            ),
            maxConnections=config.pool_size,
            idleTimeout=config.pool_idle_timeout,
        )
        app = AppProxy(
            reactor,
            appPool,
            origin.host_header,
            origin.base_path,
            fapi.clientAddress,
            config.max_body_size,
            config.timeouts,
            metrics,
        )
        pools.append(appPool)
    metrics.upstreamOpened = lambda: sum(pool.connectionsOpened for pool in pools)
    accessLog = AccessLog.open(options["access-log"]) if options["access-log"] else None
    root = EdgeRouter(fapi, app) if app is not None else fapi
    site = build_site(
        root,
        reactor,
        header_timeout=options.headerTimeout,
        idle_timeout=options.idleTimeout,
        metrics=metrics,
        access_log=accessLog,
        client_address=fapi.clientAddress,
    )
    admin = None
    if options["admin-port"]:
        admin = (
            options.adminEndpoint(reactor, index),
            admin_site(metrics, lambda: site.draining, reactor),
        )
    service = ProxyService(
        reactor,
        site,
        pools,
        endpoints,
        options.drainTimeout,
        admin=admin,
        tls=options.tls,
        accessLog=accessLog,
        installSignals=installSignals,
    )
    # Everything built so far lives as long as the process: keep it out of
    # the cyclic collector's full passes, which otherwise add tail latency.
    reactor.callWhenRunning(gc.freeze)
    return service


def makeService(options: Options) -> IService:
    """The listening ports, the proxy behind them, and its FAPI pool."""
    from twisted.internet import reactor

    if options.workers > 1:
        return _workersService(options, reactor)
    config = options.config
    try:
        endpoints = [options._endpoint(reactor, d) for d in options.ports]
        service = build_service(options, reactor, endpoints)
    except ConfigError as e:
        raise SystemExit(f"clerkproxy: {e}") from None
    _log.info(
        "clerkproxy: {prefix}/* -> {fapi}{app} on {ports}",
        prefix=config.prefix.decode("ascii"),
        fapi=config.fapi_url,
        app=f", everything else -> {config.app_url}" if config.app_url else "",
        ports=", ".join(options.ports),
    )
    return service


def adopted(
    reactor: Any, fd: int, family: int, kind: str, tls: Any
) -> IStreamServerEndpoint:
    """An endpoint that serves an inherited listening socket."""
    return _AdoptedEndpoint(reactor, fd, family, kind, tls)


@implementer(IStreamServerEndpoint)
class _AdoptedEndpoint:
    def __init__(self, reactor: Any, fd: int, family: int, kind: str, tls: Any) -> None:
        self._reactor, self._fd, self._family = reactor, fd, family
        self._kind, self._tls = kind, tls

    def listen(self, factory: Any) -> Any:
        from twisted.internet.defer import succeed

        if self._kind.endswith("tls"):
            factory = TLSMemoryBIOFactory(self._tls, False, factory)
        if self._kind.startswith("haproxy-"):
            factory = HAProxyWrappingFactory(factory)
        port = self._reactor.adoptStreamPort(self._fd, self._family, factory)
        os.close(self._fd)  # adoptStreamPort keeps its own duplicate
        return succeed(port)


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
    return WorkerSupervisor(
        reactor, options.workers, sockets, options.argv, options.drainTimeout
    )
