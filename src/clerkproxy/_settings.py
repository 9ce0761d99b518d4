"""
What one C{twistd clerkproxy} (or C{clerkproxy check}) run was asked to do.

L{read_settings} turns the parsed command line and the environment into
a frozen L{ServeSettings}, or raises L{ConfigError} with one sentence
naming the option at fault.  Everything that builds or checks the proxy
takes the settings, never the command-line parser.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ._acme import AcmeSettings
from ._config import DEFAULT_FAPI, ConfigError, ProxyConfig
from ._endpoints import check_admin_port, check_port
from ._h2 import HTTP2Settings
from ._sites import Site, read_sites
from ._sni import ServerTLS
from ._tls import ReloadableServerTLS, load_trust_root
from ._workers import ListenSpec, worker_listen_spec

if TYPE_CHECKING:
    from ._twisted_compat import IOpenSSLTrustRoot

__all__ = ["ServeSettings", "read_settings"]


@attrs.frozen
class ServeSettings:
    """
    Everything a serving process needs beyond L{ProxyConfig}.

    @ivar config: What to proxy, and how.
    @ivar tls: The serving certificate (C{--tls-cert}/C{--tls-key}), if any.
    @ivar fapiCA: C{--fapi-ca}, the file the trust root was read from.
    @ivar trustRoot: The CA certificates trusted for FAPI instead of the
        system's, if C{--fapi-ca} was given.
    @ivar ports: The C{--port} descriptions, C{tcp:8080} if none.
    @ivar adminPort: The C{--admin-port} description, if any.
    @ivar accessLog: The C{--access-log} file, C{-} for standard output.
    @ivar workers: How many serving processes.
    @ivar listenSpecs: With more than one worker, the sockets the parent
        binds for them, one per port.
    @ivar argv: The command line as given, for workers to parse again.
    @ivar maxRequestLine: C{--max-request-line}, in bytes.
    @ivar maxHeaderSize: C{--max-header-size}, in bytes.
    @ivar maxConnectionsPerClient: C{--max-connections-per-client}; 0 is
        no limit.
    @ivar http2: HTTP/2 to clients (C{--http2}, C{--h2c} and its limits).
    @ivar sites: With C{--config}, every site (C{config} is the first's).
    @ivar acme: What C{--acme-*} (or the config file's C{[acme]}) asks for.
    @ivar redirectHTTP: Whether plain-HTTP requests get a 308 to https.
    """

    config: ProxyConfig
    tls: ServerTLS | None
    fapiCA: str | None
    trustRoot: IOpenSSLTrustRoot | None
    headerTimeout: float
    idleTimeout: float
    drainTimeout: float
    ports: tuple[str, ...]
    adminPort: str | None
    accessLog: str | None
    workers: int
    listenSpecs: tuple[ListenSpec, ...]
    argv: tuple[str, ...]
    maxRequestLine: int = 16 * 1024
    maxHeaderSize: int = 64 * 1024
    maxConnectionsPerClient: int = 0
    http2: HTTP2Settings = attrs.field(factory=HTTP2Settings)
    sites: tuple[Site, ...] = ()
    acme: AcmeSettings | None = None
    redirectHTTP: bool = False


def read_settings(
    options: Mapping[str, Any], environ: Mapping[str, str], argv: Sequence[str] = ()
) -> ServeSettings:
    """
    The settings C{options} (parsed C{twistd clerkproxy} options) and
    C{environ} describe; L{ConfigError} for the first mistake found.
    """
    multi = read_sites(options, environ)
    if multi.file is not None:
        options = multi.options
        first = multi.file.sites[0]
        options["proxy-url"], options["app"] = first.proxy_url, first.app
        environ = {**environ, "CLERK_SECRET_KEY": first.secret}
    proxyURL = options["proxy-url"] or environ.get("CLERK_PROXY_URL")
    if not proxyURL:
        raise ConfigError(
            "no proxy URL: pass --proxy-url or set CLERK_PROXY_URL to the "
            "public URL registered with Clerk, e.g. https://app.example.com/__clerk"
        )
    keyFile = options["secret-key-file"]
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
    certPath, keyPath = options["tls-cert"], options["tls-key"]
    if bool(certPath) != bool(keyPath):
        raise ConfigError("--tls-cert and --tls-key must be given together")
    tls: ServerTLS | None = multi.tls
    if tls is None and certPath:
        tls = ReloadableServerTLS(certPath, keyPath)
    fapiCA = options["fapi-ca"] or None
    trustRoot = load_trust_root(fapiCA) if fapiCA else None
    config = ProxyConfig(
        proxy_url=proxyURL,
        secret_key=secret,
        fapi_url=options["fapi"] or environ.get("CLERK_FAPI") or DEFAULT_FAPI,
        trusted_proxies=options["trusted-proxy"],
        max_body_size=_number(options, "max-body-size", int),
        connect_timeout=_number(options, "connect-timeout", float),
        upstream_timeout=_number(options, "upstream-timeout", float),
        body_timeout=_number(options, "body-timeout", float),
        upstream_read_timeout=_number(options, "upstream-read-timeout", float),
        send_timeout=_number(options, "send-timeout", float),
        app_url=options["app"],
    )
    sites = multi.sites(config)
    headerTimeout = _number(options, "header-timeout", float)
    idleTimeout = _number(options, "idle-timeout", float)
    drainTimeout = _number(options, "drain-timeout", float)
    maxRequestLine = _number(options, "max-request-line", int)
    maxHeaderSize = _number(options, "max-header-size", int)
    if maxRequestLine < 256:
        raise ConfigError(
            f"--max-request-line must be at least 256 bytes, got {maxRequestLine}"
        )
    if maxHeaderSize < maxRequestLine:
        raise ConfigError(
            f"--max-header-size ({maxHeaderSize}) must be at least "
            f"--max-request-line ({maxRequestLine}): the head includes the line"
        )
    maxConnectionsPerClient = _number(options, "max-connections-per-client", int)
    accessLog = options["access-log"] or None
    if accessLog and accessLog != "-":
        try:
            open(accessLog, "a").close()
        except OSError as e:
            raise ConfigError(
                f"cannot write --access-log {accessLog}: {e.strerror}"
            ) from None
    ports = tuple(options["port"] or ["tcp:8080"])
    workers = _workers_count(options["workers"])
    if workers > 1 and multi.acme is not None:
        raise ConfigError(
            "--workers and ACME (--acme-domain, or acme = true in --config) "
            "cannot be combined: run one process"
        )
    listenSpecs: tuple[ListenSpec, ...] = ()
    if workers > 1:
        listenSpecs = tuple(
            worker_listen_spec(
                description,
                tls is not None
                and (description.isdigit() or description.startswith("haproxy:")),
            )
            for description in ports
        )
    for description in ports:
        check_port(description, tls)
    adminPort = options["admin-port"] or None
    if adminPort:
        check_admin_port(adminPort)
    http2 = options.get("http2", "on")
    if http2 not in ("on", "off"):
        raise ConfigError(f"--http2 must be on or off, got {http2!r}")
    streams = _number(
        {"h2-max-concurrent-streams": options.get("h2-max-concurrent-streams", 100)},
        "h2-max-concurrent-streams",
        int,
    )
    if streams < 1:
        raise ConfigError(
            f"--h2-max-concurrent-streams must be at least 1, got {streams!r}"
        )
    return ServeSettings(
        http2=HTTP2Settings(
            tls=http2 == "on",
            h2c=bool(options.get("h2c")),
            maxConcurrentStreams=streams,
            sendTimeout=config.timeouts.send,
        ),
        config=config,
        tls=tls,
        fapiCA=fapiCA,
        trustRoot=trustRoot,
        headerTimeout=headerTimeout,
        idleTimeout=idleTimeout,
        drainTimeout=drainTimeout,
        ports=ports,
        adminPort=adminPort,
        accessLog=accessLog,
        workers=workers,
        listenSpecs=listenSpecs,
        argv=tuple(argv),
        maxRequestLine=maxRequestLine,
        maxHeaderSize=maxHeaderSize,
        maxConnectionsPerClient=maxConnectionsPerClient,
        sites=sites,
        acme=multi.acme,
        redirectHTTP=multi.redirect(ports, tls, config.trusted_proxies),
    )


def _number(
    options: Mapping[str, Any], name: str, kind: type[float] | type[int]
) -> Any:
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
