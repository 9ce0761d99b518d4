"""
The JSON access log: one object per line, with every session token,
ticket and nonce in the URL replaced by C{REDACTED}.

It never writes headers: not the secret key, not cookies, not
C{Authorization}.  Only the method, the redacted target and numbers leave
the process.
"""

from __future__ import annotations

import json
import re
import sys
import time
from typing import IO, Any
from urllib.parse import quote, unquote

__all__ = ["REDACTED", "AccessLog", "redact_target"]

REDACTED = "REDACTED"

#: Query parameters whose values are credentials of some kind.
SENSITIVE = frozenset(
    {
        "__session",
        "__clerk_db_jwt",
        "__clerk_handshake",
        "__clerk_ticket",
        "__clerk_testing_token",
        "__client",
        "rotating_token_nonce",
        "__clerk_handshake_nonce",
    }
)
#: Parameters whose values are URLs that may embed the above.
URL_VALUED = frozenset(
    {
        "__clerk_redirect_url",
        "redirect_url",
        "sign_in_force_redirect_url",
        "sign_up_force_redirect_url",
    }
)
_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]*")
_MAX_DEPTH = 3


def _redact_query(query: str, depth: int) -> str:
    parts = []
    for pair in query.split("&"):
        name, eq, value = pair.partition("=")
        key = unquote(name.replace("+", " "))
        if not eq:
            parts.append(_JWT.sub(REDACTED, pair))
        elif key in SENSITIVE:
            parts.append(f"{name}={REDACTED}")
        elif key in URL_VALUED and depth < _MAX_DEPTH:
            inner = unquote(value.replace("+", " "))
            parts.append(f"{name}={quote(_redact_url(inner, depth + 1), safe='')}")
        else:
            parts.append(f"{name}={_JWT.sub(REDACTED, value)}")
    return "&".join(parts)


def _redact_url(url: str, depth: int) -> str:
    base, question, query = url.partition("?")
    query, hashMark, fragment = query.partition("#")
    base = _JWT.sub(REDACTED, base)
    if question:
        base += "?" + _redact_query(query, depth)
    if hashMark:
        base += "#" + _JWT.sub(REDACTED, fragment)
    return base


def redact_target(target: bytes) -> str:
    """The request target with credentials replaced by C{REDACTED}."""
    return _redact_url(target.decode("latin-1"), 0)


class AccessLog:
    """Writes one JSON object per finished (or aborted) request."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    @classmethod
    def open(cls, where: str) -> AccessLog:
        """C{-} is standard output; anything else a file appended to."""
        if where == "-":
            return cls(sys.stdout)
        return cls(open(where, "a", buffering=1, encoding="utf-8"))

    def write(
        self,
        *,
        when: float,
        client: str,
        method: bytes,
        target: bytes,
        status: int,
        sent: int,
        totalSeconds: float,
        upstreamSeconds: float | None,
        reused: bool | None,
        protocol: str = "HTTP/1.1",
    ) -> None:
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
            + f".{int(when % 1 * 1000):03d}Z",
            "client": client,
            "method": method.decode("latin-1"),
            "path": redact_target(target),
            "status": status,
            "bytes": sent,
            "total_ms": round(totalSeconds * 1000, 3),
            "upstream_ms": None
            if upstreamSeconds is None
            else round(upstreamSeconds * 1000, 3),
            "upstream_reused": reused,
            "protocol": protocol,
        }
        self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._stream is not sys.stdout:
            self._stream.close()
