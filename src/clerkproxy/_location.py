"""
FAPI's redirects, pointed back at the proxy.

A C{Location} that names FAPI's own origin would send the browser around
the proxy (to a host whose cookies it does not have); Clerk's JavaScript
proxy helper rewrites such a URL onto the proxy URL, and so does this.
Every other C{Location} (another origin, a relative reference, anything
unparsable) goes back exactly as FAPI sent it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import attrs

from ._config import ProxyConfig

__all__ = ["LocationRewrite"]


@attrs.frozen
class LocationRewrite:
    """
    Rewrite a C{Location} under FAPI's origin and base path onto the proxy.

    @ivar scheme: FAPI's scheme, lower case.
    @ivar host: FAPI's host name, lower case, IPv6 without brackets.
    @ivar port: FAPI's port.
    @ivar basePath: FAPI's base path without its trailing slash.
    @ivar proxyBase: The proxy URL without its trailing slash.
    """

    scheme: str
    host: str
    port: int
    basePath: str
    proxyBase: bytes

    @classmethod
    def fromConfig(cls, config: ProxyConfig) -> LocationRewrite:
        return cls(
            "https",
            config.fapi_host.lower(),
            config.fapi_port,
            config.fapi_base_path.decode("ascii"),
            config.proxy_url.rstrip("/").encode("ascii"),
        )

    def __call__(self, value: bytes) -> bytes:
        """C{value} onto the proxy URL if it names FAPI, else unchanged."""
        text = value.decode("latin-1")
        if text.startswith("//"):
            # Scheme-relative: the browser takes the proxy URL's scheme.
            text = self.proxyBase.split(b":", 1)[0].decode("ascii") + ":" + text
        try:
            parts = urlsplit(text)
            port = parts.port
        except ValueError:
            return value
        scheme = parts.scheme.lower()
        if (
            scheme != self.scheme
            or parts.hostname != self.host
            or parts.username is not None
            or (port if port is not None else _DEFAULT_PORTS.get(scheme)) != self.port
            or text[len(parts.scheme) : len(parts.scheme) + 3] != "://"
        ):
            return value
        rest = text[len(parts.scheme) + 3 + len(parts.netloc) :]
        base = self.basePath
        if not rest.startswith(base):
            return value
        rest = rest[len(base) :]
        if rest[:1] not in ("", "/", "?", "#"):
            return value  # /base-other is not under /base
        return self.proxyBase + rest.encode("latin-1")


_DEFAULT_PORTS = {"https": 443, "http": 80}
