"""
Every private Twisted name clerkproxy relies on, in one place.

Twisted does not promise to keep these; C{tests/test_twisted_compat.py}
pins each one, so that an upgrade that moves or renames one fails there,
by name, rather than somewhere deep in a behaviour test.  Nothing else in
the package imports a private Twisted name or touches a private Twisted
attribute except through this module and C{_tcp_compat} (the socket
transports' write buffers, pinned by C{tests/test_tcp_compat.py}), and
the methods our subclasses override are listed here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet._sslverify import (
    IOpenSSLTrustRoot,
    OpenSSLCertificateAuthorities,
    OpenSSLDefaultPaths,
)
from twisted.internet.abstract import FileDescriptor
from twisted.internet.endpoints import _parse
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.http import _ChunkedTransferDecoder
from twisted.web.http_headers import Headers, _nameEncoder

__all__ = [
    "CHANNEL_OVERRIDES",
    "DECODER_OVERRIDES",
    "ChunkedTransferDecoder",
    "IOpenSSLTrustRoot",
    "clear_tls_options",
    "encode_header_name",
    "end_head",
    "header_values",
    "headers_from_raw",
    "is_platform_trust",
    "parse_endpoint_description",
    "raise_synchronously",
    "replace_chunked_decoder",
    "request_line",
    "request_version",
    "set_request_line",
    "start_head",
    "trust_root_pems",
    "write_blocked",
    "write_buffered",
    "write_now",
]

#: Private methods of C{twisted.web.http.HTTPChannel} that
#: L{clerkproxy._channel.StreamingChannel} overrides or calls:
#:  - C{_maybeChooseTransferDecoder(header, data) -> bool}: overridden to
#:    refuse transfer codings other than C{chunked};
#:  - C{_failChooseTransferDecoder() -> bool}: called to answer 400;
#:  - C{_send100Continue()}: overridden to stay silent while discarding.
CHANNEL_OVERRIDES = (
    "_maybeChooseTransferDecoder",
    "_failChooseTransferDecoder",
    "_send100Continue",
)

#: Twisted's decoder for chunked request bodies, which
#: L{clerkproxy._channel.StreamingChannel} subclasses to bound chunk sizes.
ChunkedTransferDecoder = _ChunkedTransferDecoder

#: What that subclass relies on: C{dataReceived} appends to the
#: C{bytearray} C{_buffer} and calls C{"_dataReceived_" + state} while it
#: returns true; C{_dataReceived_CHUNK_LENGTH() -> bool} parses one size
#: line from the front of C{_buffer} into C{length} and returns true once
#: it has.
DECODER_OVERRIDES = ("_buffer", "_dataReceived_CHUNK_LENGTH")


def replace_chunked_decoder(
    channel: Any,
    make: Callable[[Callable[[bytes], None], Callable[[bytes], None]], Any],
) -> None:
    """
    If C{channel} (an C{HTTPChannel} reading a request head) has just
    chosen Twisted's chunked decoder for the body (C{_transferDecoder}),
    put C{make(dataCallback, finishCallback)} in its place.
    """
    current = channel._transferDecoder
    if type(current) is _ChunkedTransferDecoder:
        channel._transferDecoder = make(current.dataCallback, current.finishCallback)


def parse_endpoint_description(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split an endpoint description into positional and keyword arguments,
    with Twisted's own escaping rules (C{endpoints._parse}).
    """
    args, kwargs = _parse(description)
    return list(args), dict(kwargs)


#: The encoder C{Headers} uses for names (canonical capitalisation).
encode_header_name = _nameEncoder.encode


def request_line(channel: Any) -> tuple[bytes, bytes, bytes]:
    """
    The method, target and version of the request whose head C{channel}
    (an C{HTTPChannel}) is reading: C{HTTPChannel} keeps them in C{_command},
    C{_path} and C{_version} from the request line until C{allContentReceived}.
    """
    return channel._command, channel._path, channel._version


def set_request_line(
    channel: Any, method: bytes, target: bytes, version: bytes
) -> None:
    """
    Store a request line on C{channel} (an C{HTTPChannel}) where its own
    C{lineReceived} would have (C{_command}, C{_path}, C{_version}).
    """
    channel._command = method
    channel._path = target
    channel._version = version


def start_head(channel: Any) -> bool:
    """
    If C{channel} (an C{HTTPChannel}) waits for the first line of a request
    head with nothing half-read, enter the state its C{LineReceiver} is in
    while it delivers lines, and return true: bytes received meanwhile are
    held (in C{_buffer}) rather than parsed, until L{end_head}.

    That is: in line mode (C{line_mode}), nothing buffered (C{_buffer}),
    not already delivering (C{_busyReceiving}), not paused (C{paused}), no
    request being handled (C{_handlingRequest}) and no body decoder chosen
    (C{_transferDecoder}).
    """
    if (
        channel.line_mode
        and not channel._buffer
        and not channel._busyReceiving
        and not channel.paused
        and not channel._handlingRequest
        and channel._transferDecoder is None
    ):
        channel._busyReceiving = True
        return True
    return False


