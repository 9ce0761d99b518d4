"""
A lean HTTP/1.1 client connection to FAPI, one exchange at a time.

Twisted's C{HTTP11ClientProtocol} is correct but costly per request: a
parser object, a response object, a transport proxy, half a dozen
L{Deferred}s, and a pause and resume of the socket around every response
head.  This protocol is glue: it writes request heads and bodies, feeds
what it reads to a L{ResponseReader} (which does all the parsing, see
C{_reader.py}), tells its L{IExchange} directly about what the reader
found, and is the push producer the client's request pauses when the
browser reads slowly.  It knows nothing of the pool that owns it: it
reports through three callbacks (Twisted's C{quiescentCallback} pattern).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.protocol import connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from ._reader import DATA, HEAD, NEED_DATA, ResponseReader, UpstreamProtocolError
from ._sockets import tcp_transport
from ._twisted_compat import write_now

__all__ = ["IExchange", "UpstreamConnection", "UpstreamProtocolError"]


class IExchange(Protocol):
    """What a connection tells the exchange it is serving.  Each exchange
    hears C{responseStarted} at most once, then any number of
    C{responseData}, then exactly one of C{responseDone} or
    C{upstreamFailed}, unless it aborts the connection first (after which
    it hears nothing)."""

    def responseStarted(
        self,
        code: int,
        phrase: bytes,
        headers: dict[bytes, list[bytes]],
        length: int | None,
        connection: dict[bytes, list[bytes]],
    ) -> None:
        """
        FAPI's final response head arrived.

        @param headers: The end-to-end fields, by canonical name.
        @param length: The body length if C{Content-Length} frames it.
        @param connection: The hop-by-hop framing fields.
        """

    def responseData(self, data: bytes) -> None:
        """Body bytes, framing removed."""

    def responseDone(self) -> None:
        """The response is complete.  The connection has already gone
        back to its owner (or is closing): never touch it again."""

    def upstreamFailed(self, reason: Failure, nothingReceived: bool) -> None:
        """
        The exchange failed: connection lost, or FAPI's answer refused
        (L{UpstreamProtocolError}).

        @param nothingReceived: Not one byte of an answer arrived, so a
            request that is safe to repeat may be retried elsewhere.
        """


ConnectionCallback = Callable[["UpstreamConnection"], None]


def _ignore(connection: UpstreamConnection) -> None:
    pass


# The connection's states; see UpstreamConnection.
IDLE = "IDLE"
SENDING = "SENDING"
AWAITING_HEAD = "AWAITING_HEAD"
RELAYING = "RELAYING"
RELAYING_WHILE_SENDING = "RELAYING_WHILE_SENDING"
CLOSING = "CLOSING"
LOST = "LOST"

_UPLOADING = (SENDING, RELAYING_WHILE_SENDING)
_READING = (SENDING, AWAITING_HEAD, RELAYING, RELAYING_WHILE_SENDING)


@implementer(IPushProducer)
class UpstreamConnection(TwistedProtocol):
    """
    One persistent connection to FAPI.

    Its state is C{_state}, one of:

     - C{IDLE}: connected, no request outstanding.  Bytes from FAPI now are
       out of step: the connection is aborted.
     - C{SENDING}: a request head went out, its body is still being written
       (L{writeBody}), no response head yet.
     - C{AWAITING_HEAD}: the request is all sent; waiting for the head.
     - C{RELAYING}: the head arrived and a body follows.
     - C{RELAYING_WHILE_SENDING}: FAPI answered before the request body
       ended (an early 413, say); its body is being relayed.
     - C{CLOSING}: closed by us (politely or aborted); waiting for the
       transport to say it is gone.  Bytes read now are ignored.
     - C{LOST}: the transport is gone.  Final.

    Transitions, with the callback each makes:

     - C{IDLE} -> C{SENDING} or C{AWAITING_HEAD}: L{send}, with or
       without a body to follow.
     - C{SENDING} -> C{AWAITING_HEAD}: L{endBody}.
     - C{RELAYING_WHILE_SENDING} -> C{RELAYING}: L{endBody}.
     - C{SENDING} -> C{RELAYING_WHILE_SENDING}, C{AWAITING_HEAD} ->
       C{RELAYING}: a head with a body arrived; C{responseStarted}.  If
       the read that brought the head ends with the body still to come,
       C{onRelaying}.  (Most answers arrive whole in one read: they go
       from waiting straight back to idle as far as the owner can tell,
       and a queued request can take the connection itself.)
     - C{SENDING}, no change of state: L{pacedByClient}, the exchange
       streams a request body at its client's pace; C{onRelaying}.
       Either way the owner hears C{onRelaying} at most once a request.
     - C{AWAITING_HEAD} or C{RELAYING} -> C{IDLE}: the response ended and
       the connection can take another request (FAPI keeps it alive, and
       no byte beyond the response arrived); C{onIdle}, then
       C{responseDone}.
     - any reading state -> C{CLOSING}: the response ended but the
       connection cannot be reused; then C{responseDone}.  If FAPI said
       it closes (C{Connection: close}, HTTP/1.0), the transport is closed
       politely; if it is out of step (it sent bytes beyond the response,
       or answered before the request body ended), it is aborted.
     - any reading state -> C{CLOSING}: a protocol error; the transport is
       aborted, then C{upstreamFailed}.
     - any state -> C{CLOSING}: L{abort} (the exchange gave up; it is not
       told), or L{close}/L{closed} from C{IDLE}.
     - any state -> C{LOST}: the transport is gone: a close-delimited body
       ends (C{responseDone}), or the exchange, if any, hears
       C{upstreamFailed}; then C{onLost}.

    Apart from the state, a connection holds data, not decisions: the
    exchange served, the reader, whether the request body is chunked, and
    whether a producer is registered on the transport.

    @ivar reused: Whether this connection served an earlier request (set
        by its owner when it hands it out).
    @ivar idleSince: When it last went idle (set by its owner).
    """

    reused = False
    idleSince = 0.0

    def __init__(
        self,
        onIdle: ConnectionCallback = _ignore,
        onLost: ConnectionCallback = _ignore,
        onRelaying: ConnectionCallback = _ignore,
    ) -> None:
        """
        @param onIdle: Called when the connection can take another request.
        @param onLost: Called once, when the transport is gone.
        @param onRelaying: Called once the rest of a request's exchange is
            paced by a client rather than by FAPI: a response body turns
            out to span more than one read, or a request body streams from
            the client (L{pacedByClient}).  The connection leaves its
            pool's cap.  At most once a request.
        """
        self._onIdle = onIdle
        self._onLost = onLost
        self._onRelaying = onRelaying
        self._state = IDLE
        self._exchange: IExchange | None = None
        self._reader = ResponseReader()
        self._chunked = False
        self._producing = False
        self._paced = False
        self._closedWaiters: list[Deferred[None]] = []

    def connectionMade(self) -> None:
        # Request heads and body chunks are written as they come: do not let
        # Nagle hold one back for the previous one's ACK.
        tcp = tcp_transport(self.transport)
        if tcp is not None:
            tcp.setTcpNoDelay(True)

    @property
    def state(self) -> str:
        """The current state (see the class docstring)."""
        return self._state

    @property
    def idle(self) -> bool:
        """Whether a request can be sent now."""
        return self._state is IDLE

    # -- request --------------------------------------------------------------

    def send(
        self,
        exchange: IExchange,
        head: bytes,
        isHead: bool,
        body: int | None,
        producer: IPushProducer | None = None,
    ) -> None:
        """
        Write a request head and start waiting for the answer.

        @param body: C{None} for no body, C{-1} for a chunked body, else the
            byte count; bytes follow through L{writeBody} and L{endBody}.
        @param producer: Paused while FAPI's socket is full, during the body.
        """
        if self._state is not IDLE:
            raise RuntimeError(f"send() on a connection in state {self._state}")
        self._exchange = exchange
        self._reader.start(isHead)
        self._chunked = body == -1
        self._paced = False
        self._state = AWAITING_HEAD if body is None else SENDING
        transport: Any = self.transport
        if body is None:
            # The whole request: under Twisted's TLS (the fallback for
            # unusual trust roots) send it now, not on the next reactor
            # turn; UpstreamTLS sends it at the end of this one.
            write_now(transport, head)
        else:
            transport.write(head)
        if producer is not None and body is not None:
            self._producing = True
            transport.registerProducer(producer, True)

    def writeBody(self, data: bytes) -> None:
        """Write request body bytes (ignored unless a body is being sent)."""
        if self._state not in _UPLOADING:
            return
        transport: Any = self.transport
        if self._chunked:
            transport.writeSequence((b"%x\r\n" % len(data), data, b"\r\n"))
        else:
            transport.write(data)

    def pacedByClient(self) -> None:
        """
        The request body streams from here at its client's pace: tell the
        owner (C{onRelaying}), as for a response body relayed to a client.
        """
        if not self._paced and self._state in _UPLOADING:
            self._paced = True
            self._onRelaying(self)

    def endBody(self) -> None:
        """The request body is complete."""
        state = self._state
        if state is SENDING:
            self._state = AWAITING_HEAD
        elif state is RELAYING_WHILE_SENDING:
            self._state = RELAYING
        else:
            return
        transport: Any = self.transport
        if self._chunked:
            transport.write(b"0\r\n\r\n")
        self._stopProducer(transport)

    def _stopProducer(self, transport: Any) -> None:
        if self._producing:
            self._producing = False
            transport.unregisterProducer()

    # -- IPushProducer, for the client's request -------------------------------

    def pauseProducing(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.pauseProducing()

    def resumeProducing(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abort()

    # -- ending ---------------------------------------------------------------

    def close(self) -> None:
        """Close politely, if idle (a connection in use is left alone)."""
        if self._state is IDLE:
            self._state = CLOSING
            transport: Any = self.transport
            transport.loseConnection()

    def closed(self) -> Deferred[None]:
        """Close politely (if idle); fires once the connection is gone."""
        done: Deferred[None] = Deferred()
        if self._state is LOST:
            done.callback(None)
            return done
        self._closedWaiters.append(done)
        self.close()
        return done

    def abort(self) -> None:
        """
        Drop the connection now.  The exchange it served is not told: the
        caller is that exchange, or has already dealt with it.
        """
        self._exchange = None
        if self._state is LOST:
            return
        self._state = CLOSING
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    # -- response -------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        state = self._state
        if state not in _READING:
            if state is IDLE:
                self.abort()  # bytes nobody asked for: out of step
            return
        reader = self._reader
        reader.feed(data)
        relayStarted = False
        while True:
            try:
                event = reader.next()
            except UpstreamProtocolError as e:
                self._fail(e)
                return
            if event is DATA:
                exchange: Any = self._exchange
                exchange.responseData(reader.data)
            elif event is NEED_DATA:
                if relayStarted and not self._paced:
                    # The body outlasts the read that brought the head.
                    self._paced = True
                    self._onRelaying(self)
                return
            elif event is HEAD:
                head: Any = reader.head
                if not head.bodyless:
                    relayStarted = True
                    self._state = (
                        RELAYING_WHILE_SENDING if self._state is SENDING else RELAYING
                    )
                exchange = self._exchange
                exchange.responseStarted(
                    head.code, head.phrase, head.headers, head.length, head.connection
                )
            else:
                self._responseEnded()
                return
            if self._state is CLOSING:
                return  # the exchange aborted the connection

    def _responseEnded(self) -> None:
        exchange, self._exchange = self._exchange, None
        head: Any = self._reader.head
        transport: Any = self.transport
        uploading = self._state in _UPLOADING
        if uploading:
            self._stopProducer(transport)
        transport.resumeProducing()  # in case a slow client paused us last
        if uploading or self._reader.leftover:
            # FAPI answered before the body was all sent, or sent more than
            # its answer: FAPI and we disagree on where the next request
            # would start.  Out of step, it may not answer a polite TLS
            # close either, and this connection must not linger.
            self._state = CLOSING
            transport.abortConnection()
        elif head.keepAlive:
            # Back to the owner first, so that a request the answer unblocks
            # (a pipelined one, a queued one) can take this very connection.
            self._state = IDLE
            self._onIdle(self)
        else:
            self._state = CLOSING
            transport.loseConnection()  # FAPI said it closes: it will
        if exchange is not None:
            exchange.responseDone()

    def _fail(self, error: Exception) -> None:
        exchange = self._exchange
        self.abort()
        if exchange is not None:
            exchange.upstreamFailed(Failure(error), False)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        exchange, self._exchange = self._exchange, None
        state, self._state = self._state, LOST
        closedWaiters, self._closedWaiters = self._closedWaiters, []
        for done in closedWaiters:
            done.callback(None)
        if exchange is not None:
            if (
                state in (RELAYING, RELAYING_WHILE_SENDING)
                and reason.check(ConnectionDone) is not None
                and self._reader.eof()
            ):
                # A body that runs until FAPI closes ends here, if FAPI
                # closed cleanly (a reset, or TLS without close_notify,
                # may have cut it short: the client must see a cut).
                exchange.responseDone()
            else:
                exchange.upstreamFailed(
                    reason,
                    state in (SENDING, AWAITING_HEAD) and not self._reader.received,
                )
        self._onLost(self)
