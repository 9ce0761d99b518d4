"""One timer for every in-flight exchange's upstream deadline."""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["Deadlines"]


class _Expiring(Protocol):
    def expired(self) -> None: ...


class Deadlines:
    """
    Every item gets the same timeout, so deadlines expire in the order the
    items were added: a dictionary kept in insertion order is the whole
    timer queue, and adding or removing an item costs one dictionary
    operation rather than a reactor timer per request.
    """

    def __init__(self, clock: IReactorTime, timeout: float) -> None:
        self._clock = clock
        self._timeout = timeout
        self._due: dict[_Expiring, float] = {}
        self._call: IDelayedCall | None = None

    def __len__(self) -> int:
        return len(self._due)

    def add(self, item: _Expiring) -> None:
        self._due[item] = self._clock.seconds() + self._timeout
        if self._call is None:
            self._call = self._clock.callLater(self._timeout, self._fire)

    def remove(self, item: _Expiring) -> None:
        self._due.pop(item, None)

    def _fire(self) -> None:
        self._call = None
        due = self._due
        now = self._clock.seconds()
        while due:
            item = next(iter(due))
            when = due[item]
            if when > now:
                self._call = self._clock.callLater(when - now, self._fire)
                return
            del due[item]
            item.expired()
