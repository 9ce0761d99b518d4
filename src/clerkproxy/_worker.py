"""
One worker process of C{twistd clerkproxy --workers N}.

    python -m clerkproxy._worker --inherited FD:FAMILY:KIND ... -- OPTIONS

KIND is C{tcp}, C{tls}, C{haproxy-tcp} or C{haproxy-tls}; OPTIONS are the
plugin's own options, validated again here exactly as the parent did.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence
from typing import Any


def main(argv: Sequence[str]) -> None:
    split = list(argv).index("--")
    inherited = [argv[i + 1] for i in range(split) if argv[i] == "--inherited"]
    from .tap import Options

    options = Options()
    options.parseOptions([*argv[split + 1 :], "--workers", "1"])

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from twisted.protocols.haproxy._wrapper import HAProxyWrappingFactory
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from ._proxy import FrontendAPIProxy
    from ._site import build_site

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    proxy = FrontendAPIProxy(options.config, reactor, trustRoot=options.trustRoot)
    site = build_site(proxy, reactor)
    for item in inherited:
        fd, family, kind = item.split(":")
        factory: Any = site
        if kind.endswith("tls"):
            assert options.tlsOptions is not None
            factory = TLSMemoryBIOFactory(options.tlsOptions, False, factory)
        if kind.startswith("haproxy-"):
            factory = HAProxyWrappingFactory(factory)
        reactor.adoptStreamPort(int(fd), int(family), factory)  # type: ignore[attr-defined]
        os.close(int(fd))  # adoptStreamPort keeps its own duplicate
    reactor.addSystemEventTrigger("before", "shutdown", proxy.upstream.close)
    reactor.callWhenRunning(gc.freeze)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