def end_head(channel: Any) -> bytes:
    """
    Leave the state L{start_head} entered; return (and forget) the bytes
    C{channel} held meanwhile.
    """
    channel._busyReceiving = False
    held: bytes = channel._buffer
    channel._buffer = b""
    return held


def request_version(channel: Any) -> bytes:
    """The HTTP version of the request C{channel} is reading (C{_version})."""
    version: bytes = channel._version
    return version


def headers_from_raw(raw: dict[bytes, list[bytes]]) -> Headers:
    """
    A C{Headers} holding C{raw} (canonically capitalised names, lists of
    values) as it is, without re-validating or re-encoding each name and
    value: C{Headers._rawHeaders}.  Only for names and values already checked.
    """
    headers = Headers()
    headers._rawHeaders = raw
    return headers


def header_values(headers: Headers, name: bytes) -> list[bytes] | None:
    """
    C{headers.getRawHeaders(name)} for a C{name} already in canonical form
    (as L{encode_header_name} gives it), without encoding it again: the
    values C{Headers} keeps under it in C{_rawHeaders}, or L{None}.
    """
    values: list[bytes] | None = headers._rawHeaders.get(name)
    return values or None


def raise_synchronously(service: Any) -> None:
    """
    Make a C{StreamServerEndpointService} raise a listening failure from
    C{startService} instead of logging it (C{_raiseSynchronously}).
    """
    service._raiseSynchronously = True


def clear_tls_options(options: Any, flags: int) -> None:
    """
    Keep OpenSSL option C{flags} off in the contexts a C{CertificateOptions}
    makes (it sets them from C{_options}; pyOpenSSL cannot clear an option
    on a context once set).
    """
    options._options &= ~flags


def write_buffered(transport: object) -> int | None:
    """
    How many bytes written to C{transport} its socket has not taken yet,
    found under any TLS or PROXY-protocol wrapping (each keeps the next
    transport down in C{.transport}); L{None} for a transport that is not
    a C{FileDescriptor} in the end.  A C{FileDescriptor} keeps what it
    has not sent in C{dataBuffer} from C{offset} on, plus C{_tempDataLen}
    bytes not yet joined to it.
    """
    for _ in range(4):
        if isinstance(transport, FileDescriptor):
            unsent = len(transport.dataBuffer) - transport.offset
            held: int = unsent + transport._tempDataLen
            return held
        transport = getattr(transport, "transport", None)
        if transport is None:
            return None
    return None


def write_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} through C{transport} at once.  Twisted's TLS transport
    (C{BufferingTLSTransport}) otherwise holds small writes until the next
    reactor turn (C{_aggregator}, flushed by a C{callLater(0)}); whatever
    it holds goes first, so the order of bytes is kept.
    """
    aggregator = getattr(transport, "_aggregator", None)
    if aggregator is None or not isinstance(transport, TLSMemoryBIOProtocol):
        transport.write(data)
        return
    aggregator.flush()
    TLSMemoryBIOProtocol.write(transport, data)


def write_blocked(channel: Any) -> bool:
    """
    Whether C{channel} (an C{HTTPChannel}) has been paused by its transport
    and not resumed (C{_waitingForTransport}).  C{registerProducer} does not
    pass that state on to a producer registered meanwhile, as a pipelined
    request's is after the answer before it filled the socket.
    """
    return bool(getattr(channel, "_waitingForTransport", False))


def trust_root_pems(root: object) -> bytes | None:
    """
    The CA certificates a Twisted trust root stands for, as concatenated
    PEM, for a TLS stack other than pyOpenSSL: the certificates of a
    C{trustRootFromCertificates} root (an C{OpenSSLCertificateAuthorities},
    which keeps them in C{_caCerts}; C{b""} if it holds none, and then
    trusts nothing); L{None} for any other kind, including the platform's
    roots (see L{is_platform_trust}).
    """
    if isinstance(root, OpenSSLCertificateAuthorities):
        from OpenSSL import crypto

        return b"".join(
            crypto.dump_certificate(crypto.FILETYPE_PEM, cert) for cert in root._caCerts
        )
    return None


def is_platform_trust(root: object) -> bool:
    """Whether C{root} is C{platformTrust()}'s: OpenSSL's default paths."""
    return isinstance(root, OpenSSLDefaultPaths)
