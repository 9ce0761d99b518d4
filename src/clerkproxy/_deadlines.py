"""One timer for every item that shares a timeout."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Deadlines"]


T = TypeVar("T")

#: Deadlines this close count as passed: a timer set for the earliest one
#: may fire a rounding error before it, and must not be set again for ~0 s.
_SLACK = 1e-6


def _callExpired(item: Any) -> None:
    item.expired()


class Deadlines(Generic[T]):
    """
    Every item gets the same timeout, so deadlines expire in the order the
    items were added: a dictionary kept in insertion order is the whole
    timer queue, and adding, re-adding (on progress) or removing an item
    costs one or two dictionary operations rather than a reactor timer per
    item.  The one reactor timer always stands at the earliest deadline, so
    an item expires on time, not on some tick.

    @param fire: Called with each item whose deadline passes; by default
        the item's own C{expired()}.  An item may re-add itself from it.
    """

    def __init__(
        self,
        clock: IReactorTime,
        timeout: float,
        fire: Callable[[T], object] | None = None,
    ) -> None:
        self._clock = clock
        self.timeout = timeout
        self._fireItem: Callable[[T], object] = fire or _callExpired
        self._due: dict[T, float] = {}
        self._call: IDelayedCall | None = None
        self._firing = False

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, item: T) -> bool:
        return item in self._due

    def add(self, item: T) -> None:
        """Start C{item}'s deadline, or start it again if it is running."""
        due = self._due
        if item in due:
            del due[item]  # to the end: insertion order is deadline order
        due[item] = self._clock.seconds() + self.timeout
        if self._call is None and not self._firing:
            self._call = self._clock.callLater(self.timeout, self._fire)

    def remove(self, item: T) -> None:
        self._due.pop(item, None)

    def _fire(self) -> None:
        self._call = None
        self._firing = True
        due = self._due
        try:
            now = self._clock.seconds() + _SLACK
            while due:
                item = next(iter(due))
                if due[item] > now:
                    break
                del due[item]
                self._fireItem(item)
        finally:
            self._firing = False
            if due:
                first = due[next(iter(due))]
                wait = max(first - self._clock.seconds(), 0.0)
                self._call = self._clock.callLater(wait, self._fire)
