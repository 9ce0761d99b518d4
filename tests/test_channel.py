"""
The streaming request and strict channel, driven in memory.

These also pin the private Twisted attributes the streaming request relies
on: if a Twisted release moves them, these tests fail first.
"""

from __future__ import annotations

from typing import Any

import pytest
from helpers import Recording, connect
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource

from clerkproxy import build_site


def test_body_streams_before_it_is_complete() -> None:
    resource = Recording()
    protocol, transport = connect(resource)
    protocol.dataReceived(
        b"POST /a/b?c=d HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhello"
    )
    [(request, length, receiver)] = resource.streamed
    # The private channel attributes were read into the request:
    assert (request.method, request.uri, request.clientproto) == (
        b"POST",
        b"/a/b?c=d",
        b"HTTP/1.1",
    )
    assert length == 10
    assert receiver.chunks == [b"hello"] and not receiver.done
    protocol.dataReceived(b"world")
    assert receiver.chunks == [b"hello", b"world"] and receiver.done
    assert request.content is None  # Twisted's buffering never ran
    assert resource.rendered == []


def test_chunked_body_streams_with_unknown_length() -> None:
    resource = Recording()
    protocol, _ = connect(resource)
    protocol.dataReceived(
        b"PUT /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n"
    )
    [(_, length, receiver)] = resource.streamed
    assert length is None and receiver.chunks == [b"abc"]
    protocol.dataReceived(b"0\r\n\r\n")
    assert receiver.done


def test_malformed_multipart_is_not_parsed() -> None:
    resource = Recording()
    protocol, transport = connect(resource)
    body = b"--nope\r\nthis is not multipart"
    protocol.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: multipart/form-data; boundary=zzz\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    [(request, _, receiver)] = resource.streamed
    assert b"".join(receiver.chunks) == body and receiver.done
    assert b"400" not in transport.value()


def test_bodiless_requests_take_the_ordinary_path() -> None:
    resource = Recording()
    protocol, transport = connect(resource)
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resource.streamed == []
    assert resource.rendered == [(b"GET", b"/x", b"")]
    assert transport.value().endswith(b"plain")


