"""
Writes gathered into one C{send} per reactor turn (clerkproxy._tcp_compat).

Pins first: the private C{FileDescriptor} state the module reaches into,
each name with a test (L{PINNED}) that fails if a Twisted upgrade changes
what it means.  Then the behaviour: in memory, over a fake socket whose kernel
takes what the test says (Hypothesis drives arbitrary writes, turns and
partial acceptance), and over real loopback sockets with the real reactor,
compared with Twisted's own C{tcp.Server} where that is the contract.
"""

from __future__ import annotations

import ast
import errno
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import trustme
from conftest import reactor, trust_root, within
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import error, tcp, unix
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from zope.interface import implementer

from clerkproxy import _tcp_compat
from clerkproxy._endpoints import adopted_endpoint, server_endpoint
from clerkproxy._tcp_compat import (
    CONNECTION_STATE,
    FILEDESCRIPTOR_STATE,
    CoalescingServer,
    EndOfTurn,
    coalesce_port,
    end_of_turn,
    send_direct,
)
from clerkproxy._tls import ReloadableServerTLS

# -- in memory: a socket whose kernel takes what the test says ------------------


class FakeSocket:
    """
    Stands in for a connected non-blocking socket.  C{room} is how many more
    bytes the kernel takes before C{send} would block (L{None}: any
    number); C{sent} is everything it took, C{offered} the size of every
    C{send} call.
    """

    def __init__(self, room: int | None = None) -> None:
        self.room = room
        self.sent = bytearray()
        self.offered: list[int] = []
        self.closed = False

    def send(self, data: Any) -> int:
        data = bytes(data)
        self.offered.append(len(data))
        taken = len(data) if self.room is None else min(len(data), self.room)
        if not taken:
            raise BlockingIOError(errno.EAGAIN, "would block")
        if self.room is not None:
            self.room -= taken
        self.sent += data[:taken]
        return taken

    def setblocking(self, flag: bool) -> None:
        pass

    def fileno(self) -> int:
        return 1000

    def shutdown(self, how: int) -> None:
        pass

    def setsockopt(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def fake_server(
    room: int | None = None, cls: type[tcp.Server] = CoalescingServer
) -> tuple[Any, FakeSocket, MemoryReactorClock]:
    """An accepted connection of class C{cls} over a L{FakeSocket}."""
    clock = MemoryReactorClock()
    sock = FakeSocket(room)
    protocol = Protocol()
    server: Any = cls(sock, protocol, ("127.0.0.1", 4321), None, 1, clock)  # type: ignore[arg-type]
    protocol.makeConnection(server)
    return server, sock, clock


def unsent(transport: Any) -> int:
    """What Twisted's buffer and this turn's writes still hold."""
    return len(transport.dataBuffer) - transport.offset + transport._tempDataLen


def run_writable(transport: Any, clock: MemoryReactorClock) -> Any:
    """What the reactor does when the socket of a registered writer is
    writable: call C{doWrite}, and return what it returned."""
    if transport in clock.writers:
        return transport.doWrite()
    return None


@implementer(IPushProducer)
class Producer:
    """A streaming producer that records what it is told."""

    def __init__(self, transport: Any = None, fail: bool = False) -> None:
        self.events: list[str] = []
        self.unsentAtResume: list[int] = []
        self.transport = transport
        self.fail = fail

    @property
    def paused(self) -> bool:
        return bool(self.events) and self.events[-1] == "pause"

    def pauseProducing(self) -> None:
        self.events.append("pause")

    def resumeProducing(self) -> None:
        self.events.append("resume")
        if self.transport is not None:
            self.unsentAtResume.append(unsent(self.transport))
        if self.fail:
            raise RuntimeError("resumeProducing failed")

    def stopProducing(self) -> None:
        self.events.append("stop")


# -- pins: the private FileDescriptor state _tcp_compat relies on ---------------


class _Socket(FileDescriptor):
    """A FileDescriptor whose kernel takes C{taking} more bytes."""

    taking = 0

    def writeSomeData(self, data: bytes) -> int:
        taken = min(len(data), self.taking)
        self.taking -= taken
        return taken


def _descriptor() -> Any:
    descriptor = _Socket(MemoryReactor())
    descriptor.connected = True
    return descriptor


def test_every_name_exists_on_a_fresh_transport() -> None:
    """Each name in FILEDESCRIPTOR_STATE is there on a fresh FileDescriptor
    and on a fresh tcp.Server, before anything was written."""
    server, _, _ = fake_server(cls=tcp.Server)
    for obj in (FileDescriptor(MemoryReactor()), server):
        for name in FILEDESCRIPTOR_STATE:
            assert hasattr(obj, name), (type(obj).__name__, name)


def test_every_private_name_the_module_touches_is_listed() -> None:
    """_tcp_compat reaches into no private attribute it does not list (and
    pin here), apart from its own."""
    own = {"_queued", "_turn", "_pending", "_reactor", "_flush"}
    source = Path(_tcp_compat.__file__).read_text()
    used = {
        node.attr
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
    }
    assert used - own <= set(FILEDESCRIPTOR_STATE) | set(CONNECTION_STATE)
    assert set(PINNED) == set(FILEDESCRIPTOR_STATE) | set(CONNECTION_STATE)


def test_temp_data_buffer_and_len() -> None:
    """_tempDataBuffer (a list of the bytes written since the last doWrite,
    in order) and _tempDataLen (their total length)."""
    descriptor = _descriptor()
    assert descriptor._tempDataBuffer == [] and descriptor._tempDataLen == 0
    descriptor.write(b"abc")
    descriptor.writeSequence([b"de", b"f"])
    assert descriptor._tempDataBuffer == [b"abc", b"de", b"f"]
    assert descriptor._tempDataLen == 6
    descriptor.taking = 2
    descriptor.doWrite()  # moved into dataBuffer, whatever was sent
    assert descriptor._tempDataBuffer == [] and descriptor._tempDataLen == 0


def test_data_buffer_and_offset() -> None:
    """dataBuffer holds what doWrite is sending and offset how much of it
    left; the writer stays registered until both are used up, and then
    they are reset."""
    descriptor = _descriptor()
    reactor_: Any = descriptor.reactor
    assert descriptor.dataBuffer == b"" and descriptor.offset == 0
    descriptor.write(b"abcdef")
    descriptor.taking = 4
    descriptor.doWrite()
    assert descriptor.dataBuffer == b"abcdef" and descriptor.offset == 4
    assert descriptor in reactor_.writers
    descriptor.write(b"gh")  # behind what is unsent, not in front of it
    descriptor.taking = 100
    descriptor.doWrite()
    assert descriptor.dataBuffer == b"" and descriptor.offset == 0
    assert descriptor not in reactor_.writers
    # A buffer the test sets up itself is sent from offset on.
    sent: list[bytes] = []
    descriptor.writeSomeData = lambda data: sent.append(bytes(data)) or len(data)
    descriptor.dataBuffer, descriptor.offset = b"xyz", 1
    descriptor.doWrite()
    assert sent == [b"yz"]


def test_write_disconnecting_and_disconnected() -> None:
    """_writeDisconnecting: loseWriteConnection asked for a half-close,
    which doWrite does once the buffer is empty, setting
    _writeDisconnected; writes after it are dropped."""
    descriptor = _descriptor()
    closed: list[bool] = []
    descriptor._closeWriteConnection = lambda: closed.append(True)
    assert descriptor._writeDisconnecting is False
    assert descriptor._writeDisconnected is False
    descriptor.write(b"abc")
    descriptor.loseWriteConnection()
    assert descriptor._writeDisconnecting is True
    assert descriptor._writeDisconnected is False and not closed
    descriptor.taking = 100
    descriptor.doWrite()
    assert descriptor._writeDisconnected is True and closed == [True]
    descriptor.write(b"late")
    assert descriptor._tempDataLen == 0


def test_maybe_pause_producer() -> None:
    """_maybePauseProducer pauses a streaming producer (producerPaused)
    once dataBuffer and _tempDataLen hold more than bufferSize; a pull
    producer is never paused."""
    descriptor = _descriptor()
    descriptor.bufferSize = 10
    producer = Producer()
    descriptor.registerProducer(producer, True)
    descriptor._tempDataBuffer.append(b"x" * 10)
    descriptor._tempDataLen = 10
    descriptor._maybePauseProducer()
    assert producer.events == [] and not descriptor.producerPaused
    descriptor.dataBuffer = b"y"
    descriptor._maybePauseProducer()
    assert producer.events == ["pause"] and descriptor.producerPaused
    descriptor.unregisterProducer()
    pull = Producer()
    descriptor.registerProducer(pull, False)
    assert pull.events == ["resume"]  # a pull producer starts at once
    descriptor._maybePauseProducer()
    assert pull.events == ["resume"]


def test_aborting_and_tls() -> None:
    """tcp.Connection._aborting: False, then True once abortConnection is
    called while the connection stays connected until the next turn; and
    TLS: False until startTLS, then True (writes go through the TLS layer)."""
    from twisted.internet.ssl import CertificateOptions

    server, _, _ = fake_server(cls=tcp.Server)
    assert server._aborting is False and server.TLS is False
    server.abortConnection()
    assert server._aborting is True and server.connected
    other, _, _ = fake_server(cls=tcp.Server)
    other.startTLS(CertificateOptions())
    assert other.TLS is True


#: The test that pins each name of FILEDESCRIPTOR_STATE and CONNECTION_STATE.
PINNED = {
    "_tempDataBuffer": test_temp_data_buffer_and_len,
    "_tempDataLen": test_temp_data_buffer_and_len,
    "dataBuffer": test_data_buffer_and_offset,
    "offset": test_data_buffer_and_offset,
    "_writeDisconnected": test_write_disconnecting_and_disconnected,
    "_writeDisconnecting": test_write_disconnecting_and_disconnected,
    "_maybePauseProducer": test_maybe_pause_producer,
    "_aborting": test_aborting_and_tls,
    "TLS": test_aborting_and_tls,
}


def test_write_some_data_returns_a_count_or_an_exception() -> None:
    """tcp.Connection.writeSomeData, which flushNow calls itself: an int
    (0 when the socket would block, at most SEND_LIMIT) or, for a broken
    connection, an exception instance it returns rather than raises."""
    server, sock, _ = fake_server(room=3, cls=tcp.Server)
    assert server.writeSomeData(b"abcdef") == 3
    assert server.writeSomeData(b"def") == 0
    sock.room = None
    assert server.writeSomeData(b"x" * (server.SEND_LIMIT + 1)) == server.SEND_LIMIT

    def broken(data: Any) -> int:
        raise ConnectionResetError(errno.ECONNRESET, "reset")

    sock.send = broken  # type: ignore[method-assign]
    assert isinstance(server.writeSomeData(b"x"), error.ConnectionLost)


def test_a_port_builds_its_connections_from_its_transport_attribute() -> None:
    """tcp.Port.transport names the class accepted connections are made
    of (coalesce_port replaces it on the instance)."""
    assert tcp.Port.transport is tcp.Server
    port = tcp.Port(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
    assert port.transport is tcp.Server


# -- EndOfTurn -------------------------------------------------------------------


class _Writer:
    def __init__(self, log: list[str], name: str, fail: bool = False) -> None:
        self.log, self.name, self.fail = log, name, fail

    def flushNow(self) -> None:
        self.log.append(self.name)
        if self.fail:
            raise RuntimeError(f"{self.name} failed")

    def abortConnection(self) -> None:
        self.log.append(f"abort {self.name}")


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    """Every event logged while the test runs."""
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(events.append)


def _failures(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if "log_failure" in e]


def test_one_call_per_turn_flushes_everything_in_order() -> None:
    clock = Clock()
    turn = EndOfTurn(clock)
    log: list[str] = []
    for name in "abc":
        turn.add(_Writer(log, name))
    assert len(clock.getDelayedCalls()) == 1
    assert clock.getDelayedCalls()[0].getTime() == clock.seconds()
    assert log == []
    clock.advance(0)
    assert log == ["a", "b", "c"] and clock.getDelayedCalls() == []
    turn.add(_Writer(log, "d"))  # a new turn: a new call
    clock.advance(0)
    assert log == ["a", "b", "c", "d"]


def test_a_writer_added_during_the_flush_gets_a_call_of_its_own() -> None:
    """(A real reactor runs that call in its next turn; Clock.advance runs
    everything due, so both flush here.)"""
    clock = Clock()
    turn = EndOfTurn(clock)
    log: list[str] = []
    scheduled: list[int] = []

    class Again(_Writer):
        def flushNow(self) -> None:
            super().flushNow()
            turn.add(_Writer(self.log, "again"))
            scheduled.append(len(clock.getDelayedCalls()))

    turn.add(Again(log, "a"))
    clock.advance(0)
    assert log == ["a", "again"] and scheduled == [1]
    assert clock.getDelayedCalls() == []


def test_one_writers_failure_is_logged_and_the_others_still_flush(
    logged: list[dict[str, Any]],
) -> None:
    clock = Clock()
    turn = EndOfTurn(clock)
    log: list[str] = []
    turn.add(_Writer(log, "a"))
    turn.add(_Writer(log, "b", fail=True))
    turn.add(_Writer(log, "c"))
    clock.advance(0)
    assert log == ["a", "b", "abort b", "c"]  # b's connection ends, as in doWrite
    [event] = _failures(logged)
    assert event["log_failure"].check(RuntimeError)
    assert event["log_format"] == "Flushing writes failed"
    turn.add(_Writer(log, "d"))  # and the next turn still works
    clock.advance(0)
    assert log[-1] == "d"


def test_one_end_of_turn_per_reactor() -> None:
    one, other = Clock(), Clock()
    assert end_of_turn(one) is end_of_turn(one)
    assert end_of_turn(one) is not end_of_turn(other)


# -- CoalescingServer, in memory --------------------------------------------------


def test_writes_of_a_turn_go_in_one_send_at_its_end() -> None:
    server, sock, clock = fake_server()
    server.write(b"ab")
    server.writeSequence([b"c", b"de"])
    server.write(b"f")
    assert sock.offered == []  # nothing before the end of the turn
    clock.advance(0)
    assert sock.offered == [6] and bytes(sock.sent) == b"abcdef"
    assert server not in clock.writers and unsent(server) == 0


def test_the_rest_of_a_partial_send_goes_through_twisteds_buffer() -> None:
    server, sock, clock = fake_server(room=4)
    server.write(b"abcdef")
    clock.advance(0)
    assert bytes(sock.sent) == b"abcd" and server in clock.writers
    server.write(b"gh")  # behind the rest, through Twisted
    clock.advance(0)
    assert bytes(sock.sent) == b"abcd"
    sock.room = None
    run_writable(server, clock)
    assert bytes(sock.sent) == b"abcdefgh" and server not in clock.writers
    server.write(b"ij")  # and coalesced again once Twisted is done
    clock.advance(0)
    assert bytes(sock.sent) == b"abcdefghij" and server not in clock.writers


def test_more_than_send_limit_in_one_turn() -> None:
    server, sock, clock = fake_server()
    data = bytes(range(256)) * (server.SEND_LIMIT // 128)
    server.write(data)
    clock.advance(0)
    assert sock.offered == [server.SEND_LIMIT] and server in clock.writers
    for _ in range(10):
        run_writable(server, clock)
    assert bytes(sock.sent) == data and server not in clock.writers


def test_a_broken_connection_is_left_to_the_reactor() -> None:
    """A flush whose send fails registers the writer, so that the
    reactor's doWrite finds the failure and loses the connection."""
    server, sock, clock = fake_server()

    def broken(data: Any) -> int:
        raise BrokenPipeError(errno.EPIPE, "broken")

    sock.send = broken  # type: ignore[method-assign]
    server.write(b"abc")
    clock.advance(0)
    assert server in clock.writers
    assert isinstance(run_writable(server, clock), error.ConnectionLost)


@pytest.mark.parametrize("cls", [CoalescingServer, tcp.Server])
def test_data_must_be_bytes(cls: type[tcp.Server]) -> None:
    server, sock, clock = fake_server(cls=cls)
    for data in ("text", bytearray(b"x"), memoryview(b"x"), None):
        with pytest.raises(TypeError):
            server.write(data)
    with pytest.raises(TypeError):
        server.writeSequence(["text"])
    with pytest.raises(TypeError):
        server.writeSequence([b"a", "text"])
    assert unsent(server) == 0
    clock.advance(0)
    assert sock.offered == []


def test_nothing_is_queued_for_nothing_or_for_a_lost_connection() -> None:
    server, sock, clock = fake_server()
    server.write(b"")
    server.writeSequence([])
    assert clock.getDelayedCalls() == []
    server.connectionLost(Failure(error.ConnectionDone()))
    server.write(b"late")
    assert clock.getDelayedCalls() == [] and sock.offered == []


def test_a_connection_lost_before_its_flush_sends_nothing(
    logged: list[dict[str, Any]],
) -> None:
    server, sock, clock = fake_server()
    server.write(b"abc")
    server.connectionLost(Failure(error.ConnectionLost()))
    clock.advance(0)
    assert sock.offered == [] and _failures(logged) == []


def test_a_streaming_producer_is_paused_and_resumed_in_memory() -> None:
    server, sock, clock = fake_server()
    server.bufferSize = 10
    producer = Producer(server)
    server.registerProducer(producer, True)
    server.write(b"x" * 11)
    assert producer.events == ["pause"]
    clock.advance(0)
    assert producer.events == ["pause", "resume"] and producer.unsentAtResume == [0]
    assert bytes(sock.sent) == b"x" * 11
    server.write(b"y" * 5)  # under the limit: not paused, not resumed
    clock.advance(0)
    assert producer.events == ["pause", "resume"]


def test_a_pull_producer_is_asked_for_more_after_each_flush() -> None:
    server, sock, clock = fake_server()
    chunks = [b"one", b"two", b"three"]

    class Pull:
        def resumeProducing(self) -> None:
            if chunks:
                server.write(chunks.pop(0))

        def stopProducing(self) -> None:
            pass

    server.registerProducer(Pull(), False)
    for _ in range(10):
        clock.advance(0)
    assert bytes(sock.sent) == b"onetwothree"
    assert server not in clock.writers


def test_loseConnection_after_writes_sends_them_then_closes() -> None:
    server, sock, clock = fake_server()
    server.write(b"abc")
    server.loseConnection()
    server.write(b"def")  # as in Twisted: still sent, before the close
    clock.advance(0)
    result = run_writable(server, clock)
    assert bytes(sock.sent) == b"abcdef"
    assert isinstance(result, error.ConnectionDone)


def test_half_close_after_writes_sends_them_then_shuts_down() -> None:
    server, sock, clock = fake_server()
    server.write(b"abc")
    server.loseWriteConnection()
    clock.advance(0)
    run_writable(server, clock)
    assert bytes(sock.sent) == b"abc" and server._writeDisconnected
    server.write(b"late")
    clock.advance(0)
    run_writable(server, clock)
    assert bytes(sock.sent) == b"abc"


def test_abort_with_queued_bytes_is_harmless(logged: list[dict[str, Any]]) -> None:
    server, sock, clock = fake_server()
    lost: list[Failure] = []
    server.protocol.connectionLost = lost.append
    server.write(b"abc")
    server.abortConnection()
    server.write(b"def")
    clock.advance(0)
    clock.advance(0)
    assert len(lost) == 1 and lost[0].check(error.ConnectionAborted)
    assert sock.closed and server not in clock.writers
    assert _failures(logged) == []


# -- Hypothesis: any writes, turns and partial acceptance ---------------------------

_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.binary(max_size=300)),
        st.tuples(st.just("seq"), st.lists(st.binary(max_size=120), max_size=4)),
        st.tuples(st.just("turn"), st.none()),
        st.tuples(st.just("room"), st.integers(0, 700)),
        st.tuples(st.just("writable"), st.none()),
        st.tuples(st.just("lose"), st.none()),
    ),
    max_size=50,
)

