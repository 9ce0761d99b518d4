"""Access-log redaction: no credential survives, however it is spelled."""

from __future__ import annotations

from urllib.parse import quote, unquote, unquote_plus

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clerkproxy._accesslog import REDACTED, SENSITIVE, redact_target

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyXzEifQ.c2lnbmF0dXJl"
TOKEN = "tok1234secret"


def decodings(text: str) -> set[str]:
    """Every way a reader might decode the logged text, to a fixed point."""
    seen = {text}
    frontier = [text]
    for _ in range(10):
        frontier = [
            d for t in frontier for d in (unquote(t), unquote_plus(t)) if d not in seen
        ]
        seen.update(frontier)
    return seen


def leaks(logged: str, secret: str) -> bool:
    return any(secret in d for d in decodings(logged))


@pytest.mark.parametrize(
    ("target", "secret"),
    [
        (f"/v1/client?__SESSION={TOKEN}", TOKEN),
        (f"/v1/client?x=1&__Session={TOKEN}", TOKEN),
        (f"/v1/client?__session%3D{TOKEN}", TOKEN),
        (f"/v1/client?__session%3d{TOKEN}", TOKEN),
        (f"/v1/client?%5F%5Fsession={TOKEN}", TOKEN),
        (f"/v1/client?a=1;__session={TOKEN}", TOKEN),
        (f"/v1/client?+__session={TOKEN}", TOKEN),
        (f"/v1/client?__session+=+{TOKEN}", TOKEN),
        (f"/v1/client#__session={TOKEN}", TOKEN),
        (f"/v1/client?a={JWT.replace('.', '%2E')}", JWT.split(".")[2]),
        (f"/v1/client?a={JWT.replace('.', '%252E')}", JWT.split(".")[2]),
        (f"/v1/client/{JWT}", JWT.split(".")[1]),
        (
            "/v1/client?redirect_url="
            + quote(
                quote(f"https://app.test/after?__session={TOKEN}&ok=1", safe=""),
                safe="",
            ),
            TOKEN,
        ),
        (
            "/v1/client?redirect_url="
            + quote(f"https://app.test/after?__clerk_handshake={JWT}", safe=""),
            JWT.split(".")[1],
        ),
        (f"/v1/client?__clerk_db_jwt={TOKEN}", TOKEN),
        (f"/v1/client?rotating_token_nonce={TOKEN}", TOKEN),
        (f"/v1/client?__client={TOKEN}", TOKEN),
        # Separators inside a value, encoded: the whole value goes.
        ("/v1/client?__clerk_testing_token=abc+def/ghi==", "def/ghi"),
        ("/v1/client?rotating_token_nonce=AbC%2BdEf%2Fgh%3D%3D", "dEf"),
        ("/v1/client?__clerk_handshake_nonce=abc%26defsecret", "defsecret"),
        ("/v1/client?__clerk_db_jwt=dvb_abc%23fragsecret", "fragsecret"),
        # Clerk's suffixed cookie names.
        (f"/v1/client?__session_Ab12Cd={TOKEN}", TOKEN),
        (f"/v1/client?__clerk_db_jwt_Ab12Cd={TOKEN}", TOKEN),
    ],
)
def test_every_spelling_is_redacted(target: str, secret: str) -> None:
    logged = redact_target(target.encode())
    assert not leaks(logged, secret), logged
    assert REDACTED in logged


def test_harmless_parts_stay_readable() -> None:
    target = b"/v1/client?_clerk_js_version=5.56.0&__client_uat=1700000000&q=a%20b"
    assert redact_target(target) == (
        "/v1/client?_clerk_js_version=5.56.0&__client_uat=1700000000&q=a%20b"
    )


def test_control_characters_never_reach_the_line_raw() -> None:
    logged = redact_target(b"/x?q=%0d%0a%00%ff%7f")
    assert all(0x21 <= ord(c) < 0x7F for c in logged)


def test_endless_encoding_is_redacted_whole() -> None:
    target = "/x?a=" + JWT.replace(".", "%" + "25" * 12 + "2E")
    assert redact_target(target.encode()) == REDACTED


def _case(name: str, flips: list[bool]) -> str:
    return "".join(c.upper() if f else c for c, f in zip(name, flips, strict=False))


def _encode(text: str, how: int) -> str:
    """Percent-encode C{text} C{how} times (0: as it is)."""
    for _ in range(how):
        text = quote(text, safe="")
    return text


secrets = st.text(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-",
    min_size=12,
    max_size=40,
)


@given(
    name=st.sampled_from(sorted(SENSITIVE)),
    flips=st.lists(st.booleans(), min_size=30, max_size=30),
    secret=secrets,
    jwt=st.booleans(),
    before=st.sampled_from(["?", "&", ";", "+", "#", "?a=1&", "?a=1;", "/", "?x="]),
    encoding=st.integers(0, 3),
    equals=st.sampled_from(["=", "%3D", "%3d", "+=+", "%253D"]),
    nested=st.booleans(),
)
def test_a_credential_never_reaches_the_log(
    name: str,
    flips: list[bool],
    secret: str,
    jwt: bool,
    before: str,
    encoding: int,
    equals: str,
    nested: bool,
) -> None:
    value = f"eyJ{secret}.{secret}.{secret}" if jwt else secret
    pair = _case(name, flips) + equals + value
    if nested:
        # Inside a redirect URL, encoded once more per level.
        pair = "redirect_url=" + _encode(f"https://app.test/after?{pair}&ok=1", 1)
    target = "/v1/client" + before + _encode(pair, encoding) + "&after=1"
    logged = redact_target(target.encode())
    assert not leaks(logged, secret), (target, logged)


@given(
    secret=secrets,
    name=st.text("abcdefghij_", min_size=1, max_size=8),
    encoding=st.integers(0, 3),
)
def test_a_jwt_is_redacted_whatever_its_name(
    secret: str, name: str, encoding: int
) -> None:
    jwt = f"eyJ{secret}.{secret}.{secret}"
    target = f"/v1/client?{name}=" + _encode(jwt, encoding).replace(".", "%2E")
    assert not leaks(redact_target(target.encode()), secret)
