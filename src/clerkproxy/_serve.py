"""
The services a L{ServeSettings} describes: one serving process
(L{build_service}), or the supervisor of C{--workers} processes
(L{build_supervisor}).
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any

from twisted.application.service import IService
from twisted.internet.interfaces import IStreamServerEndpoint

from ._accesslog import AccessLog
from ._admin import admin_site
from ._endpoints import admin_endpoint
from ._metrics import Metrics
from ._proxy import AppProxy, EdgeRouter, FrontendAPIProxy
from ._service import ProxyService
from ._settings import ServeSettings
from ._site import build_site
from ._upstream import UpstreamPool, app_endpoint
from ._workers import WorkerSupervisor, bind

__all__ = ["build_service", "build_supervisor"]


def build_service(
    settings: ServeSettings,
    reactor: Any,
    endpoints: Sequence[IStreamServerEndpoint],
    index: int = 0,
    installSignals: bool = True,
) -> ProxyService:
    """One serving process: proxy, site, admin listener, drain and reload."""
    config = settings.config
    metrics = Metrics()
    fapi = FrontendAPIProxy(
        config, reactor, trustRoot=settings.trustRoot, metrics=metrics
    )
    pools = [fapi.upstream]
    app = None
    if config.app is not None:
        origin = config.app
        appPool = UpstreamPool(
            reactor,
            app_endpoint(
                reactor, origin.host, origin.port, origin.tls, config.connect_timeout
            ),
            maxConnections=config.pool_size,
            idleTimeout=config.pool_idle_timeout,
        )
        app = AppProxy(
            reactor,
            appPool,
            origin.host_header,
            origin.base_path,
            fapi.clientAddress,
            config.max_body_size,
            config.upstream_timeout,
            metrics,
        )
        pools.append(appPool)
    metrics.upstreamOpened = lambda: sum(pool.connectionsOpened for pool in pools)
    accessLog = AccessLog.open(settings.accessLog) if settings.accessLog else None
    root = EdgeRouter(fapi, app) if app is not None else fapi
    site = build_site(
        root,
        reactor,
        header_timeout=settings.headerTimeout,
        idle_timeout=settings.idleTimeout,
        metrics=metrics,
        access_log=accessLog,
        client_address=fapi.clientAddress,
        http2=settings.http2,
    )
    admin = None
    if settings.adminPort:
        admin = (
            admin_endpoint(reactor, settings.adminPort, index, settings.workers),
            admin_site(metrics, lambda: site.draining, reactor),
        )
    service = ProxyService(
        reactor,
        site,
        pools,
        endpoints,
        settings.drainTimeout,
        admin=admin,
        tls=settings.tls,
        accessLog=accessLog,
        installSignals=installSignals,
    )
    # Everything built so far lives as long as the process: keep it out of
    # the cyclic collector's full passes, which otherwise add tail latency.
    reactor.callWhenRunning(gc.freeze)
    return service


def build_supervisor(settings: ServeSettings, reactor: Any) -> IService:
    """
    Bind every port once, here, and supervise C{settings.workers} worker
    processes that serve them; L{ConfigError} if a port cannot be bound.
    """
    sockets = [(bind(spec), spec) for spec in settings.listenSpecs]
    return WorkerSupervisor(
        reactor, settings.workers, sockets, settings.argv, settings.drainTimeout
    )
