"""
The JSON access log: one object per line, with every session token,
ticket, nonce and JWT in the URL replaced by C{REDACTED}, however the
client spelled or encoded it.

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
from urllib.parse import quote, unquote_plus

__all__ = ["REDACTED", "AccessLog", "redact_target"]

REDACTED = "REDACTED"

#: Names whose values are credentials of some kind, matched without regard
#: to case wherever they appear in the target (path, query, fragment, or a
#: URL nested in a parameter).
SENSITIVE = frozenset(
    {
        "__session",
        "__clerk_db_jwt",
        "__clerk_handshake",
        "__clerk_handshake_nonce",
        "__clerk_ticket",
        "__clerk_testing_token",
        "__client",
        "rotating_token_nonce",
    }
)
#: Names Clerk also uses with a suffix of its own (C{__session_Ab12Cd}).
_SUFFIXED = frozenset({"__session", "__clerk_db_jwt"})
_NAMES = "|".join(
    re.escape(name) + ("(?:_[A-Za-z0-9]+)?" if name in _SUFFIXED else "")
    for name in sorted(SENSITIVE, key=len, reverse=True)
)
# A name, an "=" (spaces allowed around it), and everything up to the next
# separator of any kind: "&", ";", "#", white space.
_CREDENTIAL = re.compile(rf"({_NAMES})(\s*=\s*)[^&;#\s]*", re.IGNORECASE)
# Anything that starts like a JWT (base64url of '{"'), with its dot-joined
# segments, whatever it is called.
_JWT = re.compile(r"eyJ[A-Za-z0-9_\-]*(?:\.[A-Za-z0-9_\-]*)*")
#: How many rounds of percent-decoding a target gets before it is judged
#: too deep to read and logged as C{REDACTED} whole.
_MAX_ROUNDS = 8
# What is written as it is; every other character is percent-encoded, so
# the line holds no control characters or raw non-ASCII bytes.
_PRINTABLE = frozenset(chr(c) for c in range(0x21, 0x7F))


def _named(text: str) -> str:
    return _CREDENTIAL.sub(rf"\g<1>\g<2>{REDACTED}", text)


def redact_target(target: bytes) -> str:
    """
    The request target with credentials replaced by C{REDACTED}.

    Named values are replaced, then the target is percent- and
    plus-decoded, and the two are repeated until decoding changes nothing;
    JWT-shaped values are replaced last, in the fully decoded text: so
    C{__session%3D...}, C{%5F%5Fsession=}, a double-encoded
    C{redirect_url} and a JWT whose dots are C{%2E} all look like what they
    are, and a value is replaced whole while the separators inside it
    (C{+}, C{%2B}, C{%26}, C{%23}) are still encoded rather than cutting
    it short.  What is logged is the decoded, redacted form, with anything
    but printable ASCII percent-encoded again: decoding the logged text
    cannot bring a credential back.  A target still changing after
    C{_MAX_ROUNDS} decodings is logged as C{REDACTED} whole.
    """
    text = target.decode("latin-1")
    for _ in range(_MAX_ROUNDS):
        text = _named(text)
        if "%" not in text and "+" not in text:
            break
        decoded = unquote_plus(text, encoding="latin-1")
        if decoded == text:
            break
        text = decoded
    else:
        return REDACTED
    # JWT-shaped values are matched once fully decoded, when an encoded
    # dot can no longer cut one short.
    text = _JWT.sub(REDACTED, text)
    if all(c in _PRINTABLE for c in text):
        return text
    return "".join(
        c if c in _PRINTABLE else quote(c, safe="", encoding="latin-1") for c in text
    )


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
        site: str | None = None,
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
        if site is not None:
            record["site"] = site
        self._stream.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._stream is not sys.stdout:
            self._stream.close()
