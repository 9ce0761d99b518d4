"""
Header rules: what FAPI gets from the client, and what the client gets back.

Header names arrive canonicalised by L{twisted.web.http_headers.Headers}
(C{Clerk-Secret-Key}), so every set here holds canonical names and the
per-request work is dictionary look-ups with no string munging.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder

__all__ = [
    "HOP_BY_HOP",
    "INJECTED",
    "connection_listed",
    "downstream_headers",
    "upstream_headers",
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

# Framing is the upstream client's business (it writes Content-Length or
# chunked itself), and Expect was already answered to the client.
_DROP_UPSTREAM = HOP_BY_HOP | INJECTED | {b"Content-Length", b"Expect"}
_DROP_DOWNSTREAM = HOP_BY_HOP


def connection_listed(values: Iterable[bytes]) -> frozenset[bytes]:
    """Canonical names of the headers listed in C{Connection} values."""
    names = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip()
            if token:
                try:
                    names.add(_nameEncoder.encode(token))
                except InvalidHeaderName:
                    pass
    return frozenset(names)


def _filtered(
    source: Headers, drop: frozenset[bytes], connection: Headers
) -> dict[bytes, list[bytes]]:
    listed = connection.getRawHeaders(b"Connection")
    if listed:
        drop = drop | connection_listed(listed)
    raw: dict[bytes, list[bytes]] = {}
    for name, values in source.getAllRawHeaders():
        if name not in drop:
            raw[name] = list(values)
    return raw


def upstream_headers(
    incoming: Headers,
    host: bytes,
    proxy_url: bytes,
    secret: bytes,
    forwarded_for: bytes,
) -> Headers:
    """
    The headers to send to FAPI: every end-to-end header the client sent,
    repeated ones in order, then C{Host} and the three Clerk headers, which
    no client value can override.
    """
    raw = {b"Host": [host]}
    raw.update(_filtered(incoming, _DROP_UPSTREAM, incoming))
    raw[b"Clerk-Proxy-Url"] = [proxy_url]
    raw[b"Clerk-Secret-Key"] = [secret]
    if forwarded_for:
        raw[b"X-Forwarded-For"] = [forwarded_for]
    headers = Headers()
    # The values were validated by the server's parser already; assigning the
    # dictionary skips Headers' per-value re-sanitising.
    headers._rawHeaders = raw
    return headers


def downstream_headers(response: Headers, connection: Headers) -> Headers:
    """
    FAPI's response headers minus hop-by-hop ones; every C{Set-Cookie}
    stays a separate, unchanged value.

    @param connection: The upstream response's connection-control headers
        (Twisted's client keeps C{Connection} apart from the rest).
    """
    headers = Headers()
    headers._rawHeaders = _filtered(response, _DROP_DOWNSTREAM, connection)
    return headers
