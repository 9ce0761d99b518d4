"""
Metrics: plain integers on the request path, turned into Prometheus
families by C{prometheus_client} only when scraped.

C{prometheus_client}'s own counters take a lock on every increment; at
thousands of requests per second that is wasted work in a single-threaded
reactor, so the request path only touches ints, lists and one C{bisect}.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

__all__ = ["TIMEOUT_PHASES", "Histogram", "Metrics", "MetricsCollector"]

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Methods counted under their own name; anything else is "other", so a
#: client cannot grow the label set without bound.
#: Where a deadline can pass: C{clerkproxy_timeouts_total{phase}}.
TIMEOUT_PHASES = ("header", "body", "upstream", "upstream_read", "send", "idle")
_METHODS = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"}
)

_PROTOCOLS = frozenset({b"HTTP/1.0", b"HTTP/1.1", b"HTTP/2"})


class Histogram:
    """Cumulative-on-export bucket counts, a sum and a count."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: tuple[float, ...] = _BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def buckets(self) -> list[tuple[str, float]]:
        running = 0
        out: list[tuple[str, float]] = []
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


class Metrics:
    """What one process counts.  Gauges are read from their owners on scrape."""

    def __init__(self) -> None:
        self.requests: dict[tuple[bytes, int, bytes], int] = {}
        self.duration = Histogram()
        self.upstream = Histogram()
        self.inFlight = 0
        self.upstreamErrors: dict[str, int] = {}
        self.timeouts: dict[str, int] = dict.fromkeys(TIMEOUT_PHASES, 0)
        self.connectionsRejected: dict[str, int] = {}
        self.clientConnections: Callable[[], int] = lambda: 0
        self.upstreamOpened: Callable[[], int] = lambda: 0
        self.http2Events: dict[str, int] = {}
        # Many sites in one process (--config): responses by site and code.
        self.siteRequests: dict[tuple[str, int], int] = {}
        # Certificates: each name's expiry (Unix time), and ACME failures.
        self.certificateExpiry: Callable[[], dict[str, float]] = dict
        self.acmeFailures = 0
        #: Upstream connections by state (connecting, busy, relaying, idle)
        #: and requests queued for one, summed over the pools on scrape.
        self.upstreamPools: Callable[[], dict[str, int]] = dict

    def finished(
        self, method: bytes, code: int, seconds: float, protocol: bytes = b"HTTP/1.1"
    ) -> None:
        key = (
            method if method in _METHODS else b"other",
            code,
            protocol if protocol in _PROTOCOLS else b"other",
        )
        self.requests[key] = self.requests.get(key, 0) + 1
        self.duration.observe(seconds)

    def http2Event(self, kind: str) -> None:
        """An HTTP/2 defence acted (see L{clerkproxy._h2})."""
        self.http2Events[kind] = self.http2Events.get(kind, 0) + 1

    def siteFinished(self, site: str, code: int) -> None:
        key = (site, code)
        self.siteRequests[key] = self.siteRequests.get(key, 0) + 1

    def upstreamError(self, kind: str) -> None:
        self.upstreamErrors[kind] = self.upstreamErrors.get(kind, 0) + 1

    def timedOut(self, phase: str) -> None:
        """A deadline passed; C{phase} is one of L{TIMEOUT_PHASES}."""
        self.timeouts[phase] += 1

    def connectionRejected(self, reason: str) -> None:
        rejected = self.connectionsRejected
        rejected[reason] = rejected.get(reason, 0) + 1


