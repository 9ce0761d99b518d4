"""Header rules in both directions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.web.http_headers import Headers

from clerkproxy._headers import (
    HOP_BY_HOP,
    INJECTED,
    connection_listed,
    downstream_headers,
    injected_block,
    upstream_head,
)


def _up(incoming: Headers, framing: bytes = b"") -> Headers:
    """Build the upstream head, then read it back as Headers."""
    head = upstream_head(
        b"GET",
        b"/v1/x",
        incoming,
        b"fapi.example",
        injected_block(b"https://app.test/__clerk", b"sk_live_k"),
        b"1.2.3.4",
        framing,
    )
    assert head.startswith(b"GET /v1/x HTTP/1.1\r\n") and head.endswith(b"\r\n\r\n")
    out = Headers()
    for line in head[:-4].split(b"\r\n")[1:]:
        name, _, value = line.partition(b": ")
        out.addRawHeader(name, value)
    return out


def test_injected_headers_replace_client_values() -> None:
    incoming = Headers()
    for name, value in [
        (b"Host", b"evil.example"),
        (b"Clerk-Proxy-Url", b"https://evil.example"),
        (b"clerk-secret-key", b"sk_live_attacker"),
        (b"X-Forwarded-For", b"6.6.6.6"),
        (b"X-FORWARDED-FOR", b"7.7.7.7"),
    ]:
        incoming.addRawHeader(name, value)
    out = _up(incoming)
    assert out.getRawHeaders(b"Host") == [b"fapi.example"]
    assert out.getRawHeaders(b"Clerk-Proxy-Url") == [b"https://app.test/__clerk"]
    assert out.getRawHeaders(b"Clerk-Secret-Key") == [b"sk_live_k"]
    assert out.getRawHeaders(b"X-Forwarded-For") == [b"1.2.3.4"]
    assert list(dict(out.getAllRawHeaders()))[0] == b"Host"


def test_end_to_end_headers_keep_values_and_order() -> None:
    incoming = Headers()
    incoming.addRawHeader(b"Cookie", b"__client_uat=1")
    incoming.addRawHeader(b"X-Multi", b"first")
    incoming.addRawHeader(b"Origin", b"https://app.test")
    incoming.addRawHeader(b"X-Multi", b"second")
    incoming.addRawHeader(b"Authorization", b"Bearer abc")
    out = _up(incoming)
    assert out.getRawHeaders(b"X-Multi") == [b"first", b"second"]
    assert out.getRawHeaders(b"Cookie") == [b"__client_uat=1"]
    assert out.getRawHeaders(b"Origin") == [b"https://app.test"]
    assert out.getRawHeaders(b"Authorization") == [b"Bearer abc"]


def test_hop_by_hop_and_connection_listed_are_dropped_upstream() -> None:
    incoming = Headers()
    incoming.addRawHeader(b"Connection", b"keep-alive, X-Private, bad header")
    incoming.addRawHeader(b"X-Private", b"1")
    for name in HOP_BY_HOP - {b"Connection"}:
        incoming.addRawHeader(name, b"x")
    incoming.addRawHeader(b"Content-Length", b"5")
    incoming.addRawHeader(b"Expect", b"100-continue")
    incoming.addRawHeader(b"X-Kept", b"yes")
    out = dict(_up(incoming).getAllRawHeaders())
    assert set(out) == {b"Host", b"X-Kept"} | (INJECTED - {b"Host"})


def test_response_headers_drop_hop_by_hop_and_keep_cookies_apart() -> None:
    response = Headers()
    response.addRawHeader(b"Set-Cookie", b"__client=a; Path=/__clerk")
    response.addRawHeader(b"Proxy-Authorization", b"x")
    response.addRawHeader(b"Set-Cookie", b"__client_uat=1, 2; Path=/")
    response.addRawHeader(b"Proxy-Authenticate", b"Basic")
    response.addRawHeader(b"Trailer", b"X")
    response.addRawHeader(b"X-Hop", b"1")
    response.addRawHeader(b"Content-Encoding", b"gzip")
    connection = {b"Connection": [b"X-Hop"]}
    out = downstream_headers(dict(response.getAllRawHeaders()), connection)
    assert out.getRawHeaders(b"Set-Cookie") == [
        b"__client=a; Path=/__clerk",
        b"__client_uat=1, 2; Path=/",
    ]
    assert out.getRawHeaders(b"Content-Encoding") == [b"gzip"]
    for name in (b"Proxy-Authenticate", b"Proxy-Authorization", b"Trailer", b"X-Hop"):
        assert not out.hasHeader(name)


def test_framing_goes_last_and_only_once() -> None:
    incoming = Headers({b"Content-Length": [b"999"], b"X-A": [b"1"]})
    out = _up(incoming, b"Content-Length: 5\r\n")
    assert out.getRawHeaders(b"Content-Length") == [b"5"]
    assert list(dict(out.getAllRawHeaders()))[-1] == b"Content-Length"


def test_connection_listed_ignores_invalid_tokens() -> None:
    assert connection_listed([b"close, X-A ,,bad token", b"x-b"]) == {
        b"Close",
        b"X-A",
        b"X-B",
    }


token = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-",
    min_size=1,
    max_size=20,
)
value = st.binary(max_size=30).map(
    lambda b: b.replace(b"\r", b"").replace(b"\n", b"").replace(b"\x00", b"").strip()
)
special = st.sampled_from(
    sorted(n.decode() for n in HOP_BY_HOP | INJECTED | {b"Content-Length", b"Expect"})
)
name = st.one_of(token, special, special.map(str.lower), special.map(str.upper))


@given(pairs=st.lists(st.tuples(name, value), max_size=25))
def test_clients_never_set_what_the_proxy_owns(pairs: list[tuple[str, bytes]]) -> None:
    incoming = Headers()
    for n, v in pairs:
        incoming.addRawHeader(n.encode(), v)
    out = _up(incoming)
    raw = dict(out.getAllRawHeaders())
    assert raw[b"Clerk-Secret-Key"] == [b"sk_live_k"]
    assert raw[b"Host"] == [b"fapi.example"]
    assert raw[b"Clerk-Proxy-Url"] == [b"https://app.test/__clerk"]
    assert raw[b"X-Forwarded-For"] == [b"1.2.3.4"]
    listed = connection_listed(incoming.getRawHeaders(b"Connection", []))
    for header, values in incoming.getAllRawHeaders():
        if header in HOP_BY_HOP or header in listed:
            assert header not in raw
        elif header not in INJECTED and header not in (b"Content-Length", b"Expect"):
            assert raw[header] == list(values)
