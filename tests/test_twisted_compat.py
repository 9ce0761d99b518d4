"""
One pin per private Twisted name in clerkproxy._twisted_compat: each test
fails, by name, if a Twisted upgrade moves or changes what we rely on.
"""

from __future__ import annotations

import inspect
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.internet.defer import fail
from twisted.internet.testing import StringTransport
from twisted.web import http
from twisted.web.http_headers import Headers

from clerkproxy import _twisted_compat as compat
from clerkproxy._channel import StreamingChannel


def _channel_seeing(head: bytes) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    class Probe(http.Request):
        def gotLength(self, length: int | None) -> None:
            seen["line"] = compat.request_line(self.channel)
            seen["version"] = compat.request_version(self.channel)
            http.Request.gotLength(self, length)

    channel = http.HTTPChannel()
    channel.requestFactory = Probe  # type: ignore[assignment]
    channel.makeConnection(StringTransport())
    channel.dataReceived(head)
    return seen


def test_request_line_command_path_version() -> None:
    """HTTPChannel._command, _path and _version hold the request line at
    gotLength time."""
    seen = _channel_seeing(b"PATCH /p?q HTTP/1.1\r\nContent-Length: 1\r\n\r\n")
    assert seen["line"] == (b"PATCH", b"/p?q", b"HTTP/1.1")


def test_request_version() -> None:
    """HTTPChannel._version, read while the headers are parsed."""
    seen = _channel_seeing(b"GET / HTTP/1.0\r\nContent-Length: 1\r\n\r\n")
    assert seen["version"] == b"HTTP/1.0"


def _signature(name: str) -> list[str]:
    return list(inspect.signature(getattr(http.HTTPChannel, name)).parameters)


def test_maybe_choose_transfer_decoder() -> None:
    """Overridden by StreamingChannel; Twisted calls it per header."""
    assert "_maybeChooseTransferDecoder" in compat.CHANNEL_OVERRIDES
    assert _signature("_maybeChooseTransferDecoder") == ["self", "header", "data"]
    assert "_maybeChooseTransferDecoder" in StreamingChannel.__dict__


def test_fail_choose_transfer_decoder() -> None:
    """Called by StreamingChannel to refuse a transfer coding with 400."""
    assert "_failChooseTransferDecoder" in compat.CHANNEL_OVERRIDES
    assert _signature("_failChooseTransferDecoder") == ["self"]
    channel = http.HTTPChannel()
    transport = StringTransport()
    channel.makeConnection(transport)
    assert channel._failChooseTransferDecoder() is False
    assert transport.value().startswith(b"HTTP/1.1 400 ")


def test_send_100_continue() -> None:
    """Overridden by StreamingChannel; Twisted calls it for Expect."""
    assert "_send100Continue" in compat.CHANNEL_OVERRIDES
    assert _signature("_send100Continue") == ["self"]
    assert "_send100Continue" in StreamingChannel.__dict__
    channel = http.HTTPChannel()
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(
        b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
        b"Content-Length: 5\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 100 Continue\r\n")


def test_headers_raw_headers() -> None:
    """Headers._rawHeaders: a dict of canonical names to lists of values."""
    headers = compat.headers_from_raw({b"Content-Type": [b"a", b"b"]})
    assert headers.getRawHeaders(b"content-type") == [b"a", b"b"]
    assert list(headers.getAllRawHeaders()) == [(b"Content-Type", [b"a", b"b"])]
    plain = Headers({b"x-y": [b"1"]})
    assert plain._rawHeaders == {b"X-Y": [b"1"]}


def test_name_encoder() -> None:
    """http_headers._nameEncoder.encode canonicalises a header name."""
    assert compat.encode_header_name(b"clerk-proxy-url") == b"Clerk-Proxy-Url"
    assert compat.encode_header_name("x-forwarded-for") == b"X-Forwarded-For"


def test_endpoints_parse() -> None:
    """endpoints._parse splits a description with Twisted's escaping."""
    assert compat.parse_endpoint_description("tcp:80:interface=\\:\\:1") == (
        ["tcp", "80"],
        {"interface": "::1"},
    )


def test_ssl_trust_root_interface() -> None:
    """_sslverify.IOpenSSLTrustRoot, the type trustRootFromCertificates
    returns (used in annotations only)."""
    from twisted.internet._sslverify import IOpenSSLTrustRoot
    from twisted.internet.ssl import platformTrust

    assert IOpenSSLTrustRoot.providedBy(platformTrust())


