"""
The private hooks between L{StreamingSite}, L{StreamingChannel},
L{StreamingRequest} and L{Exchange}.

Each side works with plain Twisted objects too (a C{FrontendAPIProxy}
mounted in an ordinary C{Site}, a C{StreamingRequest} on a channel that is
not ours), so each asks once whether the other provides the hooks instead
of probing for methods by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from ._request import StreamingRequest

__all__ = ["IStreamingChannel", "IStreamingRequest", "IStreamingSite"]


class IStreamingSite(Interface):
    """What a site learns about each request: L{StreamingSite} provides it."""

    def requestStarted(request: StreamingRequest) -> None:
        """The request's head is in: it is now in flight."""

    def requestAborted(request: StreamingRequest) -> None:
        """The client's connection ended before the response did."""


class IStreamingChannel(Interface):
    """A channel that can stop reading: L{StreamingChannel} provides it."""

    def discardInput() -> None:
        """
        Ignore everything the client sends from now on (the rest of a
        request body that was answered early).
        """


class IStreamingRequest(Interface):
    """A request that reports a lost client cheaply: L{StreamingRequest}."""

    def watchConnection(onLost: Callable[[], object]) -> None:
        """
        Call C{onLost} if the client's connection ends before the response
        does, as C{notifyFinish} would, without a C{Deferred} per request.
        """

    maxBodySize = Attribute(
        "The most body bytes the request's resource takes (an int), or None."
        " A resource may set it in renderStreaming; the channel then refuses"
        " a chunk size that would go past it."
    )

    def refuseBody(status: int) -> bool:
        """
        The channel refuses the rest of the body (C{status} 400 or 413):
        stop whatever the body was going to, and answer the client.

        @return: Whether the request answered; if not, the channel does.
        """
