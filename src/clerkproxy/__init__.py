"""
clerkproxy: serve Clerk's Frontend API from your own domain, on Twisted.

The public API is small: L{ProxyConfig} says what to proxy,
L{FrontendAPIProxy} is the C{IResource} that does it, and L{build_site}
makes the C{Site} that streams request bodies to it.  The other names are
the types those signatures take: L{Metrics} (what is counted),
L{AccessLog} (where requests are logged), L{ClientAddress} (whose
C{X-Forwarded-For} is believed), L{UpstreamPool} (the connections to
FAPI) and L{HTTP2Settings} (HTTP/2 to clients).
"""

from ._accesslog import AccessLog
from ._config import DEFAULT_FAPI, ConfigError, ProxyConfig
from ._forwarded import ClientAddress
from ._h2 import HTTP2Settings
from ._metrics import Metrics
from ._proxy import FrontendAPIProxy
from ._secret import SecretKey
from ._site import StreamingSite, build_site
from ._upstream import UpstreamPool

__all__ = [
    "DEFAULT_FAPI",
    "AccessLog",
    "ClientAddress",
    "ConfigError",
    "FrontendAPIProxy",
    "HTTP2Settings",
    "Metrics",
    "ProxyConfig",
    "SecretKey",
    "StreamingSite",
    "UpstreamPool",
    "build_site",
]