def test_raise_synchronously() -> None:
    """StreamServerEndpointService._raiseSynchronously makes a listening
    failure raise from startService."""

    class Failing:
        def listen(self, factory: object) -> Any:
            return fail(OSError("in use"))

    service = StreamServerEndpointService(Failing(), object())  # type: ignore[arg-type]
    compat.raise_synchronously(service)
    try:
        service.startService()
    except OSError as e:
        assert str(e) == "in use"
    else:
        raise AssertionError("startService did not raise")


def test_chunked_transfer_decoder() -> None:
    """_ChunkedTransferDecoder: the size-line step StreamingChannel's
    subclass wraps, and the buffer it reads the digits from."""
    assert compat.DECODER_OVERRIDES == ("_buffer", "_dataReceived_CHUNK_LENGTH")
    got: list[bytes] = []
    decoder = compat.ChunkedTransferDecoder(got.append, got.append)
    decoder._buffer += b"5;x=y\r\nhello"
    assert decoder._dataReceived_CHUNK_LENGTH() is True
    assert decoder.length == 5 and bytes(decoder._buffer) == b"hello"
    decoder = compat.ChunkedTransferDecoder(got.append, got.append)
    decoder._buffer += b"5"
    assert decoder._dataReceived_CHUNK_LENGTH() is False


