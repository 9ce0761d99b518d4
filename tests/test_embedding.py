"""Mounting the proxy inside an existing Twisted web service."""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted
from conftest import parse_response, raw_request
from twisted.web.resource import Resource
from twisted.web.server import Site

from clerkproxy import build_site


class Home(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"home:" + request.content.read()


def app_root(proxy: Any) -> Resource:
    root = Resource()
    root.putChild(b"", Home())
    root.putChild(b"__clerk", proxy)
    return root


def plain_site(proxy: Any, clock: Any) -> Site:
    return Site(app_root(proxy), parsePOSTFormSubmission=False)


def streaming_site(proxy: Any, clock: Any) -> Site:
    return build_site(app_root(proxy), clock)


@pytest_twisted.ensureDeferred
async def test_put_child_under_a_plain_site(make_proxy: Any, fapi: Any) -> None:
    proxy = make_proxy(site_factory=plain_site)
    body = b"x" * 150000  # big enough for Twisted to buffer it in a temp file
    data = await raw_request(
        proxy.port,
        b"POST /__clerk/v1/me?a=b HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body),
    )
    status, _, response = parse_response(data)
    assert status == 200
    assert json.loads(response)["body_length"] == len(body)
    assert fapi.seen[-1]["uri"] == "/v1/me?a=b"
    home = await raw_request(
        proxy.port, b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n"
    )
    assert parse_response(home)[2] == b"home:"


@pytest_twisted.ensureDeferred
async def test_put_child_under_the_streaming_site(make_proxy: Any, fapi: Any) -> None:
    proxy = make_proxy(site_factory=streaming_site)
    data = await raw_request(
        proxy.port,
        b"POST /__clerk/v1/client HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    assert parse_response(data)[0] == 200
    assert fapi.seen[-1]["body"] == "abc"
    home = await raw_request(
        proxy.port,
        b"POST / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
    )
    assert parse_response(home)[2] == b"home:hi"  # the app still gets its body


@pytest_twisted.ensureDeferred
async def test_oversize_buffered_body_is_refused(make_proxy: Any, fapi: Any) -> None:
    proxy = make_proxy(site_factory=plain_site, max_body_size=10)
    data = await raw_request(
        proxy.port,
        b"POST /__clerk/v1/me HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Length: 11\r\n\r\n"
        + b"x" * 11,
    )
    assert parse_response(data)[0] == 413
    assert fapi.seen == []
