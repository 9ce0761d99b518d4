"""
HTTP/2 to clients: every forwarding rule, the translation rules of RFC 9113
section 8.2.3, and streaming with per-stream flow control, over real
loopback TLS (ALPN h2) with the h2 library as the client.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
import pytest_twisted
import trustme
from conftest import SECRET, reactor
from h2.errors import ErrorCodes
from h2client import H2Client, connect_h2, within
from helpers import H2Proxy, h2proxy, make_h2, sleep  # noqa: F401  (fixtures)
from standin import GZIPPED
from twisted.internet.defer import Deferred

from clerkproxy import build_site
from clerkproxy._accesslog import AccessLog
from clerkproxy._h2 import HTTP2Settings
from clerkproxy._metrics import MetricsCollector


def seen_header(fapi: Any, name: str, index: int = -1) -> list[str]:
    return fapi.header(name, index)


@pytest.mark.parametrize(
    ("target", "upstream"),
    [
        ("/__clerk", "/"),
        (
            "/__clerk/v1/client?__clerk_api_version=2026-05-12&_clerk_js_version=5.0.0",
            "/v1/client?__clerk_api_version=2026-05-12&_clerk_js_version=5.0.0",
        ),
        (
            "/__clerk//npm/@clerk/clerk-js@5/dist/clerk.browser.js",
            "/npm/@clerk/clerk-js@5/dist/clerk.browser.js",
        ),
        (
            "/__clerk/v1/a%2Fb/%E2%9C%93?redirect_url=https%3A%2F%2Fapp.test%2F&x=%zz",
            "/v1/a%2Fb/%E2%9C%93?redirect_url=https%3A%2F%2Fapp.test%2F&x=%zz",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_path_is_byte_exact_over_h2(
    h2proxy: H2Proxy, fapi: Any, target: str, upstream: str
) -> None:
    client = await h2proxy.client()
    response = await client.get(target)
    assert client.transport.negotiatedProtocol == b"h2"
    assert response.status == 200 and response.ended
    assert fapi.seen[-1]["uri"] == upstream
    assert response.header(b"x-fapi-seen") == [b"yes"]


@pytest_twisted.ensureDeferred
async def test_outside_the_prefix_is_404_json(h2proxy: H2Proxy, fapi: Any) -> None:
    client = await h2proxy.client()
    response = await client.get("/__clerkx/v1")
    assert response.status == 404
    assert json.loads(response.body)["errors"][0]["code"] == "resource_not_found"
    assert fapi.seen == []


@pytest_twisted.ensureDeferred
async def test_headers_injected_host_from_fapi_and_cookies_joined(
    h2proxy: H2Proxy, fapi: Any
) -> None:
    client = await h2proxy.client()
    response = await within(
        client.send(
            "POST",
            "/__clerk/v1/client/sign_ins",
            [
                ("content-type", "application/json"),
                ("content-length", "7"),
                ("clerk-secret-key", "sk_live_forged"),
                ("clerk-proxy-url", "https://evil.test/__clerk"),
                ("x-forwarded-for", "6.6.6.6"),
                ("cookie", "__client_uat=1"),
                ("cookie", "__session=abc"),
                ("x-custom", "kept"),
                ("x_custom", "dropped"),
                ("te", "trailers"),
            ],
            body=b'{"a":1}',
        ).done
    )
    assert response.status == 200, (response.reset, client.goaway)
    seen = fapi.seen[-1]
    assert seen["method"] == "POST" and seen["body"] == '{"a":1}'
    assert seen_header(fapi, "Clerk-Secret-Key") == [SECRET]
    assert seen_header(fapi, "Clerk-Proxy-Url") == ["https://app.test/__clerk"]
    assert seen_header(fapi, "X-Forwarded-For") == ["127.0.0.1"]
    # :authority never goes upstream as Host; FAPI's own host does.
    assert seen_header(fapi, "Host") == [fapi.url.split("//")[1]]
    # RFC 9113 section 8.2.3: several cookie fields become one line.
    assert seen_header(fapi, "Cookie") == ["__client_uat=1; __session=abc"]
    assert seen_header(fapi, "X-Custom") == ["kept"]
    assert seen_header(fapi, "X_custom") == [] and seen_header(fapi, "X_Custom") == []
    assert seen_header(fapi, "TE") == []
    assert seen_header(fapi, "Content-Length") == ["7"]


@pytest_twisted.ensureDeferred
async def test_connection_specific_request_headers_are_refused(
    h2proxy: H2Proxy, fapi: Any
) -> None:
    for name, value in [("connection", "keep-alive"), ("te", "gzip")]:
        client = await h2proxy.client()
        response = await within(
            client.send("GET", "/__clerk/v1/client", [(name, value)]).done
        )
        assert response.status is None
        await within(client.closed)
        assert client.goaway == ErrorCodes.PROTOCOL_ERROR
    assert fapi.seen == []


@pytest_twisted.ensureDeferred
async def test_response_rules_match_http11(h2proxy: H2Proxy, fapi: Any) -> None:
    client = await h2proxy.client()
    cookies, redirect, gzipped, hop = [
        client.send("GET", path)
        for path in [
            "/__clerk/cookies",
            "/__clerk/redirect",
            "/__clerk/gzip",
            "/__clerk/hop",
        ]
    ]
    await within(cookies.done)
    assert cookies.header(b"set-cookie") == [
        b"__client=abc; Path=/__clerk; HttpOnly; Secure; SameSite=Lax",
        b"__client_uat=1700000000; Path=/; Domain=app.test; Secure",
        b"__session=x, y; Path=/",
    ]
    await within(redirect.done)
    assert redirect.status == 302
    assert redirect.header(b"location") == [
        b"https://accounts.google.com/o/oauth2/auth?x=1"
    ]
    await within(gzipped.done)
    assert gzipped.body == GZIPPED
    assert gzipped.header(b"content-encoding") == [b"gzip"]
    await within(hop.done)
    assert hop.header(b"x-end-to-end") == [b"kept"]
    assert hop.header(b"x-secret-hop") == [] and hop.header(b"connection") == []
    assert hop.header(b"proxy-authenticate") == []


@pytest_twisted.ensureDeferred
async def test_413_502_and_504_are_json(
    make_h2: Callable[..., H2Proxy], fapi: Any
) -> None:
    h2proxy = make_h2(max_body_size=10, upstream_timeout=0.3)
    client = await h2proxy.client()
    large = await within(
        client.send(
            "POST", "/__clerk/v1/me", [("content-length", "11")], b"x" * 11
        ).done
    )
    assert large.status == 413
    assert json.loads(large.body)["errors"][0]["code"] == "proxy_request_too_large"
    slow = await within(client.send("GET", "/__clerk/stall").done)
    assert slow.status == 504
    assert json.loads(slow.body)["errors"][0]["code"] == "proxy_upstream_timeout"
    # Another stream of the same connection is unaffected.
    ok = await client.get("/__clerk/v1/client")
    assert ok.status == 200
    assert len([s for s in fapi.seen if s["uri"] == "/v1/me"]) == 0

    unreachable = make_h2(fapi_url="https://localhost:1")
    client = await unreachable.client()
    failed = await client.get("/__clerk/v1/client")
    assert failed.status == 502
    assert json.loads(failed.body)["errors"][0]["code"] == "proxy_request_failed"


@pytest_twisted.ensureDeferred
async def test_truncated_answer_resets_the_stream(h2proxy: H2Proxy, fapi: Any) -> None:
    client = await h2proxy.client()
    response = await within(client.send("GET", "/__clerk/truncate").done)
    assert response.status == 200
    assert not response.ended
    assert response.reset == ErrorCodes.INTERNAL_ERROR
    assert 0 < len(response.body) < 100000
    # The connection lives on for other streams.
    assert (await client.get("/__clerk/v1/client")).status == 200


@pytest_twisted.ensureDeferred
async def test_client_reset_cancels_the_upstream_exchange(
    h2proxy: H2Proxy, fapi: Any
) -> None:
    client = await h2proxy.client()
    response = client.send("POST", "/__clerk/stall", body=b"abc")
    while not fapi.recorder.stalled:
        await sleep(0.01)
    [stalled] = fapi.recorder.stalled
    gone: Deferred[None] = stalled.notifyFinish()
    client.reset(response.streamID)  # type: ignore[attr-defined]
    # The upstream connection carrying it is closed (FAPI sees it go).
    await within(gone.addErrback(lambda f: None))
    assert (await client.get("/__clerk/v1/client")).status == 200


async def send_as_window_allows(client: Any, streamID: int, data: bytes) -> None:
    """Send C{data} in frames as the stream's flow-control window opens."""
    for offset in range(0, len(data), 16384):
        piece = data[offset : offset + 16384]
        for _ in range(500):
            if client.conn.local_flow_control_window(streamID) >= len(piece):
                break
            await sleep(0.01)
        client.sendData(streamID, piece)


