"""
One admin port for C{--workers N}: the supervisor serves it, and asks each
worker, at scrape time, over a private UNIX socket.

Why aggregation in the supervisor and not C{prometheus_client}'s
multiprocess mode: that mode aggregates only C{prometheus_client}'s own
metric objects, through memory-mapped files, and those objects take a lock
on every increment.  The request path here counts in plain ints (see
L{clerkproxy._metrics}); each worker already renders them on demand, so
the supervisor only has to fetch N small texts and add them up.

How series are combined:
  - counters and histograms are summed over the workers, so the series
    look exactly like one process's.  When a worker dies, the values it
    last reported stay in the sum, so totals never go backwards (a
    restarted worker counts from zero again); what it counted after its
    last scrape is lost.
  - gauges (requests in flight, client connections) are per worker,
    labelled C{worker="I"}: their sum is the group's, and an imbalance
    shows.
  - C{clerkproxy_workers_answering}: how many workers answered this scrape.
    A worker that does not answer in time contributes its previous figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

__all__ = ["GroupAdmin", "aggregate"]

_log = Logger(namespace="clerkproxy.admin")

#: Seconds a worker gets to answer the supervisor's question.
WORKER_TIMEOUT = 2.0

_Key = tuple[str, tuple[tuple[str, str], ...]]


class _Family:
    def __init__(self, name: str, documentation: str, kind: str) -> None:
        self.name, self.documentation, self.kind = name, documentation, kind
        self.values: dict[_Key, float] = {}

    def add(self, sampleName: str, labels: dict[str, str], value: float) -> None:
        key = (sampleName, tuple(sorted(labels.items())))
        self.values[key] = self.values.get(key, 0.0) + value

    def metric(self) -> Metric:
        metric = Metric(self.name, self.documentation, self.kind)
        for (sampleName, labels), value in self.values.items():
            metric.add_sample(sampleName, dict(labels), value)
        return metric


def _families(
    retired: Iterable[tuple[int | None, str]],
) -> dict[str, _Family]:
    families: dict[str, _Family] = {}
    for index, text in retired:
        for family in text_string_to_metric_families(text):
            gauge = family.type == "gauge"
            if index is None and gauge:
                continue  # a dead worker's gauges are gone with it
            ours = families.get(family.name)
            if ours is None:
                ours = families[family.name] = _Family(
                    family.name, family.documentation, family.type
                )
            for sample in family.samples:
                labels = dict(sample.labels)
                if gauge:
                    labels["worker"] = str(index)
                ours.add(sample.name, labels, sample.value)
    return families


def aggregate(
    live: dict[int, str], retired: Iterable[str] = (), answering: int | None = None
) -> bytes:
    """
    One Prometheus text from each live worker's text (by index) and the
    last texts of workers that have died.
    """
    texts: list[tuple[int | None, str]] = [(None, text) for text in retired]
    texts += sorted(live.items())
    families = _families(texts)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(
        _Fixed(
            [
                *(family.metric() for family in families.values()),
                GaugeMetricFamily(
                    "clerkproxy_workers_answering",
                    "Worker processes that answered this scrape.",
                    value=len(live) if answering is None else answering,
                ),
            ]
        )
    )
    return generate_latest(registry)


class _Fixed(Collector):
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return iter(self._metrics)


class _Get(Protocol):
    """HTTP/1.0 GET: the whole answer arrives before the worker closes."""

    def __init__(self, path: bytes) -> None:
        self._path = path
        self._data: list[bytes] = []
        self.done: Deferred[tuple[int, bytes]] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(b"GET %s HTTP/1.0\r\nHost: worker\r\n\r\n" % self._path)

    def dataReceived(self, data: bytes) -> None:
        self._data.append(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        head, _, body = b"".join(self._data).partition(b"\r\n\r\n")
        try:
            status = int(head.split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = 0
        if not self.done.called:
            self.done.callback((status, body))


class GroupAdmin:
    """
    What the supervisor knows to answer C{/metrics} and C{/readyz} for its
    workers: where each one's admin socket is, and what each dead one last
    reported.

    @param sockets: Worker index to its admin socket path.
    @param expected: How many workers there should be.
    @param stopping: True once the group is shutting down.
    """

    def __init__(
        self,
        reactor: Any,
        sockets: dict[int, str],
        alive: Callable[[], Iterable[int]],
        expected: int,
        stopping: Callable[[], bool],
    ) -> None:
        self._reactor = reactor
        self._sockets = sockets
        self._alive = alive
        self._expected = expected
        self._stopping = stopping
        self._last: dict[int, str] = {}
        self._retired: list[str] = []

    def workerEnded(self, index: int) -> None:
        """Keep what a dead worker last reported in the totals."""
        text = self._last.pop(index, None)
        if text is not None:
            self._retired.append(text)
            # Fold the retired texts into one, so they do not pile up.
            self._retired = [aggregate({}, self._retired).decode("utf-8")]

    def _get(self, index: int, path: bytes) -> Deferred[tuple[int, bytes]]:
        endpoint = UNIXClientEndpoint(
            self._reactor, self._sockets[index], timeout=WORKER_TIMEOUT
        )
        protocol = _Get(path)
        d = connectProtocol(endpoint, protocol)

        def connected(_: object) -> Deferred[tuple[int, bytes]]:
            return protocol.done.addTimeout(WORKER_TIMEOUT, self._reactor).addErrback(
                hangUp
            )

        def hangUp(failure: Failure) -> Failure:
            transport: Any = protocol.transport
            if transport is not None:
                transport.abortConnection()
            return failure

        answer: Deferred[tuple[int, bytes]] = d.addCallback(connected)
        return answer

    def _askAll(self, path: bytes) -> Deferred[dict[int, tuple[int, bytes]]]:
        indexes = sorted(self._alive())
        asked = DeferredList(
            [self._get(index, path) for index in indexes], consumeErrors=True
        )

        def collect(results: list[tuple[bool, Any]]) -> dict[int, tuple[int, bytes]]:
            return {
                index: result
                for index, (ok, result) in zip(indexes, results, strict=True)
                if ok
            }

        return asked.addCallback(collect)

    def metrics(self) -> Deferred[bytes]:
        def combine(answers: dict[int, tuple[int, bytes]]) -> bytes:
            answering = 0
            for index, (status, body) in answers.items():
                if status == 200:
                    self._last[index] = body.decode("utf-8")
                    answering += 1
            alive = set(self._alive())
            live = {i: text for i, text in self._last.items() if i in alive}
            return aggregate(live, self._retired, answering)

        return self._askAll(b"/metrics").addCallback(combine)

    def ready(self) -> Deferred[tuple[bool, str]]:
        def judge(answers: dict[int, tuple[int, bytes]]) -> tuple[bool, str]:
            if self._stopping():
                return False, "draining\n"
            lines, ready = [], True
            for index in range(self._expected):
                status = answers.get(index, (0, b""))[0]
                state = {200: "ready", 503: "draining", 0: "not answering"}.get(
                    status, f"answered {status}"
                )
                ready = ready and status == 200
                lines.append(f"worker {index}: {state}\n")
            return ready, ("ready\n" if ready else "not ready\n") + "".join(lines)

        return self._askAll(b"/readyz").addCallback(judge)


class GroupAdminResource(Resource):
    """C{/metrics}, C{/healthz} and C{/readyz} for the whole group."""

    isLeaf = True

    def __init__(self, group: GroupAdmin) -> None:
        Resource.__init__(self)
        self._group = group

    def render_GET(self, request: Request) -> bytes | int:
        request.setHeader(b"Cache-Control", b"no-store")
        path = request.path
        if path == b"/metrics":
            request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
            self._later(request, self._group.metrics().addCallback(lambda b: (200, b)))
            return NOT_DONE_YET
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if path == b"/healthz":
            return b"ok\n"
        if path == b"/readyz":
            judged = self._group.ready().addCallback(
                lambda r: (200 if r[0] else 503, r[1].encode("utf-8"))
            )
            self._later(request, judged)
            return NOT_DONE_YET
        request.setResponseCode(404)
        return b"not found\n"

    render_HEAD = render_GET

    def _later(self, request: Request, answer: Deferred[tuple[int, bytes]]) -> None:
        gone: list[object] = []
        request.notifyFinish().addErrback(gone.append)

        def write(result: tuple[int, bytes]) -> None:
            if gone:
                return  # the scraper hung up
            status, body = result
            request.setResponseCode(status)
            request.setHeader(b"Content-Length", b"%d" % len(body))
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            _log.failure("admin answer failed", failure)
            write((500, b"internal error\n"))

        answer.addCallbacks(write, failed)


def group_admin_site(group: GroupAdmin, reactor: Any) -> Site:
    site = Site(GroupAdminResource(group), reactor=reactor)
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
