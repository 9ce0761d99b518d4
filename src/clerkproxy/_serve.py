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
from twisted.web.resource import IResource

from ._accesslog import AccessLog
from ._acme import AcmeManager, Http01Responses
from ._admin import admin_site
from ._config import ProxyConfig
from ._endpoints import admin_endpoint
from ._metrics import Metrics
from ._proxy import AppProxy, EdgeRouter, FrontendAPIProxy
from ._service import ProxyService
from ._settings import ServeSettings
from ._site import build_site
from ._sites import EdgeRoot
from ._sni import SNIServerTLS
from ._upstream import UpstreamPool, app_endpoint, pool_counts
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
    metrics = Metrics()
    http01 = Http01Responses() if settings.acme is not None else None
    pools: list[UpstreamPool] = []
    root: IResource
    if settings.sites:
        routes: dict[str, tuple[str, IResource]] = {}
        fapis = []
        for each in settings.sites:
            siteRoot, fapi = _proxy_root(each.config, settings, reactor, metrics, pools)
            fapis.append(fapi)
            for host in each.hosts:
                routes[host] = (each.name, siteRoot)
        fapi = fapis[0]
        root = EdgeRoot(None, routes, http01, settings.redirectHTTP)
    else:
        root, fapi = _proxy_root(settings.config, settings, reactor, metrics, pools)
        if http01 is not None or settings.redirectHTTP:
            root = EdgeRoot(root, None, http01, settings.redirectHTTP)
    metrics.upstreamOpened = lambda: sum(pool.connectionsOpened for pool in pools)
    metrics.upstreamPools = lambda: pool_counts(pools)
    tls = settings.tls
    acme = None
    if tls is not None:
        served = tls
        metrics.certificateExpiry = lambda: {
            name: notAfter.timestamp() for name, notAfter in served.expiries().items()
        }
    if isinstance(tls, SNIServerTLS):
        sni = tls
        if settings.acme is not None:
            assert http01 is not None

            def failed() -> None:
                metrics.acmeFailures += 1

            acme = AcmeManager(reactor, settings.acme, sni, http01, onFailure=failed)
    accessLog = AccessLog.open(settings.accessLog) if settings.accessLog else None
    site = build_site(
        root,
        reactor,
        header_timeout=settings.headerTimeout,
        idle_timeout=settings.idleTimeout,
        metrics=metrics,
        access_log=accessLog,
        client_address=fapi.clientAddress,
        max_request_line=settings.maxRequestLine,
        max_header_size=settings.maxHeaderSize,
        max_connections_per_client=settings.maxConnectionsPerClient,
        http2=settings.http2,
    )
    if isinstance(tls, SNIServerTLS):
        # It answers ALPN itself (for acme-tls/1): offer h2 there too.
        tls.protocols = tuple(site.acceptableProtocols())
    admin = None
    if settings.adminPort:
        admin = (
            admin_endpoint(reactor, settings.adminPort),
            admin_site(
                metrics,
                lambda: site.draining,
                reactor,
                acme.waiting if acme is not None else _ready,
            ),
        )
    service = ProxyService(
        reactor,
        site,
        pools,
        endpoints,
        settings.drainTimeout,
        admin=admin,
        tls=tls,
        accessLog=accessLog,
        installSignals=installSignals,
        acme=acme,
    )
    # Everything built so far lives as long as the process: keep it out of
    # the cyclic collector's full passes, which otherwise add tail latency.
    reactor.callWhenRunning(gc.freeze)
    return service


def _ready() -> None:
    return None


def _proxy_root(
    config: ProxyConfig,
    settings: ServeSettings,
    reactor: Any,
    metrics: Metrics,
    pools: list[UpstreamPool],
) -> tuple[IResource, FrontendAPIProxy]:
    """One site's root: its FAPI proxy, and its app when it has one."""
    fapi = FrontendAPIProxy(
        config, reactor, trustRoot=settings.trustRoot, metrics=metrics
    )
    pools.append(fapi.upstream)
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
            config.timeouts,
            metrics,
        )
        pools.append(appPool)
    root: IResource = EdgeRouter(fapi, app) if app is not None else fapi
    return root, fapi


def build_supervisor(settings: ServeSettings, reactor: Any) -> IService:
    """
    Bind every port once, here, and supervise C{settings.workers} worker
    processes that serve them; L{ConfigError} if a port cannot be bound.
    """
    sockets = [(bind(spec), spec) for spec in settings.listenSpecs]
    admin = admin_endpoint(reactor, settings.adminPort) if settings.adminPort else None
    return WorkerSupervisor(
        reactor,
        settings.workers,
        sockets,
        settings.argv,
        settings.drainTimeout,
        admin=admin,
    )
