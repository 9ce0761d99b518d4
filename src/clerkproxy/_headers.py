"""
Header rules: what FAPI gets from the client, and what the client gets back.

Header names arrive canonicalised by L{twisted.web.http_headers.Headers}
on the way in and by the upstream client on the way back
(C{Clerk-Secret-Key}), so every set here holds canonical names and the
per-request work is set look-ups and one C{bytes.join}.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.web.http_headers import Headers, InvalidHeaderName

from ._twisted_compat import encode_header_name, header_values, headers_from_raw

__all__ = [
    "APP_DROP",
    "FAPI_DROP",
    "HOP_BY_HOP",
    "INJECTED",
    "connection_listed",
    "downstream_headers",
    "injected_block",
    "upstream_head",
]

HOP_BY_HOP = frozenset(
    {
        b"Connection",
        b"Keep-Alive",
        b"Proxy-Connection",
        b"Proxy-Authorization",
        b"Proxy-Authenticate",
        b"TE",
        b"Trailer",
        b"Transfer-Encoding",
        b"Upgrade",
    }
)

#: Set by the proxy; whatever a client sends under these names is dropped.
INJECTED = frozenset(
    {b"Host", b"Clerk-Proxy-Url", b"Clerk-Secret-Key", b"X-Forwarded-For"}
)

# Framing is written by the proxy for the body it actually sends, and
# Expect was already answered to the client.
FAPI_DROP = HOP_BY_HOP | INJECTED | {b"Content-Length", b"Expect"}
#: The application gets no Clerk header at all, and the proxy's own
#: forwarding headers.
APP_DROP = FAPI_DROP | {b"X-Forwarded-Proto", b"X-Forwarded-Host"}


def connection_listed(values: Iterable[bytes]) -> frozenset[bytes]:
    """Canonical names of the headers listed in C{Connection} values."""
    names = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip()
            if token:
                try:
                    names.add(encode_header_name(token))
                except InvalidHeaderName:
                    pass
    return frozenset(names)


def injected_block(proxy_url: bytes, secret: bytes) -> bytes:
    """The constant part of every upstream head, built once per proxy."""
    return (
        b"Clerk-Proxy-Url: " + proxy_url + b"\r\nClerk-Secret-Key: " + secret + b"\r\n"
    )


def upstream_head(
    method: bytes,
    target: bytes,
    incoming: Headers,
    host: bytes,
    injected: bytes,
    forwarded_for: bytes,
    framing: bytes,
    drop: frozenset[bytes] = FAPI_DROP,
) -> bytes:
    """
    The request head for FAPI, ready for the wire: C{Host}, then every
    end-to-end header the client sent (repeated ones in order), then the
    Clerk headers and C{X-Forwarded-For}, which no client value can
    override, then the framing of the body the proxy will send.  Header
    names with an underscore are never forwarded.

    The client's values were validated by Twisted's server parser (no CR,
    LF or NUL), so they are copied as they are.
    """
    listed = header_values(incoming, b"Connection")
    if listed:
        drop = drop | connection_listed(listed)
    parts = [method, b" ", target, b" HTTP/1.1\r\nHost: ", host, b"\r\n"]
    append = parts.append
    for name, values in incoming.getAllRawHeaders():
        # A name with "_" is dropped, as nginx does: a framework that maps
        # headers to CGI-style names reads Clerk_Secret_Key and
        # Clerk-Secret-Key as the same one.
        if name not in drop and b"_" not in name:
            for value in values:
                append(name)
                append(b": ")
                append(value)
                append(b"\r\n")
    append(injected)
    if forwarded_for:
        append(b"X-Forwarded-For: ")
        append(forwarded_for)
        append(b"\r\n")
    append(framing)
    append(b"\r\n")
    return b"".join(parts)


def downstream_headers(
    headers: dict[bytes, list[bytes]], connection: dict[bytes, list[bytes]]
) -> Headers:
    """
    FAPI's response headers for the client.  The upstream client already
    set connection-control headers apart; this drops the remaining
    hop-by-hop ones and any header FAPI's C{Connection} names.  Every
    C{Set-Cookie} stays a separate, unchanged value.
    """
    listed = connection.get(b"Connection")
    drop = HOP_BY_HOP | connection_listed(listed) if listed else HOP_BY_HOP
    for name in [n for n in headers if n in drop]:
        del headers[name]
    # Names and values were validated by the upstream client's parser.
    return headers_from_raw(headers)
