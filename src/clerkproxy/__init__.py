"""
clerkproxy: serve Clerk's Frontend API from your own domain, on Twisted.

The public API is small: L{ProxyConfig} says what to proxy,
L{FrontendAPIProxy} is the C{IResource} that does it, and L{build_site}
makes the C{Site} that streams request bodies to it.
"""

from ._config import DEFAULT_FAPI, ConfigError, ProxyConfig
from ._proxy import FrontendAPIProxy
from ._secret import SecretKey
from ._site import StreamingSite, build_site

__all__ = [
    "DEFAULT_FAPI",
    "ConfigError",
    "FrontendAPIProxy",
    "ProxyConfig",
    "SecretKey",
    "StreamingSite",
    "build_site",
]
