"""
One worker process of C{twistd clerkproxy --workers N}.

    python -m clerkproxy._worker --index I --inherited FD:FAMILY:KIND ... -- OPTIONS

KIND is C{tcp}, C{tls}, C{haproxy-tcp} or C{haproxy-tls}; OPTIONS are the
plugin's own options, validated again here exactly as the parent did.  The
worker drains on SIGTERM and reloads certificates on SIGHUP, like a single
process; its parent forwards both.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import attrs


def main(argv: Sequence[str]) -> None:
    split = list(argv).index("--")
    head = list(argv[:split])
    inherited = [head[i + 1] for i in range(len(head)) if head[i] == "--inherited"]
    index = int(head[head.index("--index") + 1]) if "--index" in head else 0
    adminSocket = (
        head[head.index("--admin-socket") + 1] if "--admin-socket" in head else None
    )
    from ._endpoints import adopted_endpoint
    from ._serve import build_service
    from .tap import Options

    options = Options()
    options.parseOptions([*argv[split + 1 :], "--workers", "1"])
    settings = options.settings
    if adminSocket is not None:
        # The supervisor serves --admin-port for the group and asks this
        # worker on its own socket.
        path = adminSocket.replace("\\", "\\\\").replace(":", "\\:")
        settings = attrs.evolve(settings, adminPort=f"unix:{path}:mode=600")

    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])
    endpoints = []
    for item in inherited:
        fd, family, kind = item.split(":")
        endpoints.append(
            adopted_endpoint(reactor, int(fd), int(family), kind, settings.tls)
        )
    service = build_service(settings, reactor, endpoints, index=index)
    service.startService()
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
