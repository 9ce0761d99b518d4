"""
The known HTTP/2 attacks, each reproduced against the proxy over loopback
TLS, each shut out and counted in /metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from h2client import (
    continuation_frame,
    headers_block,
    headers_frame,
    request_headers,
    within,
)
from helpers import H2Proxy, h2proxy, make_h2, sleep  # noqa: F401  (fixtures)
from hpack import Encoder
from hyperframe.frame import (
    DataFrame,
    ExtensionFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
)
from twisted.internet.task import Clock

from clerkproxy._deadlines import Deadlines
from clerkproxy._h2 import HTTP2Settings
from clerkproxy._metrics import MetricsCollector


def events(h2proxy: H2Proxy) -> dict[str, int]:
    families = {f.name: f for f in MetricsCollector(h2proxy.metrics).collect()}
    return {
        s.labels["kind"]: s.value for s in families["clerkproxy_http2_events"].samples
    }


async def refused(client: Any) -> None:
    await within(client.closed)
    assert client.goaway == ErrorCodes.ENHANCE_YOUR_CALM


@pytest_twisted.ensureDeferred
async def test_rapid_reset_gets_goaway_and_reaches_fapi_hardly_at_all(
    make_h2: Callable[..., H2Proxy], fapi: Any
) -> None:
    h2proxy = make_h2()
    client = await h2proxy.client()
    await client.get("/__clerk/v1/client")  # a settled connection
    before = len(fapi.seen)
    encoder = Encoder()
    frames = []
    for i in range(400):
        streamID = 3 + 2 * i
        block = headers_block(request_headers(b"/__clerk/v1/reset"), encoder)
        frames += [headers_frame(streamID, block), RstStreamFrame(streamID)]
    # The client's own HPACK state is not used from here on.
    client.writeFrames(*frames)
    await refused(client)
    counted = events(h2proxy)
    assert counted["rapid_reset"] == 1
    # Reset in the same read as their HEADERS: never forwarded.  Only a pair
    # split across two reads can slip through.
    assert counted["reset_before_forwarding"] >= 150
    forwarded = len(fapi.seen) - before
    assert forwarded <= 400 - counted["reset_before_forwarding"]
    assert forwarded < 20


@pytest_twisted.ensureDeferred
async def test_ordinary_cancellations_are_not_an_attack(
    h2proxy: H2Proxy, fapi: Any
) -> None:
    client = await h2proxy.client()
    for _ in range(20):
        response = client.send("GET", "/__clerk/v1/client")
        client.reset(response.streamID)  # type: ignore[attr-defined]
    assert (await client.get("/__clerk/v1/client")).status == 200
    assert "rapid_reset" not in events(h2proxy)


@pytest.mark.parametrize(
    ("sizes", "why"),
    [
        ([16384] * 8, "bytes"),  # 128 KiB of header block
        ([0] * 40, "frames"),  # many empty CONTINUATION frames
    ],
)
@pytest_twisted.ensureDeferred
async def test_continuation_flood_is_bounded_by_max_header_size(
    h2proxy: H2Proxy, fapi: Any, sizes: list[int], why: str
) -> None:
    client = await h2proxy.client()
    await client.get("/__clerk/v1/client")
    frames = [headers_frame(3, b"\x82", end_headers=False)]
    frames += [continuation_frame(3, b"\x00" * size) for size in sizes]
    client.writeFrames(*frames)
    await refused(client)
    assert events(h2proxy)["continuation_flood"] == 1
    assert len(fapi.seen) == 1


@pytest_twisted.ensureDeferred
async def test_hpack_bomb_is_refused(h2proxy: H2Proxy, fapi: Any) -> None:
    client = await h2proxy.client()
    await client.get("/__clerk/v1/client")
    # SETTINGS_MAX_HEADER_LIST_SIZE is advertised...
    limit = h2proxy.proxy.site.maxHeaderSize
    assert client.settings[SettingCodes.MAX_HEADER_LIST_SIZE] == limit
    # ... and enforced: 4 KiB on the wire that decodes to over 80 KiB.
    block = headers_block(
        request_headers() + [(b"x-bomb", b"a" * 4000)] * 20, Encoder()
    )
    assert len(block) < 8192
    client.writeFrames(headers_frame(3, block))
    await refused(client)
    assert events(h2proxy)["header_list_too_large"] == 1
    assert len(fapi.seen) == 1


def _flood(kind: str) -> list[Any]:
    if kind == "settings_flood":
        return [SettingsFrame(0) for _ in range(400)]
    if kind == "ping_flood":
        return [PingFrame(0, opaque_data=b"%08d" % i) for i in range(400)]
    if kind == "priority_flood":
        return [PriorityFrame(101 + 2 * i, depends_on=0) for i in range(400)]
    if kind == "unknown_frame_flood":
        return [ExtensionFrame(0x20, 0) for _ in range(400)]
    return [DataFrame(1) for _ in range(400)]  # empty DATA on an open stream


@pytest.mark.parametrize(
    "kind",
    [
        "settings_flood",
        "ping_flood",
        "priority_flood",
        "empty_data_flood",
        "unknown_frame_flood",
    ],
)
@pytest_twisted.ensureDeferred
async def test_control_frame_floods_get_goaway(
    h2proxy: H2Proxy, fapi: Any, kind: str
) -> None:
    client = await h2proxy.client()
    # Stream 1 stays open with its body pending: empty DATA goes there.
    client.send("POST", "/__clerk/stall", end=False)
    client.writeFrames(*_flood(kind))
    await refused(client)
    assert events(h2proxy)[kind] == 1


@pytest_twisted.ensureDeferred
async def test_a_few_pings_and_settings_are_fine(h2proxy: H2Proxy, fapi: Any) -> None:
    client = await h2proxy.client()
    for i in range(20):
        client.conn.ping(b"%08d" % i)
        client.conn.update_settings({SettingCodes.ENABLE_PUSH: 0})
    client.flush()
    assert (await client.get("/__clerk/v1/client")).status == 200
    assert client.pings == 20
    assert events(h2proxy) == {}


@pytest_twisted.ensureDeferred
async def test_max_concurrent_streams_is_advertised_and_enforced(
    make_h2: Callable[..., H2Proxy], fapi: Any
) -> None:
    h2proxy = make_h2(HTTP2Settings(maxConcurrentStreams=5))
    client = await h2proxy.client()
    await client.get("/__clerk/v1/client")
    assert client.settings[SettingCodes.MAX_CONCURRENT_STREAMS] == 5
    encoder = Encoder()
    client.writeFrames(
        *[
            headers_frame(
                3 + 2 * i, headers_block(request_headers(b"/__clerk/stall"), encoder)
            )
            for i in range(6)
        ]
    )
    await within(client.closed)
    assert client.goaway == ErrorCodes.PROTOCOL_ERROR
    assert events(h2proxy)["stream_limit"] == 1


@pytest_twisted.ensureDeferred
async def test_a_reader_that_never_opens_its_window_is_cut_by_the_send_deadline(
    h2proxy: H2Proxy, fapi: Any
) -> None:
    clock = Clock()
    site = h2proxy.proxy.site
    site.h2SendDeadlines = Deadlines(clock, site.http2.sendTimeout)
    client = await h2proxy.client(autoWindow=False)
    big = client.send("GET", f"/__clerk/big/{64 * 1024 * 1024}")
    # Wait until the stream has bytes its client does not take.
    while not len(site.h2SendDeadlines):
        await sleep(0.01)
    clock.advance(site.http2.sendTimeout - 1)
    assert big.reset is None
    clock.advance(2)
    await within(big.done)
    assert big.reset == ErrorCodes.CANCEL and not big.ended
    assert h2proxy.metrics.timeouts["send"] == 1
    # FAPI's side of that exchange is closed, not left paused.
    [state] = fapi.recorder.streams
    while state["left"] != -1:
        await sleep(0.01)
    # The connection itself is still usable.
    client.conn.increment_flow_control_window(1 << 20)
    client.flush()
    assert (await client.get("/__clerk/v1/client")).status == 200


@pytest_twisted.ensureDeferred
async def test_a_huge_hpack_table_allowance_is_not_taken(
    h2proxy: H2Proxy, fapi: Any
) -> None:
    """
    A client that allows a 2 GiB table for our response headers would have
    every new header value kept for the connection's life; the encoder
    stays at 4 KiB and tells the client so with a table size update.
    """
    client = await h2proxy.client()
    client.conn.update_settings({SettingCodes.HEADER_TABLE_SIZE: 2**31 - 1})
    client.flush()
    await sleep(0.1)  # the settings are acknowledged
    for _ in range(3):
        assert (await client.get("/__clerk/v1/client")).status == 200
    assert client.conn.decoder.header_table.maxsize <= 4096
