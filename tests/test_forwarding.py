"""
End to end over loopback: client -> clerkproxy -> TLS stand-in FAPI.

Every bullet of the forwarding contract, checked on the wire.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest
import pytest_twisted
from conftest import PROXY_URL, SECRET, parse_response, raw_request
from standin import GZIPPED


def request_bytes(
    method: str, target: str, headers: list[tuple[str, str]] = (), body: bytes = b""
) -> bytes:  # type: ignore[assignment]
    lines = [f"{method} {target} HTTP/1.1"]
    if not any(n.lower() == "host" for n, _ in headers):
        lines.append("Host: app.test")
    lines += [f"{n}: {v}" for n, v in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


async def call(
    proxy: Any, method: str, target: str, headers: Any = (), body: bytes = b""
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    return parse_response(
        await raw_request(proxy.port, request_bytes(method, target, headers, body))
    )


@pytest.mark.parametrize(
    ("target", "upstream"),
    [
        ("/__clerk", "/"),
        ("/__clerk/", "/"),
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
async def test_prefix_is_stripped_and_the_rest_is_byte_for_byte(
    proxy: Any, fapi: Any, target: str, upstream: str
) -> None:
    status, _, _ = await call(proxy, "GET", target)
    assert status == 200
    assert fapi.seen[-1]["uri"] == upstream


@pytest.mark.parametrize(
    "target", ["/__clerkx", "/", "/app/__clerk/v1", "/%5F%5Fclerk/v1"]
)
@pytest_twisted.ensureDeferred
async def test_paths_outside_the_prefix_never_reach_fapi(
    proxy: Any, fapi: Any, target: str
) -> None:
    status, headers, body = await call(proxy, "GET", target)
    assert status == 404
    assert json.loads(body)["errors"][0]["code"] == "resource_not_found"
    assert fapi.seen == []


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
@pytest_twisted.ensureDeferred
async def test_every_method_goes_with_its_body(
    proxy: Any, fapi: Any, method: str
) -> None:
    body = b"name=value&other=%20"
    status, _, response = await call(
        proxy,
        method,
        "/__clerk/v1/me",
        [("Content-Type", "application/x-www-form-urlencoded")],
        body,
    )
    assert status == 200
    seen = fapi.seen[-1]
    assert seen["method"] == method
    assert seen["body"] == body.decode()
    assert fapi.header("Content-Length") == [str(len(body))]


@pytest_twisted.ensureDeferred
async def test_head_keeps_fapis_content_length(proxy: Any, fapi: Any) -> None:
    data = await raw_request(
        proxy.port, request_bytes("HEAD", "/__clerk/v1/environment")
    )
    status, headers, body = parse_response(data)
    assert status == 200 and body == b""
    assert (
        b"content-length",
        str(int(dict(headers)[b"content-length"])).encode(),
    ) in headers


@pytest_twisted.ensureDeferred
async def test_headers_go_intact_and_ours_replace_the_clients(
    proxy: Any, fapi: Any
) -> None:
    status, _, _ = await call(
        proxy,
        "POST",
        "/__clerk/v1/client/sign_ins",
        [
            ("Origin", "https://app.test"),
            ("Cookie", "__client_uat=0; __session=eyJ.x.y"),
            ("X-Multi", "one"),
            ("User-Agent", "Mozilla/5.0 (test)"),
            ("X-Multi", "two"),
            ("Clerk-Secret-Key", "sk_live_attacker"),
            ("Clerk-Proxy-Url", "https://evil.test"),
            ("X-Forwarded-For", "6.6.6.6"),
            ("Connection", "close, X-Private"),
            ("X-Private", "hop"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic Zm9v"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Trailer", "X-T"),
        ],
        b"identifier=a%40b.test",
    )
    assert status == 200
    sent = fapi.seen[-1]["headers"]
    names = [n.lower() for n, _ in sent]
    host = fapi.url.split("//")[1]
    assert fapi.header("Host") == [host]
    assert fapi.header("Clerk-Secret-Key") == [SECRET]
    assert fapi.header("Clerk-Proxy-Url") == [PROXY_URL]
    assert fapi.header("X-Forwarded-For") == ["127.0.0.1"]
    assert fapi.header("X-Multi") == ["one", "two"]
    assert fapi.header("Origin") == ["https://app.test"]
    assert fapi.header("Cookie") == ["__client_uat=0; __session=eyJ.x.y"]
    assert fapi.header("User-Agent") == ["Mozilla/5.0 (test)"]
    for hop in (
        "x-private",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "upgrade",
        "trailer",
    ):
        assert hop not in names
    assert "authorization" not in names


@pytest_twisted.ensureDeferred
async def test_tls_to_fapi_sends_sni_for_the_configured_host(
    proxy: Any, fapi: Any
) -> None:
    status, _, _ = await call(
        proxy, "GET", "/__clerk/v1/environment", [("Host", "evil.test")]
    )
    assert status == 200
    assert fapi.server_names == [b"localhost"]


@pytest_twisted.ensureDeferred
async def test_trusted_load_balancer_passes_the_real_client(
    make_proxy: Any, fapi: Any
) -> None:
    proxy = make_proxy(trusted_proxies=["127.0.0.0/8"])
    await call(
        proxy,
        "GET",
        "/__clerk/v1/proxy-health",
        [("X-Forwarded-For", "6.6.6.6, 198.51.100.7, 127.0.0.9")],
    )
    assert fapi.header("X-Forwarded-For") == ["198.51.100.7"]


@pytest_twisted.ensureDeferred
async def test_untrusted_peers_cannot_choose_their_address(
    proxy: Any, fapi: Any
) -> None:
    await call(
        proxy, "GET", "/__clerk/v1/proxy-health", [("X-Forwarded-For", "198.51.100.7")]
    )
    assert fapi.header("X-Forwarded-For") == ["127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_each_set_cookie_comes_back_separately_and_unchanged(
    proxy: Any, fapi: Any
) -> None:
    status, headers, _ = await call(proxy, "POST", "/__clerk/cookies", body=b"x=1")
    cookies = [v for n, v in headers if n == b"set-cookie"]
    assert cookies == [
        b"__client=abc; Path=/__clerk; HttpOnly; Secure; SameSite=Lax",
        b"__client_uat=1700000000; Path=/; Domain=app.test; Secure",
        b"__session=x, y; Path=/",
    ]


@pytest_twisted.ensureDeferred
async def test_redirects_are_returned_not_followed(proxy: Any, fapi: Any) -> None:
    status, headers, _ = await call(proxy, "GET", "/__clerk/redirect")
    assert status == 302
    assert (
        dict(headers)[b"location"] == b"https://accounts.google.com/o/oauth2/auth?x=1"
    )
    assert len(fapi.seen) == 1


@pytest_twisted.ensureDeferred
async def test_compressed_bodies_pass_untouched(proxy: Any, fapi: Any) -> None:
    status, headers, body = await call(
        proxy, "GET", "/__clerk/gzip", [("Accept-Encoding", "gzip")]
    )
    assert dict(headers)[b"content-encoding"] == b"gzip"
    assert body == GZIPPED
    assert gzip.decompress(body).startswith(b'{"object"')
    assert fapi.header("Accept-Encoding") == ["gzip"]


@pytest_twisted.ensureDeferred
async def test_response_hop_by_hop_headers_are_dropped(proxy: Any, fapi: Any) -> None:
    status, headers, _ = await call(proxy, "GET", "/__clerk/hop")
    names = [n for n, _ in headers]
    assert b"x-end-to-end" in names
    assert b"x-secret-hop" not in names
    assert b"proxy-authenticate" not in names


@pytest.mark.parametrize("code", [201, 204, 304, 400, 401, 422, 429, 500])
@pytest_twisted.ensureDeferred
async def test_status_codes_pass_through(proxy: Any, fapi: Any, code: int) -> None:
    status, headers, body = await call(proxy, "GET", f"/__clerk/status/{code}")
    assert status == code
    if code in (204, 304):
        assert body == b""


@pytest_twisted.ensureDeferred
async def test_malformed_multipart_reaches_fapi_unparsed(proxy: Any, fapi: Any) -> None:
    body = b'--boundary\r\nContent-Disposition: form-data; name="file"\r\n\r\nbroken'
    status, _, _ = await call(
        proxy,
        "POST",
        "/__clerk/v1/me/profile_image",
        [("Content-Type", "multipart/form-data; boundary=boundary")],
        body,
    )
    assert status == 200
    assert fapi.seen[-1]["body"] == body.decode("latin-1")


@pytest.mark.parametrize(
    "framing",
    [
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Content-Length: 5\r\nContent-Length: 7",
        "Content-Length: +5",
        "Transfer-Encoding: identity",
        "Transfer-Encoding: gzip",
        "Content-Length : 5",
        "X-A: b\nContent-Length: 5",
    ],
)
@pytest_twisted.ensureDeferred
async def test_ambiguous_framing_gets_400_and_never_reaches_fapi(
    proxy: Any, fapi: Any, framing: str
) -> None:
    payload = f"POST /__clerk/v1/client HTTP/1.1\r\nHost: app.test\r\n{framing}\r\n\r\nhello".encode()
    data = await raw_request(proxy.port, payload)
    assert data.startswith(b"HTTP/1.1 400 ")
    assert fapi.seen == []


@pytest_twisted.ensureDeferred
async def test_pipelined_requests_are_answered_in_order(proxy: Any, fapi: Any) -> None:
    payload = (
        b"".join(
            f"GET /__clerk/v1/n{i} HTTP/1.1\r\nHost: app.test\r\n\r\n".encode()
            for i in range(5)
        )
        + b"POST /__clerk/v1/post HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\n\r\nhi"
        + (
            b"GET /__clerk/v1/last HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
        )
    )
    data = await raw_request(proxy.port, payload)
    order = [
        json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])["uri"]
        for part in data.split(b"HTTP/1.1 200 OK")[1:]
    ]
    assert order == [f"/v1/n{i}" for i in range(5)] + ["/v1/post", "/v1/last"]


@pytest_twisted.ensureDeferred
async def test_upstream_connections_are_reused_across_clients(
    proxy: Any, fapi: Any
) -> None:
    for i in range(30):
        method = "POST" if i % 3 == 0 else "GET"
        status, _, _ = await call(
            proxy,
            method,
            f"/__clerk/v1/client?i={i}",
            body=b"x=1" if method == "POST" else b"",
        )
        assert status == 200
    assert fapi.recorder.connections == 1
    assert proxy.resource.upstream.connectionsOpened == 1
    assert len({seen["peer"] for seen in fapi.seen}) == 1
