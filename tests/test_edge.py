"""
Edge options and checks: request-line and head sizes, connections per
client, PROXY protocol version 1 lines, and what --app passes on.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from conftest import SECRET, connect_raw, parse_response, raw_request, reactor, within
from helpers import AppEcho, Recording, edge_with_app
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.server import Site

from clerkproxy import build_site
from clerkproxy._endpoints import server_endpoint, valid_proxy_v1_line
from clerkproxy._forwarded import ClientAddress, valid_host_and_port
from clerkproxy._metrics import MetricsCollector
from clerkproxy.tap import Options

# -- options -------------------------------------------------------------------


def parse(tmp_path: Path, *args: str) -> Options:
    key = tmp_path / "key"
    key.write_text(SECRET)
    options = Options()
    options.parseOptions(
        [
            "--proxy-url",
            "https://app.test/__clerk",
            "--secret-key-file",
            str(key),
            *args,
        ]
    )
    return options


def test_edge_option_defaults(tmp_path: Path) -> None:
    settings = parse(tmp_path).settings
    assert settings.maxRequestLine == 16 * 1024
    assert settings.maxHeaderSize == 64 * 1024
    assert settings.maxConnectionsPerClient == 0


def test_edge_options_are_read(tmp_path: Path) -> None:
    settings = parse(
        tmp_path,
        "--max-request-line",
        "32768",
        "--max-header-size",
        "131072",
        "--max-connections-per-client",
        "20",
    ).settings
    assert settings.maxRequestLine == 32768
    assert settings.maxHeaderSize == 131072
    assert settings.maxConnectionsPerClient == 20


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--max-request-line", "lots"], "--max-request-line"),
        (["--max-request-line", "-1"], "--max-request-line"),
        (["--max-request-line", "100"], "--max-request-line"),
        (["--max-header-size", "1.5"], "--max-header-size"),
        (["--max-header-size", "8192"], "--max-header-size"),  # < request line
        (["--max-connections-per-client", "-3"], "--max-connections-per-client"),
        (["--max-connections-per-client", "many"], "--max-connections-per-client"),
    ],
)
def test_bad_edge_options_name_the_option(
    tmp_path: Path, args: list[str], needle: str
) -> None:
    with pytest.raises(SystemExit) as raised:
        parse(tmp_path, *args)
    message = str(raised.value)
    assert message.startswith("clerkproxy: ") and needle in message
    assert SECRET not in message


# -- connections per client ----------------------------------------------------


def site_with_limit(limit: int, trusted: tuple[str, ...] = ()) -> Any:
    return build_site(
        Recording(),
        MemoryReactorClock(),
        client_address=ClientAddress([ipaddress.ip_network(t) for t in trusted]),
        max_connections_per_client=limit,
    )


def open_from(site: Any, peer: Any) -> tuple[Any, StringTransport]:
    protocol = site.buildProtocol(None)
    transport = StringTransport(peerAddress=peer)
    protocol.makeConnection(transport)
    return protocol, transport


def rejected(site: Any) -> float:
    registry = CollectorRegistry()
    registry.register(MetricsCollector(site.metrics))
    for line in generate_latest(registry).decode().splitlines():
        if line.startswith(
            'clerkproxy_connections_rejected_total{reason="per_client"}'
        ):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


GET = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"


def test_over_the_limit_a_client_is_closed_at_once() -> None:
    site = site_with_limit(2)
    peer = IPv4Address("TCP", "203.0.113.9", 1000)
    first = [open_from(site, peer) for _ in range(2)]
    for protocol, transport in first:
        protocol.dataReceived(GET)
        assert transport.value().startswith(b"HTTP/1.1 200 ")
    protocol, transport = open_from(site, peer)
    protocol.dataReceived(GET)
    assert transport.value() == b""
    assert transport.disconnecting
    assert rejected(site) == 1
    # Another client is not affected.
    other, otherTransport = open_from(site, IPv4Address("TCP", "198.51.100.7", 1))
    other.dataReceived(GET)
    assert otherTransport.value().startswith(b"HTTP/1.1 200 ")
    # A closed connection frees its place.
    protocol.connectionLost(None)  # the rejected one: counted nowhere
    first[0][0].connectionLost(None)
    again, againTransport = open_from(site, peer)
    again.dataReceived(GET)
    assert againTransport.value().startswith(b"HTTP/1.1 200 ")
    assert rejected(site) == 1


def test_no_limit_by_default() -> None:
    site = build_site(Recording(), MemoryReactorClock())
    peer = IPv4Address("TCP", "203.0.113.9", 1000)
    for _ in range(50):
        protocol, transport = open_from(site, peer)
        protocol.dataReceived(GET)
        assert transport.value().startswith(b"HTTP/1.1 200 ")


def test_behind_a_trusted_proxy_the_forwarded_client_is_counted() -> None:
    site = site_with_limit(1, ("10.0.0.0/8",))
    balancer = IPv4Address("TCP", "10.0.0.2", 1000)
    head = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: %s\r\n\r\n"
    one, oneT = open_from(site, balancer)
    one.dataReceived(head % b"203.0.113.9")
    two, twoT = open_from(site, balancer)
    two.dataReceived(head % b"198.51.100.7")
    assert oneT.value().startswith(b"HTTP/1.1 200 ")
    assert twoT.value().startswith(b"HTTP/1.1 200 ")
    three, threeT = open_from(site, balancer)
    three.dataReceived(head % b"203.0.113.9")
    assert threeT.value() == b"" and rejected(site) == 1
    # Counted once, at the first head: later requests on the same
    # connection do not change whom it counts for.
    one.dataReceived(head % b"192.0.2.1")
    assert oneT.value().count(b"HTTP/1.1 200 ") == 2


def test_a_unix_socket_peer_without_forwarding_is_not_counted() -> None:
    site = site_with_limit(1)
    for _ in range(3):
        protocol, transport = open_from(site, UNIXAddress(None))
        protocol.dataReceived(GET)
        assert transport.value().startswith(b"HTTP/1.1 200 ")


@pytest_twisted.ensureDeferred
async def test_per_client_limit_over_loopback(make_proxy: Any, fapi: Any) -> None:
    proxy = make_proxy(
        site_factory=lambda resource, clock: build_site(
            resource,
            clock,
            client_address=resource.clientAddress,
            max_connections_per_client=3,
        )
    )
    held = []
    for _ in range(3):
        client = await connect_raw(proxy.port)
        client.transport.write(b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\n\r\n")
        await within(client.waitFor(b"\r\n\r\n"))
        held.append(client)
    extra = await connect_raw(proxy.port)
    extra.transport.write(b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\n\r\n")
    assert await within(extra.closed) == b""
    assert proxy.site.metrics.connectionsRejected == {"per_client": 1}
    held[0].transport.loseConnection()
    await within(held[0].closed)
    data = await raw_request(
        proxy.port,
        b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    assert parse_response(data)[0] == 200
    for client in held[1:]:
        client.transport.loseConnection()
        await within(client.closed)


@pytest_twisted.ensureDeferred
async def test_behind_proxy_protocol_the_real_client_is_counted(
    make_proxy: Any, fapi: Any
) -> None:
    proxy = make_proxy(
        site_factory=lambda resource, clock: build_site(
            resource,
            clock,
            client_address=resource.clientAddress,
            max_connections_per_client=1,
        )
    )
    listening = await server_endpoint(
        reactor, "haproxy:tcp:0:interface=127.0.0.1", None
    ).listen(proxy.site)
    port = listening.getHost().port
    try:
        first = await connect_raw(port)
        first.transport.write(
            b"PROXY TCP4 203.0.113.9 10.0.0.1 4242 443\r\n"
            b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        await within(first.waitFor(b"\r\n\r\n"))
        # Same balancer, another client: served.
        data = await raw_request(
            port,
            b"PROXY TCP4 198.51.100.7 10.0.0.1 4242 443\r\n"
            b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        assert parse_response(data)[0] == 200
        # The first client again: over its limit.
        data = await raw_request(
            port,
            b"PROXY TCP4 203.0.113.9 10.0.0.1 4243 443\r\n"
            b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        assert data == b""
        first.transport.loseConnection()
        await within(first.closed)
    finally:
        await listening.stopListening()


# -- PROXY protocol version 1 ---------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 not-an-ip 10.0.0.1 4242 443",
        b"PROXY TCP4 999.1.1.1 10.0.0.1 4242 443",
        b"PROXY TCP4 2001:db8::1 10.0.0.1 4242 443",
        b"PROXY TCP4 6.6.6.6,198.51.100.7 10.0.0.1 4242 443",
        b"PROXY TCP4 203.0.113.9 10.0.0.1 4242 99999",
        b"PROXY TCP4 203.0.113.9 10.0.0.1 042 443",
        b"PROXY TCP4 203.0.113.9  10.0.0.1 4242 443",
        b"PROXY TCP4 203.0.113.9 10.0.0.1 4242",
        b"PROXY TCP4 203.0.113.009 10.0.0.1 4242 443",
        b"PROXY TCP6 203.0.113.9 ::1 4242 443",
        b"PROXY TCP5 203.0.113.9 10.0.0.1 4242 443",
        b"PROXY UNKNOWNX",
    ],
)
def test_bad_proxy_lines_are_invalid(line: bytes) -> None:
    assert not valid_proxy_v1_line(line)


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 203.0.113.9 10.0.0.1 4242 443",
        b"PROXY TCP6 2001:db8::1 2001:db8::2 4242 443",
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535",
        b"PROXY UNKNOWN",
        b"PROXY UNKNOWN whatever follows",
    ],
)
def test_good_proxy_lines_are_valid(line: bytes) -> None:
    assert valid_proxy_v1_line(line)


@given(source=st.binary(min_size=1, max_size=45).filter(lambda b: b" " not in b))
def test_only_addresses_pass_as_sources(source: bytes) -> None:
    line = b"PROXY TCP4 " + source + b" 10.0.0.1 4242 443"
    try:
        ipaddress.IPv4Address(source.decode("ascii"))
        is_address = True
    except ValueError:
        is_address = False
    assert valid_proxy_v1_line(line) == is_address


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 not-an-ip 10.0.0.1 4242 443",
        b"PROXY TCP4 999.1.1.1 10.0.0.1 4242 443",
        b"PROXY TCP4 2001:db8::1 10.0.0.1 4242 443",
        b"PROXY TCP4 6.6.6.6,198.51.100.7 10.0.0.1 4242 443",
        b"PROXY TCP4 " + b"1" * 120,
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_proxy_line_closes_the_connection(
    proxy: Any, fapi: Any, line: bytes
) -> None:
    listening = await server_endpoint(
        reactor, "haproxy:tcp:0:interface=127.0.0.1", None
    ).listen(proxy.site)
    try:
        data = await raw_request(
            listening.getHost().port,
            line + b"\r\nGET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\n"
            b"Connection: close\r\n\r\n",
        )
    finally:
        await listening.stopListening()
    assert data == b""
    assert fapi.seen == []


@pytest_twisted.ensureDeferred
async def test_a_good_proxy_line_trickled_in_still_works(proxy: Any, fapi: Any) -> None:
    from twisted.internet.task import deferLater

    listening = await server_endpoint(
        reactor, "haproxy:tcp:0:interface=127.0.0.1", None
    ).listen(proxy.site)
    try:
        client = await connect_raw(listening.getHost().port)
        for piece in (b"PRO", b"XY TCP4 203.0.113.9 ", b"10.0.0.1 4242 443\r", b"\n"):
            client.transport.write(piece)
            await deferLater(reactor, 0.02)
        client.transport.write(
            b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        data = await within(client.closed)
    finally:
        await listening.stopListening()
    assert parse_response(data)[0] == 200
    assert fapi.header("X-Forwarded-For") == ["203.0.113.9"]


# -- --app ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (b"app.test", True),
        (b"app.test:8443", True),
        (b"192.0.2.1:80", True),
        (b"[2001:db8::1]:443", True),
        (b"my_host", True),
        (b"evil/x?y", False),
        (b"a, b", False),
        (b"a,b", False),
        (b"", False),
        (b"a:", False),
        (b"a:99999", False),
        (b"a..b", False),
        (b"[::1", False),
        (b"[nothex]", False),
        (b"a b", False),
    ],
)
def test_forwarded_host_syntax(value: bytes, valid: bool) -> None:
    assert valid_host_and_port(value) == valid


@pytest.fixture
def edge(make_proxy: Any, fapi: Any) -> Any:
    echo = AppEcho()
    appSite = Site(echo)
    appSite.log = lambda request: None  # type: ignore[method-assign]
    appPort = reactor.listenTCP(0, appSite, interface="127.0.0.1")
    proxy = make_proxy(site_factory=edge_with_app(appPort))
    yield proxy, echo
    pytest_twisted.blockon(appPort.stopListening())


@pytest.mark.parametrize(
    ("host", "forwarded"),
    [
        (b"app.test", ["app.test"]),
        (b"app.test:8443", ["app.test:8443"]),
        (b"a,b", None),  # a valid Host for HTTP, but not a host name
        (b"", None),
    ],
)
@pytest_twisted.ensureDeferred
async def test_only_a_valid_host_is_forwarded(
    edge: Any, host: bytes, forwarded: list[str] | None
) -> None:
    proxy, echo = edge
    data = await raw_request(
        proxy.port,
        b"GET /page HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
    )
    assert parse_response(data)[0] == 200
    assert echo.seen[-1]["headers"].get("X-Forwarded-Host") == forwarded


@pytest.mark.parametrize("host", [b"evil/x?y", b"a, b", b"app.test\r\nHost: evil.test"])
@pytest_twisted.ensureDeferred
async def test_a_bad_or_second_host_never_reaches_the_app(
    edge: Any, host: bytes
) -> None:
    proxy, echo = edge
    data = await raw_request(
        proxy.port,
        b"GET /page HTTP/1.1\r\nHost: " + host + b"\r\nConnection: close\r\n\r\n",
    )
    assert parse_response(data)[0] == 400
    assert echo.seen == []


@pytest.mark.parametrize(
    "target", [b"//__clerk/v1/client", b"///__clerk/v1/client?x=1", b"//__clerk"]
)
@pytest_twisted.ensureDeferred
async def test_doubled_slashes_before_the_prefix_go_nowhere(
    edge: Any, fapi: Any, target: bytes
) -> None:
    proxy, echo = edge
    data = await raw_request(
        proxy.port,
        b"GET " + target + b" HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    status, _, body = parse_response(data)
    assert status == 404 and b"resource_not_found" in body
    assert echo.seen == [] and fapi.seen == []
    # Other doubled slashes are the application's business, unchanged.
    data = await raw_request(
        proxy.port,
        b"GET //static/x.js HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n",
    )
    assert parse_response(data)[0] == 200
    assert echo.seen[-1]["uri"] == b"//static/x.js"
