"""
C{twistd clerkproxy}: the command line, and the service it describes.

Every configuration mistake is found while the options are parsed and ends
the process with one sentence on stderr and a non-zero exit; the options
become a frozen L{ServeSettings} (see L{clerkproxy._settings}), and the
reactor is imported only when the service is built from them.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from ._acme import LETS_ENCRYPT
from ._config import DEFAULT_FAPI, ConfigError, MiB
from ._endpoints import server_endpoint
from ._serve import build_service, build_supervisor
from ._settings import ServeSettings, read_settings

__all__ = ["Options", "makeService"]

_log = Logger(namespace="clerkproxy")


class Options(usage.Options):
    """
    Command-line options; see docs/configuration.md.

    @ivar settings: What the options and the environment describe, once
        parsed.
    """

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
            "max-request-line",
            None,
            16 * 1024,
            "Longest request line, in bytes (414 above it).",
        ],
        [
            "max-header-size",
            None,
            64 * 1024,
            "Largest request head, in bytes (431 above it).",
        ],
        [
            "max-connections-per-client",
            None,
            0,
            "Open connections allowed per client address; 0 is no limit.",
        ],
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
        ["config", None, None, "A TOML file describing one or more sites."],
        ["acme-email", None, None, "Contact address for the ACME account."],
        [
            "acme-directory",
            None,
            None,
            f"ACME directory URL (default Let's Encrypt, {LETS_ENCRYPT}).",
        ],
        ["acme-ca", None, None, "PEM trust roots for a private ACME server."],
        [
            "acme-dir",
            None,
            None,
            "Where the ACME account key and certificates are kept "
            "(default $STATE_DIRECTORY/acme, else ./clerkproxy-acme).",
        ],
        [
            "acme-challenge",
            None,
            None,
            "Use only this challenge: tls-alpn-01 or http-01 (default both).",
        ],
        [
            "http2",
            None,
            "on",
            "Offer HTTP/2 (ALPN h2) on TLS listeners: on or off.",
        ],
        [
            "h2-max-concurrent-streams",
            None,
            100,
            "Streams one HTTP/2 connection may have open at once.",
        ],
    ]
    optFlags = [
        [
            "h2c",
            None,
            "Also accept HTTP/2 with prior knowledge (h2c) on plain listeners.",
        ],
    ]

    settings: ServeSettings

    def __init__(self) -> None:
        usage.Options.__init__(self)
        self["port"] = []
        self["trusted-proxy"] = []
        self["acme-domain"] = []
        self["redirect-http"] = None

    def opt_port(self, description: str) -> None:
        """Listen here: an endpoint description, or a bare port number
        (TLS when --tls-cert is given).  Repeatable; default tcp:8080."""
        self["port"].append(description)

    def opt_trusted_proxy(self, cidr: str) -> None:
        """A peer range whose X-Forwarded-For is believed.  Repeatable."""
        self["trusted-proxy"].append(cidr)

    def opt_acme_domain(self, name: str) -> None:
        """Get and renew this name's certificate over ACME.  Repeatable."""
        self["acme-domain"].append(name)

    def opt_redirect_http(self) -> None:
        """308 plain-HTTP requests to https (default with TLS+plain ports)."""
        self["redirect-http"] = True

    def opt_no_redirect_http(self) -> None:
        """Serve plain-HTTP requests instead of redirecting them."""
        self["redirect-http"] = False

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # Kept verbatim so that worker processes can parse the same options.
        self.argv = list(sys.argv[1:] if options is None else options)
        usage.Options.parseOptions(self, options)

    def postOptions(self) -> None:
        try:
            self.settings = read_settings(self, os.environ, self.argv)
        except ConfigError as e:
            raise SystemExit(f"clerkproxy: {e}") from None


def makeService(options: Options) -> IService:
    """The listening ports, the proxy behind them, and its FAPI pool."""
    from twisted.internet import reactor

    settings = options.settings
    config = settings.config
    try:
        if settings.workers > 1:
            service = build_supervisor(settings, reactor)
        else:
            endpoints = [
                server_endpoint(reactor, d, settings.tls) for d in settings.ports
            ]
            service = build_service(settings, reactor, endpoints)
    except ConfigError as e:
        raise SystemExit(f"clerkproxy: {e}") from None
    if settings.sites:
        _log.info(
            "clerkproxy: {count} sites ({names}) -> {fapi} on {ports}{redirect}",
            count=len(settings.sites),
            names=", ".join(site.name for site in settings.sites),
            fapi=config.fapi_url,
            ports=", ".join(settings.ports),
            redirect="; plain HTTP redirected to https"
            if settings.redirectHTTP
            else "",
        )
    elif settings.workers > 1:
        _log.info(
            "clerkproxy: {workers} workers, {prefix}/* -> {fapi} on {ports}",
            workers=settings.workers,
            prefix=config.prefix.decode("ascii"),
            fapi=config.fapi_url,
            ports=", ".join(settings.ports),
        )
    else:
        _log.info(
            "clerkproxy: {prefix}/* -> {fapi}{app} on {ports}",
            prefix=config.prefix.decode("ascii"),
            fapi=config.fapi_url,
            app=f", everything else -> {config.app_url}" if config.app_url else "",
            ports=", ".join(settings.ports),
        )
    return service