@pytest_twisted.ensureDeferred
async def test_body_streams_to_fapi_as_data_arrives(
    h2proxy: H2Proxy, fapi: Any
) -> None:
    # A body larger than the exchange's hold (64 KiB) streams; a smaller
    # one would go to FAPI in one piece once complete.
    first, rest = b"a" * 70000, b"b" * 30000
    client = await h2proxy.client()
    response = client.send(
        "PUT",
        "/__clerk/v1/upload",
        [("content-length", str(len(first) + len(rest)))],
        end=False,
    )
    await send_as_window_allows(client, response.streamID, first)  # type: ignore[attr-defined]
    for _ in range(500):
        if fapi.recorder.firstBodyBytes is not None:
            break
        await sleep(0.01)
    got = await within(fapi.recorder.firstBodyBytes)
    assert got and set(got) == {ord("a")}
    await send_as_window_allows(client, response.streamID, rest)  # type: ignore[attr-defined]
    client.sendData(response.streamID, b"", end=True)  # type: ignore[attr-defined]
    await within(response.done)
    assert response.status == 200
    assert fapi.seen[-1]["body_length"] == len(first) + len(rest)


@pytest_twisted.ensureDeferred
async def test_body_without_length_goes_chunked(h2proxy: H2Proxy, fapi: Any) -> None:
    client = await h2proxy.client()
    response = client.send("POST", "/__clerk/v1/x", body=b"abc", end=False)
    client.sendData(response.streamID, b"def", end=True)  # type: ignore[attr-defined]
    await within(response.done)
    assert response.status == 200
    assert fapi.seen[-1]["body"] == "abcdef"
    assert seen_header(fapi, "Transfer-Encoding") == ["chunked"]