class MetricsCollector(Collector):
    """Exports L{Metrics} in Prometheus's text format."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._metrics
        requests = CounterMetricFamily(
            "clerkproxy_requests",
            "Requests answered, by method, status code and HTTP version.",
            labels=["method", "code", "protocol"],
        )
        for (method, code, protocol), n in sorted(m.requests.items()):
            requests.add_metric(
                [method.decode("ascii"), str(code), protocol.decode("ascii")], n
            )
        yield requests
        yield _histogram(
            "clerkproxy_request_duration_seconds",
            "Time from a request's head arriving to its response finishing.",
            m.duration,
        )
        yield _histogram(
            "clerkproxy_upstream_response_seconds",
            "Time from a request's start to the upstream's response head.",
            m.upstream,
        )
        yield GaugeMetricFamily(
            "clerkproxy_in_flight_requests",
            "Requests being answered now.",
            value=m.inFlight,
        )
        yield GaugeMetricFamily(
            "clerkproxy_client_connections",
            "Open client connections.",
            value=m.clientConnections(),
        )
        yield CounterMetricFamily(
            "clerkproxy_upstream_connections_opened",
            "Connections opened to the upstreams (FAPI, and the app with --app).",
            value=m.upstreamOpened(),
        )
        pools = m.upstreamPools()
        connections = GaugeMetricFamily(
            "clerkproxy_upstream_connections",
            "Upstream connections by state: connecting, busy (sending or awaiting"
            " the head: these count against pool_size), relaying a body, idle.",
            labels=["state"],
        )
        for state in ("connecting", "busy", "relaying", "idle"):
            connections.add_metric([state], pools.get(state, 0))
        yield connections
        yield GaugeMetricFamily(
            "clerkproxy_upstream_queued_requests",
            "Requests waiting for an upstream connection.",
            value=pools.get("queued", 0),
        )
        yield _counters(
            "clerkproxy_upstream_errors",
            "Upstream failures, by kind.",
            "kind",
            sorted(m.upstreamErrors.items()),
        )
        yield _counters(
            "clerkproxy_http2_events",
            "HTTP/2 defences that acted: connections refused (rapid_reset, "
            "continuation_flood, header_list_too_large, settings_flood, "
            "ping_flood, priority_flood, empty_data_flood, unknown_frame_flood, "
            "stream_limit, protocol_error) and streams reset "
            "(reset_before_forwarding, content_length_mismatch, "
            "malformed_request).",
            "kind",
            sorted(m.http2Events.items()),
        )
        if m.siteRequests:
            sites = CounterMetricFamily(
                "clerkproxy_site_requests",
                "Requests answered, by site (--config) and status code.",
                labels=["site", "code"],
            )
            for (site, code), n in sorted(m.siteRequests.items()):
                sites.add_metric([site, str(code)], n)
            yield sites
        expiry = m.certificateExpiry()
        if expiry:
            now = time.time()
            family = GaugeMetricFamily(
                "clerkproxy_certificate_expiry_seconds",
                "Seconds until each name's serving certificate expires.",
                labels=["name"],
            )
            for name, notAfter in sorted(expiry.items()):
                family.add_metric([name], notAfter - now)
            yield family
        yield CounterMetricFamily(
            "clerkproxy_acme_failures",
            "Failed attempts to obtain or renew a certificate over ACME.",
            value=m.acmeFailures,
        )
        yield _counters(
            "clerkproxy_timeouts",
            "Deadlines that passed, by phase: header, body, upstream, "
            "upstream_read, send, idle.",
            "phase",
            m.timeouts.items(),
        )
        yield _counters(
            "clerkproxy_connections_rejected",
            "Client connections closed unserved, by reason (per_client: over "
            "--max-connections-per-client).",
            "reason",
            sorted(m.connectionsRejected.items()),
        )


def _counters(
    name: str, documentation: str, label: str, counts: Iterable[tuple[str, int]]
) -> Metric:
    """A counter family with one sample per C{(label value, count)}, in order."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, n in counts:
        family.add_metric([value], n)
    return family


def _histogram(name: str, documentation: str, h: Histogram) -> Metric:
    family: Any = HistogramMetricFamily(
        name, documentation, buckets=h.buckets(), sum_value=h.total
    )
    return family  # type: ignore[no-any-return]
