"""FAPI's own redirects go back through the proxy; every other stays as sent."""

from __future__ import annotations

import pytest

from clerkproxy import ProxyConfig
from clerkproxy._location import LocationRewrite


def rewrite(
    fapi: str, proxy: str = "https://app.example.com/__clerk"
) -> LocationRewrite:
    return LocationRewrite.fromConfig(
        ProxyConfig(proxy_url=proxy, secret_key="sk_live_x", fapi_url=fapi)
    )


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (
            b"https://frontend-api.clerk.dev/v1/oauth_callback?code=1#x",
            b"https://app.example.com/__clerk/v1/oauth_callback?code=1#x",
        ),
        (b"https://frontend-api.clerk.dev", b"https://app.example.com/__clerk"),
        (b"https://frontend-api.clerk.dev/", b"https://app.example.com/__clerk/"),
        (b"https://frontend-api.clerk.dev?x", b"https://app.example.com/__clerk?x"),
        (b"HTTPS://Frontend-API.Clerk.dev/v1", b"https://app.example.com/__clerk/v1"),
        (
            b"https://frontend-api.clerk.dev:443/v1",
            b"https://app.example.com/__clerk/v1",
        ),
        (b"//frontend-api.clerk.dev/v1", b"https://app.example.com/__clerk/v1"),
    ],
)
def test_fapi_origin_goes_onto_the_proxy_url(location: bytes, expected: bytes) -> None:
    assert rewrite("https://frontend-api.clerk.dev")(location) == expected


@pytest.mark.parametrize(
    "location",
    [
        b"https://accounts.example.com/sign-in?redirect_url=https://frontend-api.clerk.dev/x",
        b"https://app.example.com/dashboard",
        b"http://frontend-api.clerk.dev/v1",  # another scheme
        b"https://frontend-api.clerk.dev:8443/v1",  # another port
        b"https://frontend-api.clerk.dev.evil.test/v1",
        b"https://user@frontend-api.clerk.dev/v1",
        b"/v1/client",  # relative: the browser resolves it against the proxy
        b"v1/client",
        b"",
        b"https://frontend-api.clerk.dev:99999/v1",  # unparsable port
        b"https://[::1/x",
    ],
)
def test_every_other_location_is_unchanged(location: bytes) -> None:
    assert rewrite("https://frontend-api.clerk.dev")(location) == location


def test_a_fapi_base_path_and_port_must_match_too() -> None:
    r = rewrite("https://fapi.test:8443/base/", "https://clerk.example.com")
    assert r(b"https://fapi.test:8443/base/v1/x") == b"https://clerk.example.com/v1/x"
    assert r(b"https://fapi.test:8443/base") == b"https://clerk.example.com"
    assert (
        r(b"https://fapi.test:8443/basement/v1")
        == b"https://fapi.test:8443/basement/v1"
    )
    assert r(b"https://fapi.test:8443/other") == b"https://fapi.test:8443/other"
    assert r(b"https://fapi.test/base/v1") == b"https://fapi.test/base/v1"
