"""Choosing the one X-Forwarded-For address."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from clerkproxy._forwarded import ClientAddress

LB = [ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8")]


def test_without_trusted_proxies_the_peer_wins() -> None:
    resolve = ClientAddress([]).resolve
    assert resolve("203.0.113.9", [b"1.1.1.1"]) == b"203.0.113.9"
    assert resolve("2001:db8::1", None) == b"2001:db8::1"


def test_untrusted_peer_cannot_spoof() -> None:
    assert ClientAddress(LB).resolve("203.0.113.9", [b"1.1.1.1"]) == b"203.0.113.9"


def test_trusted_peer_walks_from_the_right() -> None:
    resolve = ClientAddress(LB).resolve
    # The client forged "6.6.6.6"; our LB appended the real address.
    assert resolve("10.0.0.2", [b"6.6.6.6, 198.51.100.7"]) == b"198.51.100.7"
    assert resolve("10.0.0.2", [b"6.6.6.6", b"198.51.100.7, 10.1.1.1"]) == (
        b"198.51.100.7"
    )
    assert resolve("10.0.0.2", [b"[2001:db8::5]:443, 10.0.0.3"]) == b"2001:db8::5"
    assert resolve("10.0.0.2", [b"198.51.100.7:5555"]) == b"198.51.100.7"


def test_trusted_peer_without_header_is_itself() -> None:
    assert ClientAddress(LB).resolve("10.0.0.2", None) == b"10.0.0.2"


def test_garbage_stops_the_walk_at_the_last_good_hop() -> None:
    resolve = ClientAddress(LB).resolve
    assert resolve("10.0.0.2", [b"198.51.100.7, unknown, 10.0.0.9"]) == b"10.0.0.9"
    assert resolve("10.0.0.2", [b"nonsense"]) == b"10.0.0.2"


def test_all_trusted_gives_the_leftmost() -> None:
    assert ClientAddress(LB).resolve("10.0.0.2", [b"10.9.9.9, 10.0.0.3"]) == (
        b"10.9.9.9"
    )


def test_unix_socket_peer_counts_as_trusted() -> None:
    assert ClientAddress([]).resolve(None, [b"6.6.6.6, 198.51.100.7"]) == (
        b"198.51.100.7"
    )
    assert ClientAddress([]).resolve(None, None) == b""


def test_ipv4_mapped_ipv6_peer_matches_ipv4_ranges() -> None:
    assert ClientAddress(LB).resolve("::ffff:10.0.0.2", [b"198.51.100.7"]) == (
        b"198.51.100.7"
    )


public = st.ip_addresses(v=4).filter(lambda a: a not in LB[0])


@given(
    real=public,
    forged=st.lists(st.ip_addresses(), max_size=4),
    hops=st.lists(st.ip_addresses(v=4, network="10.0.0.0/8"), max_size=3),
)
def test_the_address_our_proxies_saw_always_wins(real, forged, hops) -> None:  # type: ignore[no-untyped-def]
    chain = [str(a) for a in forged] + [str(real)] + [str(h) for h in hops]
    header = ", ".join(chain).encode()
    assert ClientAddress(LB).resolve("10.0.0.1", [header]) == str(real).encode()
