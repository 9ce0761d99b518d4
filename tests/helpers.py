"""Helpers shared by several test modules (import them from here, not from
each other)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import pytest
import pytest_twisted
import trustme
from conftest import (
    SECRET,
    _server_options,
    parse_response,
    reactor,
)
from h2client import H2Client, connect_h2
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from zope.interface import implementer

from clerkproxy import HTTP2Settings, build_site
from clerkproxy._config import Timeouts
from clerkproxy._errors import respond_error
from clerkproxy._proxy import AppProxy, EdgeRouter
from clerkproxy._settings import read_settings
from clerkproxy._tcp_compat import coalesce_port
from clerkproxy._upstream import UpstreamPool, app_endpoint
from clerkproxy.interfaces import IRequestBodyReceiver, IStreamingResource
from clerkproxy.tap import Options

# -- the FAPI connection pool, in memory ----------------------------------------

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
HEAD = b"GET / HTTP/1.1\r\nHost: fapi.test\r\n\r\n"


@implementer(IStreamClientEndpoint)
class FakeEndpoint:
    """Connection attempts the test completes (or fails) by hand."""

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, Deferred[Any]]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.attempts.append((factory, d))
        return d

    def complete(self, index: int = -1) -> tuple[Any, StringTransport]:
        factory, d = self.attempts[index]
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        d.callback(proto)
        return proto, transport


class Recorder:
    """An exchange that writes down what its connection tells it."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def responseStarted(
        self, code: int, phrase: bytes, headers: Any, length: Any, connection: Any
    ) -> None:
        self.events.append(("start", code, phrase, headers, length, connection))

    def responseData(self, data: bytes) -> None:
        self.events.append(("data", data))

    def responseDone(self) -> None:
        self.events.append(("done",))

    def upstreamFailed(self, reason: Any, nothingReceived: bool) -> None:
        self.events.append(("failed", reason, nothingReceived))


def serve_one(proto: Any, transport: StringTransport) -> Recorder:
    """Send a GET on C{proto} and answer it, so the connection goes idle."""
    exchange = Recorder()
    proto.send(exchange, HEAD, False, None)
    transport.clear()
    proto.dataReceived(RESPONSE)
    return exchange


# -- streaming requests and the channel, in memory (HTTP/1.1 and HTTP/2) ---------


@implementer(IRequestBodyReceiver)
class Receiver:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.done = False

    def bodyDataReceived(self, data: bytes) -> None:
        self.chunks.append(data)

    def bodyDone(self) -> None:
        self.done = True


@implementer(IStreamingResource)
class Recording(Resource):
    """Streams bodies, or answers at once when told to."""

    isLeaf = True

    def __init__(self, reject: int | None = None) -> None:
        super().__init__()
        self.reject = reject
        self.streamed: list[tuple[Any, int | None, Receiver]] = []
        self.rendered: list[Any] = []

    def renderStreaming(self, request: Any, length: int | None) -> Receiver | None:
        receiver = Receiver()
        self.streamed.append((request, length, receiver))
        if self.reject:
            respond_error(request, self.reject, "proxy_request_too_large")
            return None
        return receiver

    def render(self, request: Any) -> Any:
        self.rendered.append((request.method, request.uri, request.content.read()))
        return b"plain"


def connect(resource: Resource) -> tuple[Any, StringTransport]:
    site = build_site(resource, MemoryReactorClock())
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    return protocol, transport


@implementer(IStreamingResource)
class Streaming(Resource):
    isLeaf = True

    def __init__(self) -> None:
        Resource.__init__(self)
        self.requests: list[tuple[Any, int | None, Receiver]] = []

    def renderStreaming(self, request: Any, length: int | None) -> Receiver:
        receiver = Receiver()
        self.requests.append((request, length, receiver))
        return receiver


def _connect() -> tuple[Streaming, Any, StringTransport, h2.connection.H2Connection]:
    resource = Streaming()
    site = build_site(resource, MemoryReactorClock(), http2=HTTP2Settings(h2c=True))
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    return resource, protocol, transport, client


def _exchange(protocol: Any, transport: StringTransport, client: Any) -> None:
    protocol.dataReceived(client.data_to_send())
    client.receive_data(transport.value())
    transport.clear()


# -- twistd as a user runs it ---------------------------------------------------

TWISTD = str(Path(sys.executable).with_name("twistd"))


