"""
The admin listener: Prometheus metrics and health for orchestrators.

Served on its own port (C{--admin-port}), never on the public one.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from ._metrics import Metrics, MetricsCollector

__all__ = ["AdminResource", "admin_site"]


class AdminResource(Resource):
    """
    C{/metrics}: Prometheus text format.  C{/healthz}: 200 while the
    process runs.  C{/readyz}: 200 while serving, 503 while draining.
    """

    isLeaf = True

    def __init__(
        self,
        metrics: Metrics,
        draining: Callable[[], bool],
        waiting: Callable[[], str | None] = lambda: None,
    ) -> None:
        Resource.__init__(self)
        self._waiting = waiting
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(MetricsCollector(metrics))
        self._draining = draining

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"Cache-Control", b"no-store")
        path = request.path
        if path == b"/metrics":
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            return generate_latest(self._registry)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if path == b"/healthz":
            return b"ok\n"
        if path == b"/readyz":
            if self._draining():
                request.setResponseCode(503)
                return b"draining\n"
            waiting = self._waiting()
            if waiting is not None:
                request.setResponseCode(503)
                return f"waiting: {waiting}\n".encode()
            return b"ready\n"
        request.setResponseCode(404)
        return b"not found\n"

    render_HEAD = render_GET


def admin_site(
    metrics: Metrics,
    draining: Callable[[], bool],
    reactor: IReactorTime,
    waiting: Callable[[], str | None] = lambda: None,
) -> Site:
    """
    @param waiting: Why the process is not ready yet (for example, names
        with no certificate), or L{None} once it is.
    """
    site = Site(AdminResource(metrics, draining, waiting), reactor=reactor)
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
