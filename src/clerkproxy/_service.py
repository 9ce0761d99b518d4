"""
The running proxy as a Twisted service: listening, draining on SIGTERM,
reloading certificates on SIGHUP.

Twisted has no drain: stopping a service stops its ports and leaves every
connection to be cut when the reactor stops.  L{ProxyService} stops in
order instead: refuse new connections, close idle keep-alive connections,
let every request in flight finish (each response saying
C{Connection: close}), abort what is left after the drain timeout, and
only then close the connections to FAPI that those requests were using.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.server import Site

from ._accesslog import AccessLog
from ._acme import AcmeManager
from ._config import ConfigError
from ._site import StreamingSite
from ._sni import ServerTLS
from ._tls import TICKET_KEY_LIFETIME
from ._twisted_compat import raise_synchronously
from ._upstream import UpstreamPool

__all__ = ["ProxyService"]

_log = Logger(namespace="clerkproxy")
_DRAIN_POLL = 0.05


class ProxyService(Service):
    """
    Everything one proxy process runs.

    @param endpoints: Where to serve C{site}.
    @param admin: The admin endpoint and site, if any.
    @param tls: The reloadable serving certificate, if TLS is terminated.
    @param acme: Obtains and renews certificates while the service runs.
    @param installSignals: Take over SIGTERM (drain, then exit 0) and
        SIGHUP (reload certificates).  Off for embedding and tests.
    """

    def __init__(
        self,
        reactor: Any,
        site: StreamingSite,
        pools: Sequence[UpstreamPool],
        endpoints: Sequence[IStreamServerEndpoint],
        drainTimeout: float,
        admin: tuple[IStreamServerEndpoint, Site] | None = None,
        tls: ServerTLS | None = None,
        accessLog: AccessLog | None = None,
        installSignals: bool = True,
        acme: AcmeManager | None = None,
    ) -> None:
        self._reactor = reactor
        self._site = site
        self._pools = list(pools)
        self._drainTimeout = drainTimeout
        self._tls = tls
        self._accessLog = accessLog
        self._installSignals = installSignals
        self._acme = acme
        self._ports = [_listening(endpoint, site) for endpoint in endpoints]
        self._admin = _listening(admin[0], admin[1]) if admin is not None else None
        self._terminating = False
        self._draining: Deferred[None] | None = None
        self._rotation: LoopingCall | None = None

    # -- starting ----------------------------------------------------------

    def startService(self) -> None:
        Service.startService(self)
        try:
            if self._admin is not None:
                self._admin.startService()
            for port in self._ports:
                port.startService()
        except Exception as e:  # a port in use, a bad address, no permission
            raise SystemExit(f"clerkproxy: cannot listen: {e}") from None
        if self._acme is not None:
            self._reactor.callWhenRunning(self._acme.start)
        if self._tls is not None:
            self._rotation = LoopingCall(self._tls.rotateTicketKeys)
            self._rotation.clock = self._reactor
            self._rotation.start(TICKET_KEY_LIFETIME, now=False)
        if self._installSignals:
            # After the reactor has installed its own handlers.
            self._reactor.callWhenRunning(self._takeSignals)

    def _takeSignals(self) -> None:
        signal.signal(signal.SIGTERM, self._onSignal)
        signal.signal(signal.SIGHUP, self._onSignal)

    def _onSignal(self, number: int, frame: object) -> None:
        action = self.terminate if number == signal.SIGTERM else self.reloadCertificates
        self._reactor.callFromThread(action)

    def terminate(self) -> None:
        """
        SIGTERM: stop the reactor, which drains through L{stopService}.
        Twisted's own handler would make twistd exit by the signal; this
        one lets it exit 0 once the drain is done.  A second SIGTERM cuts
        the drain short.
        """
        if self._terminating:
            _log.warn("second SIGTERM: aborting the remaining connections")
            self._abortRemaining()
            return
        self._terminating = True
        self._reactor.stop()

    # -- certificates ------------------------------------------------------

    def reloadCertificates(self) -> None:
        """SIGHUP: read the serving certificate and key again."""
        if self._tls is None:
            _log.info("SIGHUP: no --tls-cert to reload")
            return
        try:
            self._tls.reload()
        except ConfigError as e:
            _log.error(
                "certificate reload failed, still serving the previous "
                "certificate: {error}",
                error=str(e),
            )
            return
        _log.info("certificate reloaded: new handshakes use the new certificate")

    # -- stopping ----------------------------------------------------------

    @property
    def draining(self) -> bool:
        return self._site.draining

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        if self._acme is not None:
            self._acme.stop()
        if self._rotation is not None and self._rotation.running:
            self._rotation.stop()
        self._site.draining = True
        _log.info(
            "draining: {busy} connections open, up to {timeout}s",
            busy=len(self._site.channels),
            timeout=self._drainTimeout,
        )
        stopped = gatherResults([maybeDeferred(p.stopService) for p in self._ports])
        done: Deferred[None] = Deferred()
        stopped.addBoth(lambda _: self._drain(done))
        return done.addBoth(self._finish)

    def _drain(self, done: Deferred[None]) -> None:
        site = self._site
        site.drain()
        deadline = self._reactor.seconds() + self._drainTimeout

        def check() -> None:
            if not site.channels:
                poll.stop()
                done.callback(None)
            elif self._reactor.seconds() >= deadline:
                _log.warn(
                    "drain timeout: aborting {n} connections", n=len(site.channels)
                )
                self._abortRemaining()

        poll = LoopingCall(check)
        poll.clock = self._reactor
        poll.start(_DRAIN_POLL)

    def _abortRemaining(self) -> None:
        for channel in list(self._site.channels):
            transport: Any = channel.transport
            if transport is not None:
                transport.abortConnection()

    def _finish(self, result: object) -> Deferred[Any]:
        closing = [pool.close() for pool in self._pools]
        if self._admin is not None:
            closing.append(maybeDeferred(self._admin.stopService))
        if self._accessLog is not None:
            self._accessLog.close()
        _log.info("drained")
        return gatherResults(closing).addBoth(lambda _: None)


def _listening(endpoint: IStreamServerEndpoint, factory: Any) -> Any:
    service = StreamServerEndpointService(endpoint, factory)
    raise_synchronously(service)  # a port in use must stop start-up
    return service
