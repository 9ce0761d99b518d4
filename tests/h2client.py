"""
A small HTTP/2 client for the tests, on the C{h2} library, over real
loopback TLS (ALPN C{h2}) or cleartext with prior knowledge.  It can also
write hand-made frames, for the attacks.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
from hpack import Encoder
from hyperframe.frame import ContinuationFrame, Frame, HeadersFrame
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import optionsForClientTLS

reactor: Any = _reactor


class Response:
    def __init__(self) -> None:
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.ended = False
        self.reset: int | None = None
        self.done: Deferred[Response] = Deferred()

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    def _finish(self) -> None:
        if not self.done.called:
            self.done.callback(self)


class H2Client(Protocol):
    """
    @ivar autoWindow: Acknowledge response bytes at once; when false the
        test opens windows itself with L{openWindow}.
    """

    def __init__(self, autoWindow: bool = True) -> None:
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.autoWindow = autoWindow
        self.responses: dict[int, Response] = {}
        self.goaway: int | None = None
        self.closed: Deferred[None] = Deferred()
        self.settings: dict[int, int] = {}
        self.pings = 0
        self.received = 0
        self._buf = b""

    def connectionMade(self) -> None:
        self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        # The h2 library, as a client, refuses every frame after a GOAWAY,
        # even on streams the GOAWAY lets finish: keep GOAWAY frames from
        # it and note them here.
        buf = self._buf + data
        kept = []
        pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos : pos + 3], "big")
            if len(buf) - pos - 9 < length:
                break
            frame = buf[pos : pos + 9 + length]
            if frame[3] == 7:
                self.goaway = int.from_bytes(frame[13:17], "big")
            else:
                kept.append(frame)
            pos += 9 + length
        self._buf = buf[pos:]
        try:
            events = self.conn.receive_data(b"".join(kept))
        except h2.exceptions.ProtocolError:
            self.transport.loseConnection()
            return
        for event in events:
            response = self.responses.get(getattr(event, "stream_id", 0) or 0)
            if isinstance(event, h2.events.ResponseReceived) and response:
                for name, value in event.headers:
                    if name == b":status":
                        response.status = int(value)
                    else:
                        response.headers.append((name, value))
            elif isinstance(event, h2.events.DataReceived) and response:
                response.chunks.append(event.data)
                if self.autoWindow and event.flow_controlled_length:
                    self.conn.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            elif isinstance(event, h2.events.StreamEnded) and response:
                response.ended = True
                response._finish()
            elif isinstance(event, h2.events.StreamReset) and response:
                response.reset = event.error_code
                response._finish()
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                for code, change in event.changed_settings.items():
                    self.settings[int(code)] = change.new_value
            elif isinstance(event, h2.events.PingAckReceived):
                self.pings += 1
        self.flush()

    def connectionLost(self, reason: Any = None) -> None:
        for response in self.responses.values():
            response._finish()
        if not self.closed.called:
            self.closed.callback(None)

    def send(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
        body: bytes | None = None,
        end: bool = True,
        authority: str = "app.test",
    ) -> Response:
        """Open a stream; with C{end} false the body stays open."""
        streamID = self.conn.get_next_available_stream_id()
        response = Response()
        self.responses[streamID] = response
        head = [
            (b":method", method.encode()),
            (b":scheme", b"https"),
            (b":authority", authority.encode()),
            (b":path", path.encode("latin-1")),
        ] + [(n.encode(), v.encode("latin-1")) for n, v in headers]
        self.conn.send_headers(streamID, head, end_stream=end and not body)
        if body:
            self.conn.send_data(streamID, body, end_stream=end)
        self.flush()
        response.streamID = streamID  # type: ignore[attr-defined]
        return response

    def sendData(self, streamID: int, data: bytes, end: bool = False) -> None:
        self.conn.send_data(streamID, data, end_stream=end)
        self.flush()

    def reset(self, streamID: int) -> None:
        self.conn.reset_stream(streamID)
        self.flush()

    def openWindow(self, streamID: int, size: int) -> None:
        self.conn.acknowledge_received_data(size, streamID)
        self.flush()

    def writeFrames(self, *frames: Frame) -> None:
        self.transport.write(b"".join(f.serialize() for f in frames))

    async def get(self, path: str, **kwargs: Any) -> Response:
        return await within(self.send("GET", path, **kwargs).done)


def within(d: Deferred[Any], seconds: float = 10.0) -> Deferred[Any]:
    return d.addTimeout(seconds, reactor)


async def connect_h2(
    port: int, ca: Any = None, autoWindow: bool = True, tls: bool = True
) -> H2Client:
    """A client over TLS trusting C{ca} (ALPN h2 only), or h2c."""
    from twisted.internet.ssl import Certificate

    client = H2Client(autoWindow)
    endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    if tls:
        options = optionsForClientTLS(
            "localhost",
            trustRoot=Certificate.loadPEM(ca.cert_pem.bytes()),
            acceptableProtocols=[b"h2"],
        )
        endpoint = wrapClientTLS(options, endpoint)
    await connectProtocol(endpoint, client)
    return client


def headers_block(
    headers: list[tuple[bytes, bytes]], encoder: Encoder | None = None
) -> bytes:
    return (encoder or Encoder()).encode(headers)


def request_headers(path: bytes = b"/__clerk/v1/client") -> list[tuple[bytes, bytes]]:
    return [
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"app.test"),
        (b":path", path),
    ]


def headers_frame(
    streamID: int, block: bytes, end_headers: bool = True, end_stream: bool = True
) -> HeadersFrame:
    frame = HeadersFrame(streamID)
    frame.data = block
    if end_headers:
        frame.flags.add("END_HEADERS")
    if end_stream:
        frame.flags.add("END_STREAM")
    return frame


def continuation_frame(
    streamID: int, block: bytes, end_headers: bool = False
) -> ContinuationFrame:
    frame = ContinuationFrame(streamID)
    frame.data = block
    if end_headers:
        frame.flags.add("END_HEADERS")
    return frame
