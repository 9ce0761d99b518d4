"""The C{Site} that streams request bodies to resources that want them."""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.web import http
from twisted.web.http import _GenericHTTPChannelProtocol
from twisted.web.resource import IResource
from twisted.web.server import Site

from ._request import StreamingChannel, StreamingRequest

__all__ = ["StreamingSite", "build_site"]


def _streamingProtocol(factory: Site) -> _GenericHTTPChannelProtocol:
    channel: StreamingChannel = StreamingChannel()  # type: ignore[no-untyped-call]
    return _GenericHTTPChannelProtocol(channel)


class StreamingSite(Site):
    """
    A C{Site} whose requests stream their bodies to L{IStreamingResource}
    providers and never parse forms.

    It writes no combined-format access log: Twisted's would record every
    full URL, and Clerk's URLs carry session tokens.
    """

    protocol = _streamingProtocol
    requestFactory = StreamingRequest

    def log(self, request: http.Request) -> None:
        pass

    def acceptableProtocols(self) -> list[bytes]:
        # The streaming request relies on HTTP/1.1 channel semantics.
        return [b"http/1.1"]


def build_site(
    resource: IResource, reactor: IReactorTime, timeout: float = 60.0
) -> StreamingSite:
    """
    A L{StreamingSite} serving C{resource}.

    @param timeout: Seconds an idle client connection is kept open.
    """
    site: StreamingSite = StreamingSite(  # type: ignore[no-untyped-call]
        resource, parsePOSTFormSubmission=False, timeout=timeout, reactor=reactor
    )
    return site
