"""
The seams of clerkproxy, as zope interfaces.

A resource providing L{IStreamingResource} gets request bodies while they
arrive when it is served by L{clerkproxy.build_site}; under any other
C{Site} it is rendered the ordinary way, after Twisted has buffered the body.
"""

from __future__ import annotations

from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from zope.interface import Interface

__all__ = ["IRequestBodyReceiver", "IStreamingResource"]


class IRequestBodyReceiver(Interface):
    """Where a streamed request body goes, chunk by chunk."""

    def bodyDataReceived(data: bytes) -> None:
        """The next bytes of the body, already de-chunked."""

    def bodyDone() -> None:
        """The whole body has arrived."""


class IStreamingResource(IResource):
    """
    A resource that takes request bodies as a stream.

    Under L{clerkproxy.build_site}, a request with a body that it serves
    (for an origin-form target, one starting with C{/}) leaves C{args}
    empty: the query stays in C{uri}, unparsed.  So does a bodiless request
    when the resource is the site's root and a leaf, which then also gets
    none of Twisted's default C{Server} and C{Date} response headers.
    """

    def renderStreaming(
        request: IRequest, length: int | None
    ) -> IRequestBodyReceiver | None:
        """
        Start answering C{request} as soon as its headers are in.

        @param length: The declared body length, or L{None} for a chunked
            body.  Never zero: bodiless requests go through C{render}.
        @return: The receiver for the body, or L{None} when the resource has
            already answered and wants none of it.
        """
