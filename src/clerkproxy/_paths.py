"""
Which request targets belong to the proxy, and where they go upstream.

Pure byte functions, no decoding: FAPI sees the path and query exactly as
the browser sent them.
"""

from __future__ import annotations

__all__ = ["upstream_target"]


def upstream_target(prefix: bytes, base: bytes, target: bytes) -> bytes | None:
    """
    Map a client's request target onto FAPI, or return L{None} if it is not
    under C{prefix}.

    @param prefix: The served prefix without a trailing slash (C{b"/__clerk"};
        empty when the proxy owns the whole host).
    @param base: FAPI's own base path without a trailing slash (usually
        empty).
    @param target: The raw request target from the request line.

    The prefix matches on a segment boundary only: C{/__clerk} and
    C{/__clerk/...} are ours, C{/__clerkx} is not.  Leading slashes left
    after stripping collapse to one, so C{/__clerk//npm/x} (what clerk-js
    builds from a proxy URL ending in C{/}) becomes C{/npm/x}; everything
    after that is passed on byte for byte.
    """
    if target[:1] != b"/":
        # Absolute-form, authority-form and asterisk-form targets never
        # address the proxy: the upstream host comes from configuration.
        return None
    query = target.find(b"?")
    path = target if query < 0 else target[:query]
    if not path.startswith(prefix):
        return None
    rest = path[len(prefix) :]
    if rest[:1] != b"/":
        if rest:
            return None  # /__clerkx
        rest = b"/"
    elif rest[:2] == b"//":
        rest = b"/" + rest.lstrip(b"/")
    if query >= 0:
        rest += target[query:]
    return base + rest if base else rest