def test_bodiless_requests_skip_twisteds_query_parsing_and_default_headers() -> None:
    """A bodiless request for a streaming resource is rendered without the
    work Twisted's process() does for any resource: args stay empty (the
    query is in uri), no Server or Date header is added, and the
    connection stays open for the next request."""
    seen: list[Any] = []

    class Looking(Recording):
        def render(self, request: Any) -> Any:
            seen.append((request.args, request.uri, request.path, request.postpath))
            return super().render(request)

    resource = Looking()
    protocol, transport = connect(resource)
    protocol.dataReceived(b"GET /x/y?a=1&b=2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert seen == [({}, b"/x/y?a=1&b=2", b"/x/y", [b"x", b"y"])]
    answer = transport.value()
    assert answer.endswith(b"plain")
    assert b"Server:" not in answer and b"Date:" not in answer
    transport.clear()
    protocol.dataReceived(b"GET /z HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().endswith(b"plain")
    assert len(seen) == 2


def test_bodiless_requests_for_other_resources_keep_twisteds_path() -> None:
    """A resource that does not stream still gets parsed args and
    Twisted's default headers for a bodiless request."""
    seen: list[Any] = []

    class Plain(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            seen.append(request.args)
            return b"plain"

    protocol, transport = connect(Plain())
    protocol.dataReceived(b"GET /x?a=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert seen == [{b"a": [b"1"]}]
    assert b"Date:" in transport.value()


def test_bodiless_requests_under_a_tree_are_walked_once_as_twisted_would() -> None:
    """Mounted under a root that is not itself a streaming leaf (as an
    embedder's putChild does), a bodiless request takes Twisted's path:
    the tree is walked once, with args parsed, and getChild sees them."""
    walks: list[Any] = []
    seen: list[Any] = []

    class Looking(Recording):
        def render(self, request: Any) -> Any:
            seen.append(request.args)
            return super().render(request)

    leaf = Looking()

    class Root(Resource):
        def getChild(self, path: bytes, request: Any) -> Any:
            walks.append((path, dict(request.args)))
            return leaf

    protocol, transport = connect(Root())
    protocol.dataReceived(b"GET /app/x?a=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert walks == [(b"app", {b"a": [b"1"]})]
    assert seen == [{b"a": [b"1"]}]
    assert transport.value().endswith(b"plain")


def test_a_bodiless_render_that_raises_gets_a_500() -> None:
    class Broken(Recording):
        def render(self, request: Any) -> Any:
            raise RuntimeError("boom")

    protocol, transport = connect(Broken())
    protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 500 ")


def test_plain_resources_are_served_buffered() -> None:
    class Plain(Resource):
        isLeaf = True
        rendered: list[Any] = []

        def render(self, request: Any) -> bytes:
            self.rendered.append((request.method, request.uri, request.content.read()))
            return b"plain"

    root = Resource()
    plain = Plain()
    root.putChild(b"app", plain)
    protocol, transport = connect(root)
    protocol.dataReceived(
        b"POST /app HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert plain.rendered == [(b"POST", b"/app", b"abc")]
    assert transport.value().endswith(b"plain")


def test_an_early_answer_closes_the_connection_and_ignores_the_rest() -> None:
    resource = Recording(reject=413)
    protocol, transport = connect(resource)
    protocol.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
        b"Content-Length: 10\r\n\r\n"
    )
    out = transport.value()
    assert out.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in out
    assert b"Connection: close" in out
    assert transport.disconnecting
    # A smuggled request hidden in the unread body is never parsed:
    protocol.dataReceived(b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(resource.streamed) == 1 and resource.rendered == []
    assert transport.value() == out


@pytest.mark.parametrize(
    "head",
    [
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Content-Length: 5\r\nContent-Length: 6\r\n",
        b"Content-Length: 5, 5\r\n",
        b"Content-Length: +5\r\n",
        b"Content-Length: -5\r\n",
        b"Content-Length: 0x5\r\n",
        b"Transfer-Encoding: identity\r\nContent-Length: 5\r\n",
        b"Transfer-Encoding: gzip, chunked\r\n",
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length : 5\r\n",
        b"X-Foo: a\nContent-Length: 5\r\n",
        b"X-Foo: a\rb\r\n",
        b"X-Foo: a\x00b\r\n",
    ],
)
def test_ambiguous_framing_is_refused(head: bytes) -> None:
    resource = Recording()
    protocol, transport = connect(resource)
    protocol.dataReceived(b"POST /x HTTP/1.1\r\nHost: x\r\n" + head + b"\r\nhello")
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert transport.disconnecting
    assert resource.rendered == []
    assert all(not r.chunks for _, _, r in resource.streamed)


def test_transfer_encoding_on_http_1_0_is_refused() -> None:
    resource = Recording()
    protocol, transport = connect(resource)
    protocol.dataReceived(
        b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert resource.streamed == [] and resource.rendered == []


@given(
    value=st.binary(min_size=1, max_size=12).filter(
        lambda v: (
            v.strip(b" \t").lower() != b"chunked" and b"\r" not in v and b"\n" not in v
        )
    )
)
def test_only_chunked_is_a_transfer_coding(value: bytes) -> None:
    resource = Recording()
    protocol, transport = connect(resource)
    protocol.dataReceived(
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + value + b"\r\n\r\n"
    )
    assert transport.value().startswith(b"HTTP/1.1 400 ")
    assert resource.rendered == []


def test_pipelined_requests_after_a_streamed_one_wait_their_turn() -> None:
    resource = Recording()
    protocol, transport = connect(resource)
    protocol.dataReceived(
        b"POST /one HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /two HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    [(request, _, receiver)] = resource.streamed
    assert receiver.done
    assert resource.rendered == []  # /two waits for /one's answer
    request.setHeader(b"Content-Length", b"3")
    request.write(b"one")
    request.finish()
    assert resource.rendered == [(b"GET", b"/two", b"")]
    out = transport.value()
    assert out.index(b"one") < out.index(b"plain")


def test_streaming_site_writes_no_combined_log() -> None:
    """Twisted's combined log would record session tokens in URLs."""
    import io

    site = build_site(Recording(), MemoryReactorClock())
    sink = io.StringIO()
    site._logFile = sink
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    protocol.makeConnection(transport)
    protocol.dataReceived(
        b"GET /x?__session=eyJ.secret.jwt HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert transport.value().endswith(b"plain")
    assert sink.getvalue() == ""
    assert site.acceptableProtocols() == [b"http/1.1"]


def test_site_channel_and_request_provide_the_private_hooks() -> None:
    from zope.interface.verify import verifyObject

    from clerkproxy._interfaces import (
        IStreamingChannel,
        IStreamingRequest,
        IStreamingSite,
    )

    seen: list[Any] = []

    class Hooked(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            seen.append(request)
            return b"ok"

    protocol, transport = connect(Hooked())
    channel = protocol  # HTTP/2 off: the site builds the channel itself
    protocol.dataReceived(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert transport.value().endswith(b"ok")
    assert verifyObject(IStreamingSite, channel.site)
    assert verifyObject(IStreamingChannel, channel)
    assert verifyObject(IStreamingRequest, seen[0])
    assert channel.site.metrics.inFlight == 0  # requestStarted, then log


def test_addresses_are_asked_of_the_transport_once_per_connection() -> None:
    resource = Recording()
    site = build_site(resource, MemoryReactorClock())
    protocol = site.buildProtocol(None)
    transport = StringTransport()
    asked: list[str] = []
    getHost, getPeer = transport.getHost, transport.getPeer

    def countingHost() -> Any:
        asked.append("host")
        return getHost()

    def countingPeer() -> Any:
        asked.append("peer")
        return getPeer()

    transport.getHost = countingHost  # type: ignore[method-assign]
    transport.getPeer = countingPeer  # type: ignore[method-assign]
    protocol.makeConnection(transport)
    for _ in range(3):
        protocol.dataReceived(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [r[1] for r in resource.rendered] == [b"/x"] * 3
    assert sorted(asked) == ["host", "peer"]