_SETTINGS = settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _play(
    cls: type[tcp.Server], ops: list[tuple[str, Any]], room: int | None
) -> tuple[bytes, bytes, bool, list[str] | None]:
    """
    Apply C{ops} to a C{cls} connection whose kernel first takes C{room}
    bytes, checking on the way that what reached the socket is always a
    prefix of what was written and that the producer is only paused while
    bytes wait; then let the kernel take everything and run the reactor
    until nothing is left.  Returns what was written, what was sent,
    whether the connection closed, and what the producer was told (if it
    is still registered).
    """
    server, sock, clock = fake_server(room, cls)
    server.bufferSize = 256
    producer = Producer(server)
    server.registerProducer(producer, True)
    written = bytearray()
    closed = False
    for op, arg in ops:
        if op == "write":
            server.write(arg)
            written += arg
        elif op == "seq":
            server.writeSequence(arg)
            written += b"".join(arg)
        elif op == "turn":
            clock.advance(0)
        elif op == "room":
            if sock.room is not None:
                sock.room += arg
        elif op == "writable":
            closed = isinstance(run_writable(server, clock), error.ConnectionDone)
        elif op == "lose" and not server.disconnecting:
            server.unregisterProducer()
            server.loseConnection()
        if closed:
            break
        assert written.startswith(sock.sent)
        if server.producer is not None and producer.paused:
            assert unsent(server) > 0
    sock.room = None
    for _ in range(100):
        if closed or (server not in clock.writers and not clock.getDelayedCalls()):
            break
        clock.advance(0)
        closed = isinstance(run_writable(server, clock), error.ConnectionDone)
    events = producer.events if server.producer is producer else None
    return bytes(written), bytes(sock.sent), closed, events