def test_replace_chunked_decoder() -> None:
    """HTTPChannel._transferDecoder holds the body decoder once the
    Transfer-Encoding header is read."""
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    made: list[Any] = []

    class Mine(compat.ChunkedTransferDecoder):  # type: ignore[misc]
        pass

    def make(data: Any, finish: Any) -> Any:
        made.append(Mine(data, finish))
        return made[-1]

    channel.dataReceived(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n")
    channel.dataReceived(b"X: y\r\n")  # Twisted reads a header at the next line
    compat.replace_chunked_decoder(channel, make)
    assert made and channel._transferDecoder is made[0]
    compat.replace_chunked_decoder(channel, make)  # ours already: left alone
    assert len(made) == 1
    request = channel.requests[-1]
    channel.dataReceived(b"\r\n3\r\nabc\r\n0\r\n\r\n")
    request.content.seek(0)
    assert request.content.read() == b"abc"


def test_no_other_module_imports_private_twisted_names() -> None:
    """Private Twisted names come in through _twisted_compat only, and
    production code never uses Twisted's test doubles."""
    import ast
    from pathlib import Path

    import clerkproxy

    package = Path(clerkproxy.__file__).parent
    offenders = []
    for path in sorted(package.glob("*.py")):
        if path.name.endswith("_compat.py"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "twisted"
            ):
                module = node.module or ""
                names = [alias.name for alias in node.names]
                if (
                    any(part.startswith("_") for part in module.split("."))
                    or any(name.startswith("_") for name in names)
                    or module
                    in ("twisted.internet.testing", "twisted.test.proto_helpers")
                ):
                    offenders.append(f"{path.name}: from {module} import {names}")
    assert offenders == []


def test_clear_tls_options() -> None:
    """CertificateOptions keeps the OpenSSL options it sets in _options."""
    from OpenSSL import SSL
    from twisted.internet.ssl import CertificateOptions

    options = CertificateOptions()
    assert options._options & SSL.OP_CIPHER_SERVER_PREFERENCE
    compat.clear_tls_options(options, SSL.OP_CIPHER_SERVER_PREFERENCE)
    context = options.getContext()
    assert not context.set_options(0) & SSL.OP_CIPHER_SERVER_PREFERENCE


def test_write_buffered() -> None:
    """FileDescriptor.dataBuffer, offset and _tempDataLen: what a socket
    transport has not sent yet, found under wrapping transports."""
    from twisted.internet.abstract import FileDescriptor
    from twisted.internet.testing import MemoryReactor

    class Socket(FileDescriptor):
        taking = 0

        def writeSomeData(self, data: bytes) -> int:
            taken = min(len(data), self.taking)
            self.taking -= taken
            return taken

    class Wrapper:  # what TLSMemoryBIOProtocol and HAProxy wrappers look like
        def __init__(self, transport: object) -> None:
            self.transport = transport

    socket = Socket(MemoryReactor())
    socket.connected = True
    assert compat.write_buffered(Wrapper(Wrapper(socket))) == 0
    socket.write(b"a" * 100)
    socket.writeSequence([b"b" * 50])
    assert compat.write_buffered(socket) == 150
    socket.taking = 30
    socket.doWrite()
    assert compat.write_buffered(Wrapper(socket)) == 120
    socket.write(b"c" * 10)
    assert compat.write_buffered(socket) == 130
    assert compat.write_buffered(StringTransport()) is None
    assert compat.write_buffered(None) is None


def test_write_now(monkeypatch: Any) -> None:
    """Twisted's TLS transport holds small writes in _aggregator until a
    callLater(0); write_now flushes what it holds and writes at once."""
    from twisted.internet.protocol import Factory, Protocol
    from twisted.internet.ssl import optionsForClientTLS
    from twisted.internet.task import Clock
    from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol

    sent: list[bytes] = []
    monkeypatch.setattr(
        TLSMemoryBIOProtocol, "write", lambda self, data: sent.append(data)
    )
    clock = Clock()
    factory = TLSMemoryBIOFactory(
        optionsForClientTLS("example.com"),
        True,
        Factory.forProtocol(Protocol),
        clock=clock,
    )
    transport = factory.buildProtocol(None)
    transport.write(b"held ")
    assert sent == [] and clock.getDelayedCalls()  # aggregated, flushed later
    compat.write_now(transport, b"now")
    assert sent == [b"held ", b"now"]
    clock.advance(0)
    assert sent == [b"held ", b"now"]


def test_write_blocked() -> None:
    """HTTPChannel._waitingForTransport: set while its transport has paused
    it, whatever producer registers meanwhile."""
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    assert compat.write_blocked(channel) is False
    channel.pauseProducing()
    assert compat.write_blocked(channel) is True
    channel.resumeProducing()
    assert compat.write_blocked(channel) is False


def test_set_request_line() -> None:
    """HTTPChannel._command, _path and _version are where Twisted's
    allContentReceived reads the request line from (and deletes it)."""
    seen: list[tuple[bytes, bytes, bytes]] = []

    class Probe(http.Request):
        def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
            seen.append((command, path, version))

    channel = http.HTTPChannel()
    channel.requestFactory = Probe  # type: ignore[assignment]
    channel.makeConnection(StringTransport())
    channel.requests.append(Probe(channel))
    compat.set_request_line(channel, b"GET", b"/p", b"HTTP/1.1")
    assert compat.request_line(channel) == (b"GET", b"/p", b"HTTP/1.1")
    channel.allContentReceived()
    assert seen == [(b"GET", b"/p", b"HTTP/1.1")]
    assert not hasattr(channel, "_command")


def test_start_head_and_end_head() -> None:
    """LineReceiver's line_mode, _buffer, _busyReceiving and paused, and
    HTTPChannel's _handlingRequest and _transferDecoder: a channel takes a
    head from its first byte only when all say it waits for one, and
    while _busyReceiving is set, dataReceived only appends to _buffer."""
    channel = http.HTTPChannel()
    channel.makeConnection(StringTransport())
    assert compat.start_head(channel)
    assert not compat.start_head(channel)  # already delivering
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    assert channel.requests == []  # held, not parsed
    assert compat.end_head(channel) == b"GET / HTTP/1.1\r\n"
    assert channel._buffer == b"" and not channel._busyReceiving

    channel.dataReceived(b"GET / HTTP/1.1\r\nX")  # half a head: buffered
    assert channel._buffer == b"X" and not compat.start_head(channel)
    channel.dataReceived(b": y\r\nContent-Length: 3\r\n\r\n")
    assert not channel.line_mode and not compat.start_head(channel)  # a body
    channel.dataReceived(b"abc")
    assert channel._handlingRequest and not compat.start_head(channel)

    for state in ("paused", "_handlingRequest", "_transferDecoder"):
        channel = http.HTTPChannel()
        channel.makeConnection(StringTransport())
        assert channel.line_mode and not getattr(channel, state)
        setattr(channel, state, True)
        assert not compat.start_head(channel), state


def test_header_values() -> None:
    """Headers keeps the values of a header under its canonical name in
    _rawHeaders: header_values reads them there, as getRawHeaders would."""
    headers = Headers()
    headers.addRawHeader(b"x-forwarded-for", b"1.2.3.4")
    headers.addRawHeader(b"X-FORWARDED-FOR", b"5.6.7.8")
    assert compat.header_values(headers, b"X-Forwarded-For") == [
        b"1.2.3.4",
        b"5.6.7.8",
    ]
    assert compat.header_values(headers, b"X-Forwarded-For") == (
        headers.getRawHeaders(b"x-forwarded-for")
    )
    assert compat.header_values(headers, b"Host") is None
    headers.setRawHeaders(b"Host", [])
    assert headers.getRawHeaders(b"Host") is None
    assert compat.header_values(headers, b"Host") is None
