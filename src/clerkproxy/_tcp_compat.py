"""
Writes that reach the socket without a trip through the reactor.

Twisted's socket transports (C{twisted.internet.tcp}) answer every
C{write} by registering the socket for writability (an C{epoll_ctl}),
waiting for the next poll to say it is writable, sending, and
unregistering it (a second C{epoll_ctl}).  A proxy writes twice per
exchange (the request to FAPI, the answer to the client), so that is four
system calls and two extra trips through the reactor's dispatch for each
request, a sixth of the proxy's CPU time in a profile.

Here writes are gathered instead and sent once at the end of the reactor
turn that made them, straight to the socket: one C{send} per connection
per turn, however many writes made it up, and the reactor only hears of
the socket when the kernel does not take everything (then Twisted's own
buffering takes over, unchanged).  L{CoalescingServer} does this for the
connections a listening port accepts, L{send_direct} for bytes written
under our own upstream TLS.

This module reaches into C{FileDescriptor}'s write buffer
(C{_tempDataBuffer}, C{_tempDataLen}, C{dataBuffer}, C{offset}) and
write-side state (C{_writeDisconnected}, C{_writeDisconnecting},
C{_maybePauseProducer}), and C{tcp.Connection}'s C{_aborting} and C{TLS};
C{tests/test_tcp_compat.py} pins each.  Like
C{_twisted_compat}, it is the only place that does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol
from weakref import WeakKeyDictionary

from twisted.internet import tcp
from twisted.logger import Logger

__all__ = [
    "CONNECTION_STATE",
    "FILEDESCRIPTOR_STATE",
    "CoalescingServer",
    "EndOfTurn",
    "coalesce_port",
    "end_of_turn",
    "send_direct",
]

_log = Logger()

#: The C{FileDescriptor} attributes and methods this module relies on.
FILEDESCRIPTOR_STATE = (
    "_tempDataBuffer",
    "_tempDataLen",
    "dataBuffer",
    "offset",
    "_writeDisconnected",
    "_writeDisconnecting",
    "_maybePauseProducer",
)

#: The C{tcp.Connection} attributes this module relies on: C{_aborting}
#: (set by C{abortConnection}, which closes only on the next turn: nothing
#: may be sent meanwhile) and C{TLS} (set by C{startTLS}, after which
#: writes must go through the TLS layer, as C{tcp.Server.write} sends them).
CONNECTION_STATE = ("_aborting", "TLS")


class _Flushable(Protocol):
    def flushNow(self) -> None: ...

    def abortConnection(self) -> None: ...


class EndOfTurn:
    """
    Calls C{flushNow} on everything added during a reactor turn, once, at
    the start of the next one (a single C{callLater(0)} for all of them),
    before the reactor polls again: as soon as a registered writer would
    have been told its socket is writable, without asking the kernel.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._pending: list[_Flushable] = []

    def add(self, writer: _Flushable) -> None:
        """Have C{writer.flushNow()} called at the end of this turn."""
        if not self._pending:
            self._reactor.callLater(0, self._flush)
        self._pending.append(writer)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for writer in pending:
            try:
                writer.flushNow()
            except Exception:
                # One writer's failure (a producer that raised on resume)
                # must not strand the bytes of every writer after it; the
                # connection itself ends, as the reactor would end it.
                _log.failure("Flushing writes failed")
                writer.abortConnection()


_turns: WeakKeyDictionary[Any, EndOfTurn] = WeakKeyDictionary()


def end_of_turn(reactor: Any) -> EndOfTurn:
    """The one L{EndOfTurn} of C{reactor}."""
    turn = _turns.get(reactor)
    if turn is None:
        turn = _turns[reactor] = EndOfTurn(reactor)
    return turn


class CoalescingServer(tcp.Server):
    """
    A TCP server transport whose writes wait for the end of the reactor
    turn and then go to the socket in one C{send}; see the module
    docstring.  Everything else, including what happens when the socket is
    full, is Twisted's own.

    Bytes written while earlier ones are still waiting for the socket, or
    once the connection is closing, go Twisted's usual way (after the
    bytes before them), so order is kept.
    """

    _queued = False
    # This reactor's EndOfTurn, found at the first write (a weak-keyed
    # lookup makes a weakref each time: once per connection, not per write).
    _turn: EndOfTurn | None = None

    def write(self, data: bytes) -> None:
        if self.TLS:
            tcp.Server.write(self, data)  # through the TLS layer startTLS added
            return
        if not isinstance(data, bytes):
            raise TypeError(f"Data must be bytes, not {type(data).__name__}")
        if not self.connected or self._writeDisconnected or self._aborting or not data:
            return
        untyped: Any = self  # FileDescriptor's methods carry no annotations
        self._tempDataBuffer.append(data)
        self._tempDataLen += len(data)
        untyped._maybePauseProducer()
        if self._queued:
            return
        if (
            self.offset < len(self.dataBuffer)
            or self.disconnecting
            or self._writeDisconnecting
        ):
            untyped.startWriting()
            return
        self._queued = True
        turn = self._turn
        if turn is None:
            turn = self._turn = end_of_turn(self.reactor)
        turn.add(self)

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        if self.TLS:
            tcp.Server.writeSequence(self, iovec)
            return
        self.write(b"".join(iovec))

    def flushNow(self) -> None:
        """Send what this turn's writes left, and hand any rest to Twisted."""
        self._queued = False
        if (
            not self.connected
            or self.disconnecting
            or self._writeDisconnecting
            or self._aborting
            or not self._tempDataLen
            or self.offset < len(self.dataBuffer)
        ):
            # Closing, or already registered with the reactor: its doWrite
            # sends what is left, then closes.
            return
        buffered = self._tempDataBuffer
        data = buffered[0] if len(buffered) == 1 else b"".join(buffered)
        self._tempDataBuffer = []
        self._tempDataLen = 0
        sent = self.writeSomeData(data)
        if type(sent) is int and sent == len(data):
            producer: Any = self.producer
            if producer is not None and (
                not self.streamingProducer or self.producerPaused
            ):
                self.producerPaused = False
                producer.resumeProducing()
            return
        # The kernel took part (or failed, which the reactor's own doWrite
        # then finds and reports as the connection's loss).
        self.dataBuffer = data
        self.offset = sent if type(sent) is int else 0
        untyped: Any = self
        untyped.startWriting()


def coalesce_port(port: object) -> object:
    """
    Make a listening TCP port hand its connections L{CoalescingServer}
    transports (C{Port.transport} names the class it builds them from).
    Anything that is not a plain Twisted TCP port is left as it is.
    Returns C{port}, for use as a L{Deferred} callback.
    """
    if isinstance(port, tcp.Port) and port.transport is tcp.Server:
        port.transport = CoalescingServer
    return port


def send_direct(transport: Any, data: bytes) -> None:
    """
    For a writer that gathers its bytes itself until the end of a turn (our
    upstream TLS): send C{data} to the socket of C{transport} now if Twisted
    holds nothing unsent for it; write what the kernel does not take (or
    everything, for a transport that is not a TCP connection) the usual way.
    """
    if (
        isinstance(transport, tcp.Connection)
        and transport.connected
        and not transport.disconnecting
        and not transport._writeDisconnecting
        and not transport._aborting
        and (transport.producer is None or transport.streamingProducer)
        and not transport._tempDataLen
        and transport.offset >= len(transport.dataBuffer)
    ):
        sent = transport.writeSomeData(data)
        if type(sent) is int:
            if sent == len(data):
                return
            data = data[sent:]
    transport.write(data)
