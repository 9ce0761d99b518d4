"""
TLS to FAPI with the standard library's C{ssl} module.

Twisted's TLS (C{TLSMemoryBIOProtocol} on pyOpenSSL) spends a sixth of the
proxy's CPU per request in Python: each read goes through several layers
of wrappers, and every pyOpenSSL call that has nothing to give raises an
exception.  C{ssl.SSLObject} does the same work over memory buffers in C.
L{UpstreamTLS} sits between the TCP transport and the protocol above it
(L{clerkproxy._client.UpstreamConnection}), and is that protocol's
transport: each TCP read becomes at most one C{dataReceived} above, and
the bytes written above during a reactor turn leave in one C{send} at its
end (L{clerkproxy._tcp_compat.send_direct}).

Verification is OpenSSL's own: C{CERT_REQUIRED} and the host name (or IP
address) checked against the certificate, by L{ssl.SSLContext}'s
C{check_hostname}.  A handshake that fails, for any reason, ends the
connection with that C{ssl.SSLError} as the reason the protocol above is
given.

States: I{handshaking} (bytes written above are held), I{open},
I{closing} (after C{loseConnection} or C{abortConnection}: writes are
dropped) and I{lost}.  The protocol above is connected as soon as TCP
is, as Twisted's TLS does, so that a connection attempt and its handshake
share the connect deadline of whoever waits for it.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IConsumer,
    IProtocol,
    IProtocolFactory,
    IPushProducer,
    IStreamClientEndpoint,
    ITransport,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from zope.interface import implementer

from ._tcp_compat import end_of_turn, send_direct
from ._twisted_compat import is_platform_trust, trust_root_pems

if TYPE_CHECKING:
    from ._twisted_compat import IOpenSSLTrustRoot

__all__ = ["UpstreamTLS", "UpstreamTLSEndpoint", "client_context"]

#: The most plaintext taken from the TLS object in one call: a record's.
_READ = 65536


def client_context(trustRoot: IOpenSSLTrustRoot | None) -> ssl.SSLContext | None:
    """
    A client context that verifies a server's certificate chain and name
    against C{trustRoot} (the platform's roots for L{None}), speaks TLS 1.2
    or 1.3 and offers only C{http/1.1} by ALPN.  L{None} for a kind of
    trust root whose certificates cannot be read back (the caller then
    uses Twisted's TLS instead).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, names checked
    if trustRoot is None or is_platform_trust(trustRoot):
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        pems = trust_root_pems(trustRoot)
        if pems is None:
            return None
        if pems:
            context.load_verify_locations(cadata=pems.decode("ascii"))
        # else: no roots at all, so no certificate verifies, as with
        # Twisted's TLS and the same empty root.
    # The name must be in a subjectAltName, as service_identity (Twisted's
    # TLS) requires; a certificate's common name alone does not count.
    context.hostname_checks_common_name = False
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(["http/1.1"])
    return context


@implementer(ITransport, IConsumer, IPushProducer)
class UpstreamTLS(Protocol):
    """
    The TLS layer of one connection to FAPI: a protocol to the TCP
    transport below it, a transport to C{wrapped} above it.  See the module
    docstring.

    @ivar wrapped: The protocol above.
    """

    def __init__(
        self, context: ssl.SSLContext, hostname: str, wrapped: IProtocol, reactor: Any
    ) -> None:
        self.wrapped = wrapped
        self._context = context
        self._hostname = hostname
        self._turn = end_of_turn(reactor)
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls: ssl.SSLObject | None = None
        self._open = False
        self._closing = False
        self._lost = False
        self._queued = False
        self._held: list[bytes] = []
        self._failure: Failure | None = None
        self._peerClosed = False
        # A request body's producer, paused while its bytes wait for the
        # handshake (so that a handshake FAPI stalls holds one read of
        # them, not the whole body).
        self._producer: Any = None
        self._heldPaused = False

    # -- below: the TCP connection ---------------------------------------------

    def connectionMade(self) -> None:
        self._tls = self._context.wrap_bio(
            self._incoming, self._outgoing, server_hostname=self._hostname
        )
        self.wrapped.makeConnection(self)
        if not self._closing:
            self._handshake()

    def dataReceived(self, data: bytes) -> None:
        tls = self._tls
        if tls is None or self._lost or self._failure is not None:
            return
        incoming = self._incoming
        incoming.write(data)
        if not self._open and not self._handshake():
            return
        chunks: list[bytes] = []
        error: ssl.SSLError | None = None
        while True:
            try:
                chunk = tls.read(_READ)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            except ssl.SSLError as e:
                error = e  # after what was read before it, which is sound
                break
            if not chunk:
                self._peerClosed = True  # close_notify: the server is done
                break
            chunks.append(chunk)
            if not incoming.pending:
                # Every byte received went into the record just read (one
                # read takes a whole record, _READ being over 2**14): skip
                # the exception a further read would raise.
                break
        if self._outgoing.pending:
            self._flushSoon()  # a key update or an alert to answer
        deliver = bool(chunks) and not self._closing
        if error is not None:
            # Before the sound bytes go up: what they set off (the pool
            # handing this connection to the next request) must find it
            # broken, and write nothing into it.
            self._failure = Failure(error)
        if deliver:
            data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self.wrapped.dataReceived(data)
        if error is not None:
            if not self._lost and not self._closing:
                self._fail(error)
        elif self._peerClosed:
            self.loseConnection()  # answer close_notify with ours, and close

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._lost:
            return
        self._lost = True
        self._held = []
        if self._failure is not None:
            reason = self._failure
        elif (
            self._open
            and not self._peerClosed
            and not self._closing
            and reason.check(ConnectionDone)
        ):
            # TCP ended without the server's close_notify: whatever was
            # being read may have been cut short by anyone on the path.
            reason = Failure(ConnectionLost("FAPI's TLS ended without close_notify"))
        self.wrapped.connectionLost(reason)

    def _handshake(self) -> bool:
        """Take the handshake a step further; whether it is complete."""
        tls = self._tls
        assert tls is not None
        try:
            tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flushSoon()
            return False
        except ssl.SSLError as e:
            self._fail(e)
            return False
        self._open = True
        held, self._held = self._held, []
        for data in held:
            tls.write(data)
        self._flushSoon()
        if self._heldPaused:
            self._heldPaused = False
            self._producer.resumeProducing()
        return True

    def _fail(self, error: ssl.SSLError) -> None:
        """
        End the connection because TLS failed; the protocol above hears of
        C{error}.  Whatever TLS has to say about it (an alert) goes first.
        """
        self._failure = Failure(error)
        self._closing = True
        transport: Any = self.transport
        alert = self._outgoing.read()
        if alert:
            transport.write(alert)
        transport.loseConnection()

    def _flushSoon(self) -> None:
        if not self._queued:
            self._queued = True
            self._turn.add(self)

    def flushNow(self) -> None:
        """Send what TLS has produced this turn (see L{EndOfTurn})."""
        self._queued = False
        data = self._outgoing.read()
        if data and not self._closing and not self._lost:
            # (A polite close sends what is left itself; an abort, nothing.)
            send_direct(self.transport, data)

    # -- above: ITransport for the protocol ----------------------------------

    def write(self, data: bytes) -> None:
        if self._closing or self._lost or self._failure is not None or not data:
            return
        tls = self._tls
        if not self._open or tls is None:
            self._held.append(data)
            if self._producer is not None and not self._heldPaused:
                self._heldPaused = True
                self._producer.pauseProducing()
            return
        try:
            tls.write(data)
        except ssl.SSLError as e:
            self._fail(e)  # the TLS connection broke: the protocol above hears
            return
        self._flushSoon()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Say close_notify (once the handshake is done), then close TCP."""
        if self._closing or self._lost:
            return
        self._closing = True
        self._held = []
        transport: Any = self.transport
        tls = self._tls
        if self._open and tls is not None:
            try:
                tls.unwrap()
            except (ssl.SSLError, OSError):
                pass  # the server's close_notify is not awaited
        data = self._outgoing.read()
        if data:
            transport.write(data)
        transport.loseConnection()

    def abortConnection(self) -> None:
        if self._lost:
            return
        self._closing = True
        self._held = []
        transport: Any = self.transport
        transport.abortConnection()

    def getPeer(self) -> Any:
        transport: Any = self.transport
        return transport.getPeer()

    def getHost(self) -> Any:
        transport: Any = self.transport
        return transport.getHost()

    # IConsumer: a request body's producer is paused while FAPI's socket is
    # full, which the TCP transport below knows.

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        transport: Any = self.transport
        transport.registerProducer(producer, streaming)
        self._producer = producer if streaming else None
        if self._held and self._producer is not None:
            self._heldPaused = True
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self._producer = None
        self._heldPaused = False
        transport: Any = self.transport
        transport.unregisterProducer()

    # IPushProducer: the protocol above pauses FAPI while its client is slow.

    def pauseProducing(self) -> None:
        transport: Any = self.transport
        transport.pauseProducing()

    def resumeProducing(self) -> None:
        transport: Any = self.transport
        transport.resumeProducing()

    def stopProducing(self) -> None:
        self.abortConnection()


class _UpstreamTLSFactory(Factory):
    """Builds an L{UpstreamTLS} around each protocol C{factory} builds."""

    noisy = False

    def __init__(self, endpoint: UpstreamTLSEndpoint, factory: IProtocolFactory):
        self._endpoint = endpoint
        self._factory = factory

    def buildProtocol(self, addr: Any) -> UpstreamTLS | None:
        wrapped = self._factory.buildProtocol(addr)
        if wrapped is None:
            return None
        end = self._endpoint
        return UpstreamTLS(end.context, end.hostname, wrapped, end.reactor)


@implementer(IStreamClientEndpoint)
class UpstreamTLSEndpoint:
    """
    Connects through C{inner} (a TCP endpoint) and speaks TLS over it with
    L{UpstreamTLS}; the L{Deferred} from L{connect} fires with the protocol
    C{factory} built, like Twisted's C{wrapClientTLS}.
    """

    def __init__(
        self,
        reactor: Any,
        inner: IStreamClientEndpoint,
        context: ssl.SSLContext,
        hostname: str,
    ) -> None:
        self.reactor = reactor
        self.context = context
        self.hostname = hostname
        self._inner = inner

    def connect(self, factory: IProtocolFactory) -> Any:
        connecting: Deferred[Any] = self._inner.connect(
            _UpstreamTLSFactory(self, factory)
        )
        return connecting.addCallback(_wrapped)


def _wrapped(tls: UpstreamTLS) -> IProtocol:
    return tls.wrapped