@pytest.mark.parametrize(("declared", "sent"), [(10, b"x" * 11), (10, b"x" * 9)])
@pytest_twisted.ensureDeferred
async def test_body_disagreeing_with_content_length_is_a_stream_error(
    h2proxy: H2Proxy, fapi: Any, declared: int, sent: bytes
) -> None:
    client = await h2proxy.client()
    # The h2 client checks lengths itself only on the receiving side.
    response = client.send(
        "POST", "/__clerk/v1/x", [("content-length", str(declared))], body=sent
    )
    await within(response.done)
    assert response.reset == ErrorCodes.PROTOCOL_ERROR
    assert response.status is None
    # Nothing of it reached FAPI as a complete request.
    assert [s for s in fapi.seen if s["uri"] == "/v1/x"] == []
    # A stream error: the connection goes on.
    assert (await client.get("/__clerk/v1/client")).status == 200
    assert h2proxy.metrics.http2Events["content_length_mismatch"] == 1


@pytest_twisted.ensureDeferred
async def test_head_and_204_have_no_body(h2proxy: H2Proxy, fapi: Any) -> None:
    client = await h2proxy.client()
    head = await within(client.send("HEAD", "/__clerk/v1/environment").done)
    assert head.status == 200 and head.body == b"" and head.ended
    assert head.header(b"content-length")
    empty = await client.get("/__clerk/status/204")
    assert empty.status == 204 and empty.body == b"" and empty.ended


@pytest_twisted.ensureDeferred
async def test_a_stalled_stream_does_not_stall_its_neighbours(
    h2proxy: H2Proxy, fapi: Any
) -> None:
    client = await h2proxy.client(autoWindow=False)
    # The connection's window is wide open; the big stream's stays at the
    # default 64 KiB because the client never acknowledges its bytes.
    client.conn.increment_flow_control_window(1 << 30)
    client.flush()
    size = 32 * 1024 * 1024
    big = client.send("GET", f"/__clerk/big/{size}")
    while not fapi.recorder.streams:
        await sleep(0.01)
    await sleep(0.5)
    [state] = fapi.recorder.streams
    # The stream's window (64 KiB) is all that went out; FAPI was paused
    # for this stream: what left it fits in socket buffers.
    assert state["paused"]
    assert 0 < size - state["left"] < 16 * 1024 * 1024
    assert len(big.body) <= 65535
    # Another stream on the same connection is answered meanwhile.
    other = client.send("GET", "/__clerk/v1/client")
    await within(other.done)
    assert other.status == 200 and other.ended
    # Opening the window drains everything, byte-exact.
    client.autoWindow = True
    client.openWindow(big.streamID, len(big.body))  # type: ignore[attr-defined]
    await within(big.done, 60)
    assert big.ended and len(big.body) == size