def twistd(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_")}
    environ.update(env or {})
    return subprocess.run(
        [TWISTD, "-n", "clerkproxy", *args],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, process: subprocess.Popen[Any]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(process.stdout.read() if process.stdout else "exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("clerkproxy did not start listening")


def start(args: list[str], key_file: Path) -> subprocess.Popen[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("CLERK_")}
    return subprocess.Popen(
        [
            TWISTD,
            "-n",
            "--pidfile=",
            "clerkproxy",
            *args,
            "--secret-key-file",
            str(key_file),
        ],
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def start_against(
    fapi: Any, ca: trustme.CA, where: Path, ports: list[str]
) -> subprocess.Popen[str]:
    """Run the installed twistd plugin in front of the stand-in FAPI."""
    key_file = where / "key"
    key_file.write_text(SECRET + "\n")
    ca_file = where / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    options = [
        "--proxy-url",
        "https://app.test/__clerk",
        "--fapi",
        fapi.url,
        "--fapi-ca",
        str(ca_file),
    ]
    return start([*ports, *options], key_file)


def start_with_admin(
    fapi: Any, ca: trustme.CA, where: Path, *options: str
) -> tuple[subprocess.Popen[str], int, int]:
    """L{start_against} listening on a free port, with the admin listener on
    another; returns the process and the two ports."""
    port, admin = free_port(), free_port()
    process = start_against(
        fapi,
        ca,
        where,
        [
            "--port",
            f"tcp:{port}:interface=127.0.0.1",
            "--admin-port",
            f"tcp:{admin}:interface=127.0.0.1",
            *options,
        ],
    )
    return process, port, admin


def stop(process: subprocess.Popen[str]) -> str:
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=20)
    # twistd re-raises the terminating signal once shut down cleanly.
    assert process.returncode in (0, -signal.SIGTERM), output
    assert "Server Shut Down." in output and "Traceback" not in output
    return output


# -- sites ----------------------------------------------------------------------

KEY_A = "sk_live_" + "a" * 40
KEY_B = "sk_live_" + "b" * 40


def settings_for(argv: list[str], environ: dict[str, str] | None = None) -> Any:
    options = Options()
    # Parse without postOptions' environment: use ours.
    options.postOptions = lambda: None  # type: ignore[method-assign]
    options.parseOptions(argv)
    return read_settings(options, environ or {"KEY_FOR_B": KEY_B}, argv)


def _read_response(sock: Any) -> tuple[int, dict[bytes, bytes], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    status, headers, body = parse_response(data)
    fields = dict(headers)
    length = int(fields.get(b"content-length", b"0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, fields, body


# -- app routing ----------------------------------------------------------------


class AppEcho(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[dict[str, Any]] = []

    def render(self, request: Any) -> bytes:
        self.seen.append(
            {
                "uri": request.uri,
                "headers": {
                    k.decode(): [v.decode() for v in vs]
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                },
                "body": request.content.read(),
            }
        )
        return b"app says hi"


def edge_with_app(appPort: Any, **site_options: Any) -> Callable[[Any, Any], Any]:
    """A site factory for make_proxy: FAPI under the prefix, and the app
    listening on C{appPort} (as C{app.internal}) for everything else;
    C{site_options} go to L{build_site}."""

    def with_app(resource: Any, clock: Any) -> Any:
        pool = UpstreamPool(
            clock,
            app_endpoint(clock, "127.0.0.1", appPort.getHost().port, False, 5.0),
        )
        app = AppProxy(
            clock,
            pool,
            b"app.internal",
            b"",
            resource.clientAddress,
            1 << 20,
            Timeouts(5.0),
            resource.metrics,
        )
        return build_site(EdgeRouter(resource, app), clock, **site_options)

    return with_app


# -- HTTP/2 over loopback TLS ----------------------------------------------------


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class H2Proxy:
    """The proxy with a TLS listener offering h2, and a plain one."""

    def __init__(self, proxy: Any, ca: trustme.CA) -> None:
        self.proxy = proxy
        self.ca = ca
        cert = ca.issue_cert("localhost", "127.0.0.1")
        self.tls = coalesce_port(
            reactor.listenSSL(
                0, proxy.site, _server_options(cert), interface="127.0.0.1"
            )
        )
        self.tlsPort = self.tls.getHost().port
        self.port = proxy.port
        self.metrics = proxy.resource.metrics

    async def client(self, **kwargs: Any) -> H2Client:
        return await connect_h2(self.tlsPort, self.ca, **kwargs)


@pytest.fixture
def make_h2(
    make_proxy: Callable[..., Any], ca: trustme.CA
) -> Iterator[Callable[..., H2Proxy]]:
    made: list[H2Proxy] = []

    def make(http2: HTTP2Settings | None = None, **overrides: Any) -> H2Proxy:
        settings = http2 or HTTP2Settings(h2c=True)
        log = overrides.pop("access_log", None)
        perClient = overrides.pop("max_connections_per_client", 0)

        def site(resource: Any, reactor: Any) -> Any:
            return build_site(
                resource,
                reactor,
                http2=settings,
                access_log=log,
                max_connections_per_client=perClient,
            )

        h2proxy = H2Proxy(make_proxy(site_factory=site, **overrides), ca)
        made.append(h2proxy)
        return h2proxy

    yield make
    for h2proxy in made:
        pytest_twisted.blockon(h2proxy.tls.stopListening())


@pytest.fixture
def h2proxy(make_h2: Callable[..., H2Proxy]) -> H2Proxy:
    return make_h2()