@_SETTINGS
@given(ops=_OPS, room=st.one_of(st.none(), st.integers(0, 2000)))
def test_any_writes_arrive_whole_and_in_order(
    ops: list[tuple[str, Any]], room: int | None
) -> None:
    """Whatever the writes, turns, kernel acceptance and closing, every
    byte reaches the socket once, in order, as with Twisted's own Server:
    the same bytes, the same close, the producer resumed in the end."""
    written, sent, closed, events = _play(CoalescingServer, ops, room)
    assert sent == written
    assert events is None or not events or events[-1] == "resume"
    plain = _play(tcp.Server, ops, room)
    assert (written, sent, closed) == plain[:3]


@_SETTINGS
@given(
    turns=st.lists(
        st.lists(
            st.one_of(
                st.binary(max_size=500), st.lists(st.binary(max_size=100), max_size=3)
            ),
            max_size=5,
        ),
        max_size=8,
    )
)
def test_a_kernel_that_takes_everything_gets_one_send_per_turn(
    turns: list[list[Any]],
) -> None:
    """While the kernel takes everything, each turn's writes leave in one
    send, and the reactor never hears of the socket."""
    server, sock, clock = fake_server()
    addWriter = clock.addWriter
    registered: list[Any] = []
    clock.addWriter = lambda writer: (registered.append(writer), addWriter(writer))  # type: ignore[method-assign]
    expected: list[int] = []
    for turn in turns:
        data = b""
        for write in turn:
            if isinstance(write, bytes):
                server.write(write)
                data += write
            else:
                server.writeSequence(write)
                data += b"".join(write)
        clock.advance(0)
        if data:
            expected.append(len(data))
    assert sock.offered == expected
    assert registered == []