@pytest_twisted.ensureDeferred
async def test_many_streams_at_once(h2proxy: H2Proxy, fapi: Any) -> None:
    client = await h2proxy.client()
    responses = [client.send("GET", f"/__clerk/v1/n{i}") for i in range(50)]
    for response in responses:
        await within(response.done)
    assert all(r.status == 200 and r.ended for r in responses)
    assert sorted(s["uri"] for s in fapi.seen) == sorted(f"/v1/n{i}" for i in range(50))


@pytest_twisted.ensureDeferred
async def test_h2c_with_prior_knowledge_and_http11_on_the_same_port(
    h2proxy: H2Proxy, fapi: Any
) -> None:
    from conftest import parse_response, raw_request

    client = await connect_h2(h2proxy.port, tls=False)
    assert (await client.get("/__clerk/v1/client")).status == 200
    status, _, _ = parse_response(
        await raw_request(
            h2proxy.port,
            b"GET /__clerk/v1/client HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
    )
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_http2_off_offers_only_http11(
    make_h2: Callable[..., H2Proxy], fapi: Any
) -> None:
    h2proxy = make_h2(HTTP2Settings(tls=False, h2c=False))
    from twisted.internet.endpoints import (
        TCP4ClientEndpoint,
        connectProtocol,
        wrapClientTLS,
    )
    from twisted.internet.ssl import Certificate, optionsForClientTLS

    client = H2Client()
    options = optionsForClientTLS(
        "localhost",
        trustRoot=Certificate.loadPEM(h2proxy.ca.cert_pem.bytes()),
        acceptableProtocols=[b"h2", b"http/1.1"],
    )
    endpoint = wrapClientTLS(
        options, TCP4ClientEndpoint(reactor, "127.0.0.1", h2proxy.tlsPort)
    )
    await connectProtocol(endpoint, client)
    client.transport.loseConnection()
    await within(client.closed)
    assert client.transport.negotiatedProtocol == b"http/1.1"


@pytest_twisted.ensureDeferred
async def test_metrics_and_access_log_carry_the_protocol(
    make_h2: Callable[..., H2Proxy], fapi: Any
) -> None:
    sink = StringIO()
    h2proxy = make_h2(access_log=AccessLog(sink))
    client = await h2proxy.client()
    await client.get("/__clerk/v1/client?__session=secret")
    families = {f.name: f for f in MetricsCollector(h2proxy.metrics).collect()}
    samples = [s.labels for s in families["clerkproxy_requests"].samples if s.value]
    assert {"method": "GET", "code": "200", "protocol": "HTTP/2"} in samples
    [line] = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert line["protocol"] == "HTTP/2" and line["status"] == 200
    assert "secret" not in line["path"]


@pytest.mark.parametrize(
    ("args", "tls", "h2c", "streams"),
    [
        ([], True, False, 100),
        (["--http2", "off"], False, False, 100),
        (["--h2c", "--h2-max-concurrent-streams", "7"], True, True, 7),
    ],
)
def test_options(
    monkeypatch: pytest.MonkeyPatch, args: list[str], tls: bool, h2c: bool, streams: int
) -> None:
    from clerkproxy.tap import Options

    monkeypatch.setenv("CLERK_SECRET_KEY", SECRET)
    options = Options()
    options.parseOptions(["--proxy-url", "https://app.test/__clerk", *args])
    http2 = options.settings.http2
    assert (http2.tls, http2.h2c, http2.maxConcurrentStreams) == (tls, h2c, streams)


@pytest_twisted.ensureDeferred
async def test_max_connections_per_client_counts_h2_connections(
    make_h2: Callable[..., H2Proxy], fapi: Any
) -> None:
    h2proxy = make_h2(max_connections_per_client=1)
    first = await h2proxy.client()
    assert (await first.get("/__clerk/v1/client")).status == 200
    second = await h2proxy.client()
    second.send("GET", "/__clerk/v1/client")
    await within(second.closed)
    assert len(fapi.seen) == 1
    first.transport.loseConnection()
    await within(first.closed)
    third = await h2proxy.client()
    assert (await third.get("/__clerk/v1/client")).status == 200


@pytest_twisted.ensureDeferred
async def test_idle_connection_gets_goaway_at_the_idle_deadline(
    h2proxy: H2Proxy, fapi: Any
) -> None:
    from twisted.internet.task import Clock

    from clerkproxy._deadlines import Deadlines

    clock = Clock()
    site = h2proxy.proxy.site
    site.idleDeadlines = Deadlines(clock, 60.0)
    client = await h2proxy.client()
    assert (await client.get("/__clerk/v1/client")).status == 200
    clock.advance(59)
    assert not client.closed.called
    clock.advance(2)
    await within(client.closed)
    assert client.goaway == ErrorCodes.NO_ERROR
    assert h2proxy.metrics.timeouts["idle"] == 1


@pytest_twisted.ensureDeferred
async def test_drain_lets_open_streams_finish_then_closes(
    h2proxy: H2Proxy, fapi: Any
) -> None:
    client = await h2proxy.client()
    response = client.send("GET", "/__clerk/stall")
    while not fapi.recorder.stalled:
        await sleep(0.01)
    site = h2proxy.proxy.site
    site.drain()
    while client.goaway is None:
        await sleep(0.01)
    assert client.goaway == ErrorCodes.NO_ERROR
    assert not client.closed.called
    [stalled] = fapi.recorder.stalled
    stalled.write(b"late but whole")
    stalled.finish()
    await within(response.done)
    assert response.status == 200 and response.ended, (response.reset, fapi.seen)
    assert response.body == b"late but whole"
    await within(client.closed)
    for _ in range(500):
        if not site.channels:
            break
        await sleep(0.01)
    assert not site.channels


@pytest_twisted.ensureDeferred
async def test_resources_that_do_not_stream_ask_for_http11() -> None:
    from twisted.web.resource import Resource

    class Plain(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            return b"plain"

    root = Resource()  # not a leaf: the tree is traversed
    root.putChild(b"plain", Plain())
    site = build_site(root, reactor, http2=HTTP2Settings(h2c=True))
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    try:
        client = await connect_h2(port.getHost().port, tls=False)
        response = await client.get("/plain")
        assert response.reset == ErrorCodes.HTTP_1_1_REQUIRED
        client.transport.loseConnection()
        await within(client.closed)
    finally:
        await port.stopListening()


@pytest.mark.parametrize("kind", ["tls-cert", "sni"])
@pytest_twisted.ensureDeferred
async def test_the_cli_certificate_paths_offer_h2(
    make_proxy: Callable[..., Any], fapi: Any, ca: trustme.CA, tmp_path: Any, kind: str
) -> None:
    """--tls-cert (ReloadableServerTLS) and the SNI/ACME context factory,
    which answers ALPN itself, both negotiate h2 when HTTP/2 is on."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key
    from twisted.protocols.tls import TLSMemoryBIOFactory

    from clerkproxy._sni import SNIServerTLS
    from clerkproxy._tls import ReloadableServerTLS

    def site(resource: Any, clock: Any) -> Any:
        return build_site(resource, clock, http2=HTTP2Settings())

    proxy = make_proxy(site_factory=site)
    cert = ca.issue_cert("localhost", "127.0.0.1")
    certPath, keyPath = tmp_path / "cert.pem", tmp_path / "key.pem"
    certPath.write_bytes(b"".join(b.bytes() for b in cert.cert_chain_pems))
    keyPath.write_bytes(cert.private_key_pem.bytes())
    if kind == "tls-cert":
        tls: Any = ReloadableServerTLS(str(certPath), str(keyPath))
    else:
        tls = SNIServerTLS(tuple(proxy.site.acceptableProtocols()))
        tls.install(
            ["localhost"],
            load_pem_private_key(cert.private_key_pem.bytes(), None),
            [x509.load_pem_x509_certificate(b.bytes()) for b in cert.cert_chain_pems],
        )
    port = reactor.listenTCP(
        0, TLSMemoryBIOFactory(tls, False, proxy.site), interface="127.0.0.1"
    )
    try:
        client = await connect_h2(port.getHost().port, ca)
        assert (await client.get("/__clerk/v1/client")).status == 200
        assert client.transport.negotiatedProtocol == b"h2"
        client.transport.loseConnection()
        await within(client.closed)
    finally:
        await port.stopListening()
