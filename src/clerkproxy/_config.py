"""
Validated, immutable configuration for the proxy.

Everything that can be wrong with the configuration is found here, at
start-up, and reported as a L{ConfigError} with one sentence that names
the option.  Nothing in this module ever puts the secret key in a message.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import SplitResult, urlsplit

import attrs

from ._secret import SecretKey

__all__ = [
    "DEFAULT_FAPI",
    "ConfigError",
    "IPNetwork",
    "Origin",
    "ProxyConfig",
    "Timeouts",
]

DEFAULT_FAPI = "https://frontend-api.clerk.dev"
MiB = 1024 * 1024

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(ValueError):
    """A configuration value is unusable; the message names the option."""


def _split_url(value: str, what: str) -> SplitResult:
    if not value.isascii() or any(c.isspace() or ord(c) < 0x21 for c in value):
        raise ConfigError(f"{what} must be plain ASCII without spaces: {value!r}")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as e:
        raise ConfigError(f"{what} is not a valid URL: {value!r} ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{what} must be an absolute http(s) URL with a host, "
            f"such as https://app.example.com/__clerk; got {value!r}"
        )
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ConfigError(f"{what} must not have a query or fragment: {value!r}")
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"{what} must not carry credentials")
    return parts


def _to_secret(value: SecretKey | str | bytes) -> SecretKey:
    if isinstance(value, SecretKey):
        raw = value.headerValue()
    elif isinstance(value, str):
        raw = value.strip().encode("utf-8", "replace")
    else:
        raw = value.strip()
    if not raw:
        raise ConfigError(
            "no secret key: set CLERK_SECRET_KEY or pass --secret-key-file PATH"
        )
    if raw.startswith(b"sk_test_"):
        raise ConfigError(
            "the secret key (CLERK_SECRET_KEY) is a development key (sk_test_...): "
            "Clerk does not proxy development instances; use the production "
            "instance's sk_live_ key"
        )
    if not raw.startswith(b"sk_live_"):
        raise ConfigError(
            "the secret key (CLERK_SECRET_KEY) does not look like a Clerk "
            "production secret key: it should start with sk_live_"
        )
    if any(b < 0x21 or b > 0x7E for b in raw):
        raise ConfigError(
            "the secret key (CLERK_SECRET_KEY) contains spaces, control or "
            "non-ASCII characters"
        )
    return SecretKey(raw)


def _to_networks(values: Iterable[IPNetwork | str]) -> tuple[IPNetwork, ...]:
    networks: list[IPNetwork] = []
    for value in values:
        if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
            networks.append(value)
            continue
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"--trusted-proxy {value!r} is not an IP address or CIDR range "
                "such as 10.0.0.0/8"
            ) from None
    return tuple(networks)


def _positive(name: str) -> attrs._ValidatorType[float]:
    def check(
        instance: object, attribute: attrs.Attribute[float], value: float
    ) -> None:
        if not value > 0:
            raise ConfigError(f"{name} must be a positive number of seconds")

    return check


def _check_body_size(
    instance: object, attribute: attrs.Attribute[int], value: int
) -> None:
    if value < 0:
        raise ConfigError("--max-body-size must be zero or a positive byte count")


@attrs.frozen
class Origin:
    """Where an upstream lives, in the forms the wire needs."""

    host: str
    port: int
    tls: bool
    host_header: bytes
    base_path: bytes

    @classmethod
    def parse(cls, url: str, what: str) -> Origin:
        parts = _split_url(url, what)
        host = parts.hostname
        assert host is not None
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        header = host if ":" not in host else f"[{host}]"
        if port != (443 if tls else 80):
            header = f"{header}:{port}"
        return cls(
            host,
            port,
            tls,
            header.encode("ascii"),
            parts.path.rstrip("/").encode("ascii"),
        )


@attrs.frozen
class Timeouts:
    """
    The exchange's deadlines, in seconds (see L{Exchange} for the phases
    each one covers).

    @ivar upstream: From the request's start to FAPI's response head.
    @ivar body: Without a byte of a request body that is due.
    @ivar upstreamRead: Without a byte of FAPI's response body, while the
        proxy is not itself holding FAPI back for a slow client.
    @ivar send: Without the client taking a byte of the response.
    """

    upstream: float = 30.0
    body: float = 30.0
    upstreamRead: float = 60.0
    send: float = 60.0


@attrs.frozen
class ProxyConfig:
    """
    What the Frontend API proxy needs to know.

    @ivar proxy_url: The public proxy URL exactly as registered with Clerk;
        sent verbatim as C{Clerk-Proxy-Url}.  Its path (without a trailing
        slash) is the prefix the proxy serves.
    @ivar secret_key: The instance secret key.  A string is accepted and
        wrapped in a L{SecretKey}.
    @ivar fapi_url: Where FAPI lives; always https.
    @ivar trusted_proxies: Peers whose C{X-Forwarded-For} is believed.
    @ivar max_body_size: Largest request body relayed, in bytes.
    @ivar connect_timeout: Seconds allowed to open the TCP connection to FAPI
        (C{HostnameEndpoint} bounds only that; a request's
        C{upstream_timeout} covers the whole wait, TLS handshake included).
    @ivar upstream_timeout: Seconds allowed for FAPI to start answering,
        from the moment the request is ready to go (a body complete, or
        its first 64 KiB held) rather than from its head.
    @ivar body_timeout: Seconds a request body that is due may go without
        a byte.
    @ivar upstream_read_timeout: Seconds FAPI's response body may go
        without a byte (while the proxy is not holding FAPI back).
    @ivar send_timeout: Seconds the client may take no byte of a response.
    @ivar pool_size: Most FAPI connections at once that are connecting or
        awaiting an answer's head (those a client paces, relaying an
        answer or streaming a large body, do not count); more requests
        wait.
    @ivar pool_idle_timeout: Seconds an unused FAPI connection is kept.
    @ivar app_url: The application's origin for every path outside the
        prefix (the edge box's C{--app}), or L{None} for 404s there.
    """

    proxy_url: str
    secret_key: SecretKey = attrs.field(converter=_to_secret, repr=False)
    fapi_url: str = DEFAULT_FAPI
    trusted_proxies: tuple[IPNetwork, ...] = attrs.field(
        default=(), converter=_to_networks
    )
    max_body_size: int = attrs.field(default=16 * MiB, validator=_check_body_size)
    connect_timeout: float = attrs.field(
        default=10.0, validator=_positive("--connect-timeout")
    )
    upstream_timeout: float = attrs.field(
        default=30.0, validator=_positive("--upstream-timeout")
    )
    body_timeout: float = attrs.field(
        default=30.0, validator=_positive("--body-timeout")
    )
    upstream_read_timeout: float = attrs.field(
        default=60.0, validator=_positive("--upstream-read-timeout")
    )
    send_timeout: float = attrs.field(
        default=60.0, validator=_positive("--send-timeout")
    )
    pool_size: int = 256
    pool_idle_timeout: float = attrs.field(
        default=30.0, validator=_positive("pool_idle_timeout")
    )
    app_url: str | None = None

    # Derived once here so that the per-request path only reads bytes.
    prefix: bytes = attrs.field(init=False, repr=False)
    proxy_url_header: bytes = attrs.field(init=False, repr=False)
    fapi_host: str = attrs.field(init=False, repr=False)
    fapi_port: int = attrs.field(init=False, repr=False)
    fapi_host_header: bytes = attrs.field(init=False, repr=False)
    fapi_base_path: bytes = attrs.field(init=False, repr=False)
    app: Origin | None = attrs.field(init=False, repr=False)
    timeouts: Timeouts = attrs.field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        proxy = _split_url(
            self.proxy_url, "the proxy URL (--proxy-url / CLERK_PROXY_URL)"
        )
        fapi = _split_url(self.fapi_url, "the FAPI URL (--fapi / CLERK_FAPI)")
        if fapi.scheme != "https":
            raise ConfigError(
                "the FAPI URL (--fapi / CLERK_FAPI) must use https: the secret "
                "key must never cross the network in clear text"
            )
        if self.pool_size < 1:
            raise ConfigError("pool_size must be at least 1")
        host = fapi.hostname
        assert host is not None
        port = fapi.port or 443
        hostHeader = host if ":" not in host else f"[{host}]"
        if port != 443:
            hostHeader = f"{hostHeader}:{port}"
        setattr_ = object.__setattr__
        setattr_(self, "prefix", proxy.path.rstrip("/").encode("ascii"))
        setattr_(self, "proxy_url_header", self.proxy_url.encode("ascii"))
        setattr_(self, "fapi_host", host)
        setattr_(self, "fapi_port", port)
        setattr_(self, "fapi_host_header", hostHeader.encode("ascii"))
        setattr_(self, "fapi_base_path", fapi.path.rstrip("/").encode("ascii"))
        app = None
        if self.app_url is not None:
            app = Origin.parse(self.app_url, "the application URL (--app)")
        setattr_(self, "app", app)
        setattr_(
            self,
            "timeouts",
            Timeouts(
                self.upstream_timeout,
                self.body_timeout,
                self.upstream_read_timeout,
                self.send_timeout,
            ),
        )
