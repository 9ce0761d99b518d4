"""Prefix matching and target mapping: pure bytes, no normalising."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clerkproxy._paths import upstream_target

PREFIX = b"/__clerk"


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/__clerk", b"/"),
        (b"/__clerk/", b"/"),
        (b"/__clerk?x=1", b"/?x=1"),
        (b"/__clerk/v1/client?x", b"/v1/client?x"),
        (
            b"/__clerk//npm/@clerk/clerk-js@5/dist/clerk.browser.js",
            b"/npm/@clerk/clerk-js@5/dist/clerk.browser.js",
        ),
        (b"/__clerk///v1/client/sync", b"/v1/client/sync"),
        (b"/__clerk//evil.example/x", b"/evil.example/x"),
        (
            b"/__clerk/v1/a%2Fb/%2e%2e/c?q=%20+&r=a//b",
            b"/v1/a%2Fb/%2e%2e/c?q=%20+&r=a//b",
        ),
        (b"/__clerk/v1/../x", b"/v1/../x"),
        (b"/__clerk/v1/client?", b"/v1/client?"),
        (b"/__clerk?redirect=/__clerk//x", b"/?redirect=/__clerk//x"),
    ],
)
def test_maps_targets_under_the_prefix(target: bytes, expected: bytes) -> None:
    assert upstream_target(PREFIX, b"", target) == expected


@pytest.mark.parametrize(
    "target",
    [
        b"/__clerkx",
        b"/__clerkx/v1/client",
        b"/__cler",
        b"/",
        b"/app/__clerk/v1",
        b"/%5F%5Fclerk/v1/client",
        b"http://frontend-api.clerk.dev/__clerk/v1",
        b"*",
        b"",
    ],
)
def test_rejects_targets_outside_the_prefix(target: bytes) -> None:
    assert upstream_target(PREFIX, b"", target) is None


def test_empty_prefix_owns_every_origin_form_target() -> None:
    assert upstream_target(b"", b"", b"/v1/client?x=1") == b"/v1/client?x=1"
    assert upstream_target(b"", b"", b"/") == b"/"
    assert upstream_target(b"", b"", b"*") is None


def test_fapi_base_path_is_prepended() -> None:
    assert upstream_target(PREFIX, b"/base", b"/__clerk/v1?x") == b"/base/v1?x"


segment = st.binary(min_size=1, max_size=12).filter(
    lambda b: b"/" not in b and b"?" not in b
)
rest_bytes = st.binary(max_size=64)


@given(prefix_segments=st.lists(segment, min_size=1, max_size=3), rest=rest_bytes)
def test_bytes_after_the_prefix_pass_unchanged(
    prefix_segments: list[bytes], rest: bytes
) -> None:
    prefix = b"/" + b"/".join(prefix_segments)
    target = prefix + b"/x" + rest
    mapped = upstream_target(prefix, b"", target)
    assert mapped == b"/x" + rest


@given(prefix_segments=st.lists(segment, min_size=1, max_size=3), tail=segment)
def test_a_longer_first_segment_never_matches(
    prefix_segments: list[bytes], tail: bytes
) -> None:
    prefix = b"/" + b"/".join(prefix_segments)
    assert upstream_target(prefix, b"", prefix + tail) is None


@given(target=st.binary(max_size=80))
def test_result_is_always_origin_form(target: bytes) -> None:
    mapped = upstream_target(PREFIX, b"", target)
    if mapped is not None:
        assert mapped.startswith(b"/")
        assert not mapped.startswith(b"//")
        assert target.startswith(PREFIX)
