"""
Several worker processes serving the same listening sockets.

The parent (the twistd process) binds every socket once and never accepts
on them.  Each worker inherits the descriptors, adopts them with
C{adoptStreamPort} and runs its own proxy with its own FAPI pool; the
kernel hands each new connection to whichever worker accepts first.  A
worker that dies is restarted, and because the listening socket lives in
the parent, connections waiting in its queue are not lost meanwhile.

With C{--admin-port}, the parent alone listens on it and answers for the
group (see L{clerkproxy._groupadmin}); each worker serves its own admin
resource on a UNIX socket in a private directory of the parent's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ._config import ConfigError
from ._endpoints import default_backlog
from ._groupadmin import GroupAdmin, group_admin_site
from ._twisted_compat import parse_endpoint_description

__all__ = ["ListenSpec", "WorkerSupervisor", "bind", "worker_listen_spec"]

_log = Logger(namespace="clerkproxy.workers")

#: Seconds past the drain timeout a worker gets before it is killed.
STOP_GRACE = 10.0
_RESTART_MIN = 0.5
_RESTART_MAX = 30.0


@attrs.frozen
class ListenSpec:
    """One listening socket shared by the workers, and how they wrap it."""

    port: int
    interface: str
    backlog: int
    tls: bool
    haproxy: bool


def worker_listen_spec(description: str, tls: bool) -> ListenSpec:
    """
    Parse a C{--port} value usable with C{--workers}: a port number, or a
    C{tcp:} description, optionally behind C{haproxy:}.
    """
    if description.startswith("tls:"):
        return attrs.evolve(
            worker_listen_spec(description[len("tls:") :], tls), tls=True
        )
    haproxy = description.startswith("haproxy:")
    inner = description[len("haproxy:") :] if haproxy else description
    if inner.isdigit():
        return ListenSpec(int(inner), "", default_backlog(), tls, haproxy)
    args, kwargs = parse_endpoint_description(inner)
    if not args or args[0] != "tcp" or len(args) > 2:
        raise ConfigError(
            f"--workers needs each --port to be a port number or a tcp: "
            f"description (optionally behind haproxy:); got {description!r}"
        )
    try:
        port = int(kwargs.pop("port", args[1] if len(args) > 1 else ""))
        backlog = int(kwargs.pop("backlog", default_backlog()))
    except ValueError:
        raise ConfigError(f"--port {description!r} has no valid port number") from None
    interface = kwargs.pop("interface", "")
    if kwargs:
        raise ConfigError(
            f"--port {description!r}: with --workers only port, interface and "
            f"backlog are understood, not {', '.join(sorted(kwargs))}"
        )
    return ListenSpec(port, interface, backlog, False, haproxy)


def bind(spec: ListenSpec) -> socket.socket:
    """Bind and listen; the socket is inheritable by the workers."""
    family = socket.AF_INET6 if ":" in spec.interface else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((spec.interface, spec.port))
        sock.listen(spec.backlog)
    except OSError as e:
        sock.close()
        where = f"{spec.interface or '*'}:{spec.port}"
        raise ConfigError(f"--port: cannot listen on {where}: {e.strerror}") from None
    sock.setblocking(False)
    sock.set_inheritable(True)
    return sock


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.ended.callback(None)
        self.supervisor._ended(self, reason)


class WorkerSupervisor(Service):
    """
    Keeps C{count} workers running on the inherited C{sockets}.

    @param argv: The worker's command line after the interpreter.
    @param admin: Where to serve the group's C{/metrics}, C{/healthz} and
        C{/readyz}, if anywhere.
    """

    def __init__(
        self,
        reactor: Any,
        count: int,
        sockets: Sequence[tuple[socket.socket, ListenSpec]],
        argv: Sequence[str],
        drainTimeout: float = 30.0,
        admin: IStreamServerEndpoint | None = None,
    ) -> None:
        self._reactor = reactor
        self._drainTimeout = drainTimeout
        self._count = count
        self._sockets = list(sockets)
        self._argv = list(argv)
        self._workers: dict[int, _Worker] = {}
        self._transports: dict[int, Any] = {}
        self._delays: dict[int, float] = {}
        self._stopping = False
        self._adminEndpoint = admin
        self._adminPort: Any = None
        self._adminDir: str | None = None
        self._adminSockets: dict[int, str] = {}
        self.group: GroupAdmin | None = None

    def startService(self) -> None:
        Service.startService(self)
        if self._adminEndpoint is not None:
            self._startAdmin(self._adminEndpoint)
        for index in range(self._count):
            self._spawn(index)
        self._reactor.callWhenRunning(self._takeSignals)

    def _takeSignals(self) -> None:
        # SIGTERM: stop (which forwards SIGTERM and waits for the workers'
        # drains) and exit 0, not by the signal.  SIGHUP: workers reload.
        signal.signal(signal.SIGTERM, self._onSignal)
        signal.signal(signal.SIGHUP, self._onSignal)

    def _onSignal(self, number: int, frame: object) -> None:
        if number == signal.SIGTERM:
            self._reactor.callFromThread(self._terminate)
        else:
            self._reactor.callFromThread(self._forward, "HUP")

    def _terminate(self) -> None:
        if self._stopping:
            self._forward("TERM")  # a second SIGTERM cuts the workers' drain
        else:
            self._reactor.stop()

    def _forward(self, name: str) -> None:
        for transport in self._transports.values():
            _signal(transport, name)

    def _startAdmin(self, endpoint: IStreamServerEndpoint) -> None:
        # A directory only this user can enter holds the workers' sockets.
        self._adminDir = tempfile.mkdtemp(prefix="clerkproxy-admin-")
        self._adminSockets = {
            index: os.path.join(self._adminDir, f"worker-{index}.sock")
            for index in range(self._count)
        }
        self.group = GroupAdmin(
            self._reactor,
            self._adminSockets,
            alive=lambda: list(self._workers),
            expected=self._count,
            stopping=lambda: self._stopping,
        )
        listening = endpoint.listen(group_admin_site(self.group, self._reactor))
        failures: list[Failure] = []
        listening.addCallbacks(self._adminListening, failures.append)
        if failures:
            self._removeAdminDir()
            raise SystemExit(
                f"clerkproxy: cannot listen on --admin-port: "
                f"{failures[0].getErrorMessage()}"
            )

    def _adminListening(self, port: Any) -> None:
        self._adminPort = port

    def _removeAdminDir(self) -> None:
        if self._adminDir is not None:
            shutil.rmtree(self._adminDir, ignore_errors=True)
            self._adminDir = None

    def _spawn(self, index: int) -> None:
        worker = _Worker(self, index)
        childFDs: dict[int, Any] = {0: "w", 1: 1, 2: 2}
        fdArgs = []
        for sock, spec in self._sockets:
            fd = sock.fileno()
            childFDs[fd] = fd
            kind = "tls" if spec.tls else "tcp"
            if spec.haproxy:
                kind = "haproxy-" + kind
            fdArgs += ["--inherited", f"{fd}:{sock.family.value}:{kind}"]
        argv = [
            sys.executable,
            "-m",
            "clerkproxy._worker",
            "--index",
            str(index),
            *fdArgs,
            *self._adminArgs(index),
            "--",
            *self._argv,
        ]
        self._workers[index] = worker
        self._transports[index] = self._reactor.spawnProcess(
            worker, sys.executable, argv, env=os.environ.copy(), childFDs=childFDs
        )

    def _adminArgs(self, index: int) -> list[str]:
        path = self._adminSockets.get(index)
        if path is None:
            return []
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # left by a worker that died
        return ["--admin-socket", path]

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        index = worker.index
        self._workers.pop(index, None)
        self._transports.pop(index, None)
        if self.group is not None:
            self.group.workerEnded(index)
        if self._stopping:
            return
        delay = self._delays.get(index, _RESTART_MIN)
        self._delays[index] = min(delay * 2, _RESTART_MAX)
        _log.warn(
            "worker {index} exited ({why}); restarting in {delay:.1f}s",
            index=index,
            why=reason.getErrorMessage(),
            delay=delay,
        )
        self._reactor.callLater(delay, self._respawn, index)

    def _respawn(self, index: int) -> None:
        if not self._stopping and index not in self._workers:
            self._spawn(index)
            # A worker that stays up a minute earns a quick restart again.
            self._reactor.callLater(60, self._delays.pop, index, None)

    def stopService(self) -> Deferred[Any]:
        Service.stopService(self)
        self._stopping = True
        ended = [worker.ended for worker in self._workers.values()]
        for transport in self._transports.values():
            _signal(transport, "TERM")
        killer = self._reactor.callLater(self._drainTimeout + STOP_GRACE, self._killAll)

        def done(result: object) -> Deferred[Any]:
            if killer.active():
                killer.cancel()
            for sock, _ in self._sockets:
                sock.close()
            self._removeAdminDir()
            if self._adminPort is not None:
                return maybeDeferred(self._adminPort.stopListening)
            return succeed(None)

        return DeferredList(ended).addBoth(done)

    def _killAll(self) -> None:
        for transport in self._transports.values():
            _signal(transport, "KILL")


def _signal(transport: Any, name: str) -> None:
    with contextlib.suppress(Exception):  # already gone
        transport.signalProcess(name)
