"""The upstream HTTP/1.1 client connection, byte by byte, in memory."""

from __future__ import annotations

import pytest
from helpers import HEAD, Recorder
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from clerkproxy._client import UpstreamConnection, UpstreamProtocolError


class Owner:
    """What a connection reports to whoever owns it (a pool, in production)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def idle(self, connection: UpstreamConnection) -> None:
        self.calls.append("idle")

    def lost(self, connection: UpstreamConnection) -> None:
        self.calls.append("lost")

    def relaying(self, connection: UpstreamConnection) -> None:
        self.calls.append("relaying")

    @property
    def idleConnections(self) -> int:
        """1 if the last thing reported was "idle" (the old pool count)."""
        return int(self.calls[-1:] == ["idle"])

    @property
    def openConnections(self) -> int:
        return int("lost" not in self.calls)


def aborted(transport: StringTransport) -> bool:
    """Whether abortConnection (not loseConnection) was called: in
    StringTransport, only abortConnection sets C{disconnected}."""
    return transport.disconnected is True


def connection() -> tuple[UpstreamConnection, StringTransport, Owner]:
    owner = Owner()
    conn = UpstreamConnection(
        onIdle=owner.idle, onLost=owner.lost, onRelaying=owner.relaying
    )
    transport = StringTransport()
    conn.makeConnection(transport)
    return conn, transport, owner


def exchange(
    response: bytes, head: bytes = HEAD, isHead: bool = False, pieces: int = 1
) -> tuple[Recorder, UpstreamConnection, StringTransport, Owner]:
    conn, transport, owner = connection()
    recorder = Recorder()
    conn.send(recorder, head, isHead, None)
    step = max(1, -(-len(response) // pieces))
    for i in range(0, len(response), step):
        conn.dataReceived(response[i : i + step])
    return recorder, conn, transport, owner


def body_of(recorder: Recorder) -> bytes:
    return b"".join(e[1] for e in recorder.events if e[0] == "data")


def test_content_length_response_then_idle_in_the_pool() -> None:
    recorder, conn, transport, owner = exchange(
        b"HTTP/1.1 201 Created\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"content-length: 5\r\nX-Y: z\r\n\r\nhello"
    )
    start = recorder.events[0]
    assert start[:3] == ("start", 201, b"Created")
    assert start[3] == {b"Set-Cookie": [b"a=1", b"b=2"], b"X-Y": [b"z"]}
    assert start[4] == 5 and start[5] == {b"Content-Length": [b"5"]}
    assert body_of(recorder) == b"hello" and recorder.events[-1] == ("done",)
    assert transport.value() == HEAD
    assert owner.idleConnections == 1 and not transport.disconnecting


@pytest.mark.parametrize("pieces", [1, 2, 7, 1000])
def test_chunked_response_in_any_pieces(pieces: int) -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    recorder, conn, transport, owner = exchange(response, pieces=pieces)
    assert body_of(recorder) == b"hello world"
    assert recorder.events[0][4] is None
    assert recorder.events[-1] == ("done",) and owner.idleConnections == 1


@given(
    body=st.binary(max_size=3000),
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=8),
    split=st.integers(1, 50),
)
def test_chunked_decoding_round_trips(
    body: bytes, sizes: list[int], split: int
) -> None:
    chunks, rest, i = [], body, 0
    while rest:
        n = sizes[i % len(sizes)]
        chunks.append(b"%x\r\n%s\r\n" % (len(rest[:n]), rest[:n]))
        rest, i = rest[n:], i + 1
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(chunks)
        + b"0\r\n\r\n"
    )
    recorder, *_ = exchange(response, pieces=split)
    assert body_of(recorder) == body and recorder.events[-1] == ("done",)


def test_interim_responses_are_skipped() -> None:
    recorder, *_ = exchange(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    assert recorder.events[0][1] == 200 and body_of(recorder) == b"ok"


def test_head_response_keeps_its_content_length_and_has_no_body() -> None:
    recorder, conn, transport, owner = exchange(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
        head=b"HEAD / HTTP/1.1\r\nHost: f\r\n\r\n",
        isHead=True,
    )
    assert recorder.events[0][3][b"Content-Length"] == [b"1234"]
    assert recorder.events[-1] == ("done",) and owner.idleConnections == 1


@pytest.mark.parametrize("code", [204, 304])
def test_no_body_statuses(code: int) -> None:
    recorder, _, _, owner = exchange(
        b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % code
    )
    assert recorder.events[-1] == ("done",) and body_of(recorder) == b""
    assert owner.idleConnections == 1


def test_close_delimited_body_ends_at_close_and_is_not_pooled() -> None:
    recorder, conn, transport, owner = exchange(b"HTTP/1.1 200 OK\r\n\r\nsome bytes")
    assert recorder.events[0][4] is None
    conn.connectionLost(Failure(ConnectionDone()))
    assert body_of(recorder) == b"some bytes" and recorder.events[-1] == ("done",)
    assert owner.idleConnections == 0


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA",
    ],
)
def test_responses_that_end_the_connection(response: bytes) -> None:
    recorder, conn, transport, owner = exchange(response)
    assert owner.idleConnections == 0
    assert transport.disconnecting
    # FAPI said it closes: a polite close; out of step: an abort.
    assert aborted(transport) is response.endswith(b"EXTRA")


def test_http_1_0_keep_alive_is_honoured() -> None:
    _, _, transport, owner = exchange(
        b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
    )
    assert owner.idleConnections == 1 and not transport.disconnecting


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header: x\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\nInjected: b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabX\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nsome bytes",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ],
)
def test_malformed_responses_fail_the_exchange(response: bytes) -> None:
    recorder, conn, transport, owner = exchange(response)
    failed = [e for e in recorder.events if e[0] == "failed"]
    assert failed and failed[0][1].check(UpstreamProtocolError)
    assert transport.disconnecting and owner.idleConnections == 0
    assert ("done",) not in recorder.events


def test_an_oversized_head_fails() -> None:
    recorder, _, transport, _ = exchange(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000)
    assert recorder.events[0][0] == "failed" and transport.disconnecting


def test_loss_before_anything_arrived_says_so() -> None:
    conn, transport, owner = connection()
    recorder = Recorder()
    conn.send(recorder, HEAD, False, None)
    conn.connectionLost(Failure(ConnectionLost()))
    assert recorder.events == [("failed", recorder.events[0][1], True)]
    assert owner.openConnections == 0


def test_loss_mid_body_is_a_failure_not_an_ending() -> None:
    recorder, conn, *_ = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    conn.connectionLost(Failure(ConnectionLost()))
    assert recorder.events[-1][0] == "failed" and recorder.events[-1][2] is False


def test_bytes_on_an_idle_connection_close_it() -> None:
    _, conn, transport, owner = exchange(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    )
    conn.dataReceived(b"HTTP/1.1 200 OK\r\n")
    assert transport.disconnecting


def test_request_bodies_are_framed() -> None:
    conn, transport, _ = connection()
    recorder = Recorder()
    conn.send(
        recorder, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", False, -1
    )
    conn.writeBody(b"hello")
    conn.endBody()
    assert transport.value().endswith(b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    conn2, transport2, _ = connection()
    conn2.send(recorder, b"PUT / HTTP/1.1\r\nContent-Length: 3\r\n\r\n", False, 3)
    conn2.writeBody(b"abc")
    conn2.endBody()
    assert transport2.value().endswith(b"\r\n\r\nabc")


def test_an_answer_before_the_body_ended_closes_the_connection() -> None:
    conn, transport, owner = connection()
    recorder = Recorder()
    conn.send(recorder, b"POST / HTTP/1.1\r\nContent-Length: 100\r\n\r\n", False, 100)
    conn.writeBody(b"partial")
    conn.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
    assert recorder.events[-1] == ("done",)
    assert aborted(transport) and owner.idleConnections == 0


def test_pause_and_resume_reach_the_socket() -> None:
    conn, transport, _ = connection()
    conn.pauseProducing()
    assert transport.producerState == "paused"
    conn.resumeProducing()
    assert transport.producerState == "producing"
    conn.stopProducing()
    assert transport.disconnecting


def test_nagle_is_off_on_the_tcp_connection_under_tls() -> None:
    from twisted.internet.interfaces import ITCPTransport
    from zope.interface import directlyProvides

    class TCP(StringTransport):
        noDelay = False

        def setTcpNoDelay(self, enabled: bool) -> None:
            self.noDelay = enabled

    class TLSLike(StringTransport):
        def __init__(self) -> None:
            super().__init__()
            self.transport = TCP()
            directlyProvides(self.transport, ITCPTransport)

    conn = UpstreamConnection()
    wrapper = TLSLike()
    conn.makeConnection(wrapper)
    assert wrapper.transport.noDelay is True


@pytest.mark.parametrize(
    ("response", "isHead"),
    [
        (b"HTTP/1.1 204 No Content\r\n\r\n", False),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", False),
    ],
)
def test_bytes_after_any_complete_response_end_the_connection(
    response: bytes, isHead: bool
) -> None:
    """Bodiless or not, a response followed by stray bytes in the same read
    is relayed, and the connection is not reused."""
    recorder, conn, transport, owner = exchange(
        response + b"HTTP/1.1 200", isHead=isHead
    )
    assert recorder.events[-1] == ("done",)
    assert "idle" not in owner.calls and transport.disconnecting
    assert conn.state == "CLOSING"
    assert aborted(transport)  # out of step: no polite close to wait for


def test_a_body_makes_the_connection_relay_and_a_bodiless_answer_does_not() -> None:
    conn, transport, owner = connection()
    recorder = Recorder()
    conn.send(recorder, HEAD, False, None)
    assert conn.state == "AWAITING_HEAD"
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    assert owner.calls == ["relaying"] and conn.state == "RELAYING"
    conn.dataReceived(b"c")
    assert owner.calls == ["relaying"]  # once per response
    conn.dataReceived(b"d")
    assert owner.calls == ["relaying", "idle"] and conn.state == "IDLE"
    conn.send(recorder, HEAD, False, None)
    conn.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert owner.calls == ["relaying", "idle", "idle"]
    # A whole answer in one read never leaves the cap.
    conn.send(recorder, HEAD, False, None)
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert owner.calls == ["relaying", "idle", "idle", "idle"]


def test_an_early_answer_relays_while_the_body_is_still_going() -> None:
    conn, transport, owner = connection()
    recorder = Recorder()
    conn.send(recorder, b"POST / HTTP/1.1\r\nContent-Length: 9\r\n\r\n", False, 9)
    assert conn.state == "SENDING"
    conn.writeBody(b"abc")
    conn.dataReceived(b"HTTP/1.1 413 Too Large\r\nContent-Length: 3\r\n\r\nn")
    assert conn.state == "RELAYING_WHILE_SENDING" and owner.calls == ["relaying"]
    conn.writeBody(b"def")
    conn.endBody()
    assert conn.state == "RELAYING"
    assert transport.value().endswith(b"abcdef")
    conn.dataReceived(b"o!")
    assert recorder.events[-1] == ("done",)
    # The body went out in full before the answer ended: both sides agree
    # where the next request starts.
    assert conn.state == "IDLE" and owner.calls == ["relaying", "idle"]


def test_an_exchange_that_aborts_mid_read_stops_the_reading() -> None:
    conn, transport, owner = connection()

    class Quitter(Recorder):
        def responseData(self, data: bytes) -> None:
            super().responseData(data)
            conn.abort()

    recorder = Quitter()
    conn.send(recorder, HEAD, False, None)
    conn.dataReceived(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\na\r\n1\r\nb\r\n0\r\n\r\n"
    )
    assert [e[0] for e in recorder.events] == ["start", "data"]
    assert conn.state == "CLOSING"
    conn.connectionLost(Failure(ConnectionLost()))
    assert conn.state == "LOST" and owner.calls == ["lost"]
    assert [e[0] for e in recorder.events] == ["start", "data"]


def test_send_on_a_busy_connection_is_a_bug() -> None:
    conn, _, _ = connection()
    conn.send(Recorder(), HEAD, False, None)
    with pytest.raises(RuntimeError):
        conn.send(Recorder(), HEAD, False, None)


def test_closed_fires_when_the_connection_is_gone() -> None:
    conn, transport, owner = connection()
    done = conn.closed()
    assert transport.disconnecting and not done.called
    conn.connectionLost(Failure(ConnectionDone()))
    assert done.called and owner.calls == ["lost"]
    assert conn.closed().called


def test_a_streamed_request_body_reports_relaying_once() -> None:
    conn, transport, owner = connection()
    recorder = Recorder()
    conn.send(recorder, b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n", False, 10)
    conn.pacedByClient()
    conn.pacedByClient()
    assert owner.calls == ["relaying"]  # out of the cap, once
    conn.writeBody(b"abc")
    # An early answer whose body spans reads: still reported only once.
    conn.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    assert owner.calls == ["relaying"]
    # Nothing streams on a bodiless request: only its relay is reported.
    conn2, _, owner2 = connection()
    conn2.send(recorder, HEAD, False, None)
    conn2.pacedByClient()  # nothing streams: ignored
    conn2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
    assert owner2.calls == ["relaying"]