# -- over loopback, with the real reactor -----------------------------------------


class Served(Protocol):
    """
    The server side of a loopback connection.  Spies on its TCP transport:
    C{sends} is every C{writeSomeData} (flushNow's and doWrite's), cut to
    what the kernel took; C{startWritings} counts registrations with the
    reactor.
    """

    def __init__(self, accepted: DeferredQueue[Served]) -> None:
        self._accepted = accepted
        self.sends: list[bytes] = []
        self.startWritings = 0
        self.received = bytearray()
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        tcpTransport = socket_transport(self.transport)
        if tcpTransport is not None:
            send = tcpTransport.writeSomeData
            start = tcpTransport.startWriting

            def spySend(data: Any) -> Any:
                result = send(data)
                if isinstance(result, int):
                    self.sends.append(bytes(memoryview(data)[:result]))
                return result

            def spyStart() -> None:
                self.startWritings += 1
                start()

            tcpTransport.writeSomeData = spySend
            tcpTransport.startWriting = spyStart
        self._accepted.put(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.lost.callback(None)


class Collector(Protocol):
    """A client that collects what it receives; reads nothing while
    C{stalled} until told to C{read}."""

    def __init__(self, stalled: bool = False) -> None:
        self.stalled = stalled
        self.data = bytearray()
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()
        self._waiting: list[tuple[int, Deferred[bytes]]] = []

    def connectionMade(self) -> None:
        if self.stalled:
            self.transport.pauseProducing()

    def read(self) -> None:
        self.stalled = False
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        for item in list(self._waiting):
            if len(self.data) >= item[0]:
                self._waiting.remove(item)
                item[1].callback(bytes(self.data))

    def until(self, size: int) -> Deferred[bytes]:
        """Fires with everything received once there are C{size} bytes."""
        d: Deferred[bytes] = Deferred()
        if len(self.data) >= size:
            d.callback(bytes(self.data))
        else:
            self._waiting.append((size, d))
        return within(d, 10)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        for _, d in self._waiting:
            d.errback(reason)
        self._waiting = []
        self.reason = reason
        self.lost.callback(None)


def socket_transport(transport: Any) -> Any:
    """The TCP connection under C{transport}'s wrappers, or L{None}."""
    for _ in range(5):
        if transport is None or isinstance(transport, tcp.Connection):
            return transport
        transport = getattr(transport, "transport", None)
    return None


class Net:
    """Loopback listeners and connections, all closed after the test."""

    def __init__(self) -> None:
        self.ports: list[Any] = []
        self.protocols: list[Served | Collector] = []

    def factory(self) -> tuple[Factory, DeferredQueue[Served]]:
        accepted: DeferredQueue[Served] = DeferredQueue()
        factory = Factory()
        factory.buildProtocol = lambda addr: self._track(Served(accepted))  # type: ignore[method-assign]
        return factory, accepted

    def _track(self, protocol: Any) -> Any:
        self.protocols.append(protocol)
        return protocol

    def listen(
        self, cls: type[tcp.Server] = CoalescingServer
    ) -> tuple[int, DeferredQueue[Served]]:
        factory, accepted = self.factory()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.ports.append(port)
        if cls is CoalescingServer:
            assert coalesce_port(port) is port
        else:
            port.transport = cls
        assert port.transport is cls
        return port.getHost().port, accepted

    async def connect(self, port: int, client: Collector | None = None) -> Collector:
        client = self._track(client or Collector())
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
        await within(connectProtocol(endpoint, client))
        return client

    async def pair(
        self, cls: type[tcp.Server] = CoalescingServer, stalled: bool = False
    ) -> tuple[Served, Any, Collector]:
        """A connection: its server side, that side's TCP transport, and
        the client."""
        port, accepted = self.listen(cls)
        client = await self.connect(port, Collector(stalled))
        served = await within(accepted.get())
        transport = socket_transport(served.transport)
        assert type(transport) is cls
        return served, transport, client

    async def close(self) -> None:
        connected = [p for p in self.protocols if p.transport is not None]
        for protocol in connected:
            if protocol.reason is None:
                protocol.transport.abortConnection()
        for _ in range(200):
            if all(p.reason is not None for p in connected):
                break
            await turns()
        for port in self.ports:
            await port.stopListening()
        assert all(p.reason is not None for p in connected)


@pytest.fixture
def net() -> Iterator[Net]:
    loopback = Net()
    yield loopback
    pytest_twisted.blockon(Deferred.fromCoroutine(loopback.close()))


async def turns(count: int = 1) -> None:
    """Let the reactor run C{count} turns."""
    for _ in range(count):
        await deferLater(reactor, 0, lambda: None)


@pytest.mark.parametrize("cls", [CoalescingServer, tcp.Server])
@pytest_twisted.ensureDeferred
async def test_writes_of_one_turn_leave_in_one_send(
    net: Net, cls: type[tcp.Server]
) -> None:
    """Coalesced: one send and no registration with the reactor.  Twisted's
    own Server (the control) registers for the same writes."""
    served, transport, client = await net.pair(cls)
    transport.write(b"a")
    transport.write(b"bc")
    transport.writeSequence([b"d", b"", b"ef"])
    transport.write(b"g")
    assert await client.until(7) == b"abcdefg"
    assert served.sends == [b"abcdefg"]
    if cls is CoalescingServer:
        assert served.startWritings == 0
    else:
        assert served.startWritings > 0
    assert transport not in reactor.getWriters()


@pytest_twisted.ensureDeferred
async def test_writes_of_later_turns_arrive_in_order(net: Net) -> None:
    served, transport, client = await net.pair()
    for i in range(20):
        transport.write(b"%d," % i)
        transport.writeSequence([b"%d;" % i, b"|"])
        await turns()
    expected = b"".join(b"%d,%d;|" % (i, i) for i in range(20))
    assert await client.until(len(expected)) == expected
    assert len(served.sends) == 20 and served.startWritings == 0


@pytest_twisted.ensureDeferred
async def test_write_sequence_equals_the_join(net: Net) -> None:
    served, transport, client = await net.pair()
    parts = [b"x" * 1000, b"", b"yz", bytes(range(256))]
    transport.writeSequence(parts)
    transport.writeSequence(iter([b"last"]))
    expected = b"".join(parts) + b"last"
    assert await client.until(len(expected)) == expected
    assert served.sends == [expected]


@pytest_twisted.ensureDeferred
async def test_a_str_raises_type_error(net: Net) -> None:
    served, transport, client = await net.pair()
    with pytest.raises(TypeError):
        transport.write("text")
    with pytest.raises(TypeError):
        transport.writeSequence([b"a", "text"])
    transport.write(b"ok")
    assert await client.until(2) == b"ok"


def _chunk(i: int, size: int = 64 * 1024) -> bytes:
    return i.to_bytes(4, "big") * (size // 4)


async def _stall(served: Served, transport: Any, count: int) -> bytes:
    """Write C{_chunk(i)} for i < C{count}, one per turn, to a client that
    does not read, until Twisted's buffer holds some; returns what was
    written."""
    written = b""
    for i in range(count):
        transport.write(_chunk(i))
        written += _chunk(i)
        await turns()
    assert served.startWritings > 0, "the kernel never refused anything"
    assert unsent(transport) > 0 and transport in reactor.getWriters()
    return written


@pytest_twisted.ensureDeferred
async def test_a_peer_that_stops_reading_gets_everything_later_in_order(
    net: Net,
) -> None:
    served, transport, client = await net.pair(stalled=True)
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    written = await _stall(served, transport, 64)  # 4 MiB
    # More while Twisted holds bytes: behind them, never in front.
    transport.write(b"tail-1")
    transport.writeSequence([b"tail-2", b"tail-3"])
    written += b"tail-1tail-2tail-3"
    client.read()
    received = await client.until(len(written))
    assert len(received) == len(written)
    assert received == written
    assert b"".join(served.sends) == written
    assert unsent(transport) == 0 and transport not in reactor.getWriters()
    # Once Twisted's buffer is empty, writes are coalesced again.
    before = served.startWritings, len(served.sends)
    transport.write(b"again")
    transport.write(b"!")
    assert (await client.until(len(written) + 6))[-6:] == b"again!"
    assert served.startWritings == before[0]
    assert served.sends[before[1] :] == [b"again!"]


@pytest_twisted.ensureDeferred
async def test_a_streaming_producer_paused_over_buffer_size_is_resumed_once_flushed(
    net: Net,
) -> None:
    served, transport, client = await net.pair()
    transport.bufferSize = 1000
    producer = Producer(transport)
    transport.registerProducer(producer, True)
    transport.write(b"x" * 600)
    assert producer.events == []
    transport.write(b"y" * 600)
    assert producer.events == ["pause"]
    await client.until(1200)
    assert producer.events == ["pause", "resume"]
    assert producer.unsentAtResume == [0]
    assert served.startWritings == 0 and served.sends == [b"x" * 600 + b"y" * 600]
    transport.unregisterProducer()


@pytest_twisted.ensureDeferred
async def test_a_streaming_producer_stays_paused_while_the_peer_does_not_read(
    net: Net,
) -> None:
    served, transport, client = await net.pair(stalled=True)
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    producer = Producer(transport)
    transport.registerProducer(producer, True)
    written = await _stall(served, transport, 64)
    assert producer.paused
    await turns(5)
    assert producer.paused
    client.read()
    assert await client.until(len(written)) == written
    for _ in range(50):  # the resume comes with the write that empties it
        if not producer.paused:
            break
        await turns()
    assert not producer.paused
    assert set(producer.unsentAtResume) == {0}
    transport.unregisterProducer()


@pytest.mark.parametrize("cls", [CoalescingServer, tcp.Server])
@pytest_twisted.ensureDeferred
async def test_loseConnection_right_after_a_write_delivers_then_closes(
    net: Net, cls: type[tcp.Server]
) -> None:
    served, transport, client = await net.pair(cls)
    transport.write(b"hello ")
    transport.writeSequence([b"world"])
    transport.loseConnection()
    await within(client.lost)
    assert bytes(client.data) == b"hello world"
    assert client.reason is not None and client.reason.check(error.ConnectionDone)
    await within(served.lost)
    assert served.reason is not None and served.reason.check(error.ConnectionDone)


@pytest.mark.parametrize("cls", [CoalescingServer, tcp.Server])
@pytest_twisted.ensureDeferred
async def test_writes_after_loseConnection_are_sent_before_the_close(
    net: Net, cls: type[tcp.Server]
) -> None:
    served, transport, client = await net.pair(cls)
    transport.write(b"a")
    transport.loseConnection()
    transport.write(b"b")
    transport.writeSequence([b"c", b"d"])
    await turns()
    transport.write(b"e")  # a later turn, still closing
    await within(client.lost)
    assert bytes(client.data) == b"abcde"


@pytest.mark.parametrize("cls", [CoalescingServer, tcp.Server])
@pytest_twisted.ensureDeferred
async def test_loseConnection_with_twisteds_buffer_full_delivers_everything(
    net: Net, cls: type[tcp.Server]
) -> None:
    served, transport, client = await net.pair(cls, stalled=True)
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    written = await _stall(served, transport, 64)
    transport.write(b"end")
    transport.loseConnection()
    transport.write(b"!")
    client.read()
    await within(client.lost, 10)
    assert bytes(client.data) == written + b"end!"


@pytest.mark.parametrize("cls", [CoalescingServer, tcp.Server])
@pytest_twisted.ensureDeferred
async def test_abortConnection_with_queued_bytes_is_harmless(
    net: Net, cls: type[tcp.Server], logged: list[dict[str, Any]]
) -> None:
    served, transport, client = await net.pair(cls)
    transport.write(b"queued")
    transport.abortConnection()
    transport.write(b"after")
    transport.abortConnection()
    await within(served.lost)
    assert served.reason is not None and served.reason.check(error.ConnectionAborted)
    await within(client.lost)
    await turns(3)
    assert _failures(logged) == []
    assert transport not in reactor.getWriters()


@pytest_twisted.ensureDeferred
async def test_abortConnection_with_twisteds_buffer_full_is_harmless(
    net: Net, logged: list[dict[str, Any]]
) -> None:
    served, transport, client = await net.pair(stalled=True)
    transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
    await _stall(served, transport, 64)
    transport.write(b"more")
    transport.abortConnection()
    await within(served.lost)
    assert served.reason is not None and served.reason.check(error.ConnectionAborted)
    client.read()  # to hear of the reset
    await within(client.lost)
    await turns(3)
    assert _failures(logged) == []
    assert transport not in reactor.getWriters()


@pytest.mark.parametrize("cls", [CoalescingServer, tcp.Server])
@pytest_twisted.ensureDeferred
async def test_half_close_after_a_write_delivers_then_ends_the_stream(
    net: Net, cls: type[tcp.Server]
) -> None:
    """As in Twisted, a write before the half-close is done still goes."""
    served, transport, client = await net.pair(cls)
    transport.write(b"last ")
    transport.loseWriteConnection()
    transport.write(b"words")
    await within(client.lost)  # the client, not half-closeable, closes
    assert bytes(client.data) == b"last words"


@pytest_twisted.ensureDeferred
async def test_a_failing_flush_does_not_stop_other_writers(
    net: Net, logged: list[dict[str, Any]]
) -> None:
    """The first connection's producer raises when its flush resumes it:
    the failure is logged and that connection is aborted (as the reactor
    ends a connection whose doWrite raises); the second connection's bytes
    of the same turn still go, and it goes on working."""
    port, accepted = net.listen()
    clientA = await net.connect(port)
    servedA = await within(accepted.get())
    clientB = await net.connect(port)
    servedB = await within(accepted.get())
    a, b = servedA.transport, servedB.transport
    a.bufferSize = 10
    producer = Producer(fail=True)
    a.registerProducer(producer, True)
    a.write(b"a" * 100)  # paused: the flush resumes it, and it raises
    assert producer.events == ["pause"]
    b.write(b"for b")
    assert await clientB.until(5) == b"for b"
    assert await clientA.until(100) == b"a" * 100
    assert producer.events == ["pause", "resume"]
    [event] = _failures(logged)
    assert event["log_failure"].check(RuntimeError)
    assert a._aborting
    b.write(b"B")
    assert (await clientB.until(6))[-1:] == b"B"


# -- coalesce_port and the endpoints that apply it ----------------------------------


def test_coalesce_port_leaves_anything_else_alone(tmp_path: Path) -> None:
    thing = object()
    assert coalesce_port(thing) is thing
    assert coalesce_port(None) is None

    class Custom(tcp.Server):
        pass

    factory = Factory.forProtocol(Protocol)
    custom = tcp.Port(0, factory, interface="127.0.0.1")
    custom.transport = Custom
    assert coalesce_port(custom) is custom and custom.transport is Custom

    unixPort = unix.Port(str(tmp_path / "s"), factory)
    assert isinstance(unixPort, tcp.Port)
    assert coalesce_port(unixPort) is unixPort
    assert unixPort.transport is unix.Server

    plain = tcp.Port(0, factory, interface="127.0.0.1")
    assert coalesce_port(plain) is plain and plain.transport is CoalescingServer
    assert tcp.Port.transport is tcp.Server  # the instance, not the class
    assert coalesce_port(plain) is plain and plain.transport is CoalescingServer


@pytest.fixture
def serving_tls(ca: trustme.CA, tmp_path: Path) -> ReloadableServerTLS:
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    return ReloadableServerTLS(str(cert), str(key))


async def _served_through(
    net: Net,
    listening: Any,
    ca: trustme.CA,
    tls: bool,
    header: bytes = b"",
) -> None:
    """Over an endpoint's port: a greeting from the server and an echo
    from the client both arrive, and the connection's TCP transport is a
    CoalescingServer that sent the greeting in one send."""
    factory, accepted = net.factory()
    port = await within(listening.listen(factory))
    net.ports.append(port)
    endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
    if tls:
        endpoint = wrapClientTLS(
            optionsForClientTLS("localhost", trust_root(ca)), endpoint
        )
    client = net._track(Collector())
    await within(connectProtocol(endpoint, client))
    if header:
        client.transport.write(header)
    served = await within(accepted.get())
    assert type(socket_transport(served.transport)) is CoalescingServer
    served.transport.write(b"hello")
    client.transport.write(b"ping")
    assert await client.until(5) == b"hello"
    for _ in range(100):
        if served.received == b"ping":
            break
        await turns()
    assert served.received == b"ping"
    if not tls:
        assert served.sends == [b"hello"]


@pytest.mark.parametrize(
    ("description", "header"),
    [
        ("tcp:0:interface=127.0.0.1", b""),
        ("haproxy:tcp:0:interface=127.0.0.1", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_server_endpoint_connections_are_coalescing(
    net: Net, ca: trustme.CA, description: str, header: bytes
) -> None:
    await _served_through(
        net, server_endpoint(reactor, description, None), ca, False, header
    )


@pytest.mark.parametrize("description", ["tls:tcp:0:interface=127.0.0.1", "0"])
@pytest_twisted.ensureDeferred
async def test_server_endpoint_tls_connections_are_coalescing(
    net: Net, ca: trustme.CA, serving_tls: ReloadableServerTLS, description: str
) -> None:
    await _served_through(
        net, server_endpoint(reactor, description, serving_tls), ca, True
    )


@pytest.mark.parametrize("kind", ["tcp", "tls"])
@pytest_twisted.ensureDeferred
async def test_adopted_endpoint_connections_are_coalescing(
    net: Net, ca: trustme.CA, serving_tls: ReloadableServerTLS, kind: str
) -> None:
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(16)
    listening.setblocking(False)
    fd = listening.detach()  # the endpoint closes it once it has adopted it
    endpoint = adopted_endpoint(reactor, fd, socket.AF_INET, kind, serving_tls)
    await _served_through(net, endpoint, ca, kind == "tls")


# -- send_direct ---------------------------------------------------------------------


def test_send_direct_falls_back_to_write_for_other_transports() -> None:
    transport = StringTransport()
    transport.write(b"first ")
    send_direct(transport, b"second")
    assert transport.value() == b"first second"


def test_send_direct_writes_what_the_kernel_does_not_take() -> None:
    server, sock, clock = fake_server(room=3, cls=tcp.Server)
    send_direct(server, b"abcdef")
    assert bytes(sock.sent) == b"abc" and server._tempDataBuffer == [b"def"]
    assert server in clock.writers
    send_direct(server, b"gh")  # behind the rest
    sock.room = None
    run_writable(server, clock)
    assert bytes(sock.sent) == b"abcdefgh"


def test_send_direct_to_a_full_socket_writes_everything() -> None:
    server, sock, clock = fake_server(room=0, cls=tcp.Server)
    send_direct(server, b"abc")
    assert sock.offered == [3] and server._tempDataBuffer == [b"abc"]
    sock.room = None
    run_writable(server, clock)
    assert bytes(sock.sent) == b"abc"


def test_send_direct_to_a_closing_transport_writes() -> None:
    server, sock, clock = fake_server(cls=tcp.Server)
    server.write(b"abc")
    server.loseConnection()
    send_direct(server, b"def")
    assert sock.offered == []
    assert isinstance(run_writable(server, clock), error.ConnectionDone)
    assert bytes(sock.sent) == b"abcdef"


@pytest_twisted.ensureDeferred
async def test_send_direct_sends_at_once_to_an_idle_connection(net: Net) -> None:
    served, _, client = await net.pair()
    transport = client.transport  # a tcp.Client
    assert isinstance(transport, tcp.Client)
    calls: list[bytes] = []
    send = transport.writeSomeData
    transport.writeSomeData = lambda data: calls.append(bytes(data)) or send(data)
    transport.startWriting = lambda: calls.append(b"startWriting")
    send_direct(transport, b"now")
    assert calls == [b"now"]  # sent before send_direct returned
    del transport.writeSomeData, transport.startWriting
    for _ in range(100):
        if served.received == b"now":
            break
        await turns()
    assert served.received == b"now"


@pytest_twisted.ensureDeferred
async def test_send_direct_keeps_order_behind_buffered_bytes(net: Net) -> None:
    served, _, client = await net.pair()
    transport = client.transport
    calls: list[bytes] = []
    send = transport.writeSomeData
    transport.writeSomeData = lambda data: calls.append(bytes(data)) or send(data)
    transport.write(b"first ")  # Twisted's own: buffered until writable
    send_direct(transport, b"second")
    assert calls == []
    for _ in range(100):
        if len(served.received) >= 12:
            break
        await turns()
    assert served.received == b"first second"
    assert calls == [b"first second"]


@pytest_twisted.ensureDeferred
async def test_send_direct_keeps_order_behind_a_coalesced_turn(net: Net) -> None:
    served, transport, client = await net.pair()
    transport.write(b"first ")
    send_direct(transport, b"second")
    assert await client.until(12) == b"first second"
    assert served.sends == [b"first second"]


def test_fake_server_is_what_a_port_makes() -> None:
    """The in-memory harness builds its connection the way tcp.Port does
    (socket, protocol, address, port, session number, reactor)."""
    import inspect

    assert list(inspect.signature(tcp.Server.__init__).parameters) == [
        "self",
        "sock",
        "protocol",
        "client",
        "server",
        "sessionno",
        "reactor",
    ]
