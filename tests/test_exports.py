"""The public names of clerkproxy, pinned."""

from __future__ import annotations

import inspect
import re
import sys

import clerkproxy
import clerkproxy.interfaces
import clerkproxy.testing

PUBLIC = [
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


def test_all_is_pinned() -> None:
    assert sorted(clerkproxy.__all__) == sorted(PUBLIC)


def test_every_exported_name_resolves() -> None:
    for module in (clerkproxy, clerkproxy.interfaces, clerkproxy.testing):
        for name in module.__all__:
            assert getattr(module, name) is not None, (module.__name__, name)


def test_public_signatures_use_exported_types() -> None:
    """Every clerkproxy class a public signature names is exported."""
    exported = {name for name in clerkproxy.__all__}
    ours = {
        value.__name__
        for module in list(sys.modules.values())
        if module is not None and module.__name__.startswith("clerkproxy._")
        for value in vars(module).values()
        if inspect.isclass(value) and value.__module__ == module.__name__
    }
    named: set[str] = set()
    for function in (
        clerkproxy.FrontendAPIProxy.__init__,
        clerkproxy.FrontendAPIProxy.close,
        clerkproxy.StreamingSite.__init__,
        clerkproxy.StreamingSite.configure,
        clerkproxy.build_site,
        clerkproxy.UpstreamPool.__init__,
        clerkproxy.ClientAddress.__init__,
        clerkproxy.AccessLog.open,
    ):
        signature = inspect.signature(function)
        for annotation in [
            *(p.annotation for p in signature.parameters.values()),
            signature.return_annotation,
        ]:
            named.update(set(re.findall(r"\w+", str(annotation))) & ours)
    assert {"Metrics", "AccessLog", "ClientAddress", "UpstreamPool"} <= named
    assert named <= exported, named - exported
