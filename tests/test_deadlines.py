"""The single-timer deadline queue, on an injected clock."""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from clerkproxy._deadlines import Deadlines


class Item:
    def __init__(
        self, name: str, log: list[tuple[str, float]], clock: MemoryReactorClock
    ):
        self.name = name
        self.log = log
        self.clock = clock

    def expired(self) -> None:
        self.log.append((self.name, self.clock.seconds()))


def test_each_item_expires_exactly_on_time_with_one_timer() -> None:
    clock = MemoryReactorClock()
    deadlines: Deadlines[Item] = Deadlines(clock, 7.0)
    log: list[tuple[str, float]] = []
    gone = Item("gone", log, clock)
    deadlines.add(gone)
    clock.advance(0.3)
    a, b = Item("a", log, clock), Item("b", log, clock)
    deadlines.add(a)
    clock.advance(0.95)
    deadlines.add(b)
    deadlines.remove(gone)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(7.3 - 0.001 - clock.seconds())
    assert log == []
    clock.advance(0.001)
    assert [n for n, _ in log] == ["a"]
    clock.advance(8.25 - 0.001 - clock.seconds())
    assert [n for n, _ in log] == ["a"]
    clock.advance(0.001)
    assert [n for n, _ in log] == ["a", "b"]
    assert not clock.getDelayedCalls()


def test_adding_again_restarts_the_deadline() -> None:
    clock = MemoryReactorClock()
    deadlines: Deadlines[Item] = Deadlines(clock, 5.0)
    log: list[tuple[str, float]] = []
    a, b = Item("a", log, clock), Item("b", log, clock)
    deadlines.add(a)
    deadlines.add(b)
    clock.advance(4.0)
    deadlines.add(a)  # progress: a moves behind b
    clock.advance(1.0)
    assert [n for n, _ in log] == ["b"]
    clock.advance(3.9)
    assert [n for n, _ in log] == ["b"]
    clock.advance(0.1)
    assert [n for n, _ in log] == ["b", "a"]


def test_an_item_may_add_itself_again_from_its_expiry() -> None:
    clock = MemoryReactorClock()
    fired: list[float] = []

    def fire(item: object) -> None:
        fired.append(clock.seconds())
        if len(fired) < 3:
            deadlines.add(item)

    deadlines: Deadlines[object] = Deadlines(clock, 2.0, fire)
    deadlines.add(object())
    clock.pump([0.5] * 20)
    assert fired == [2.0, 4.0, 6.0]
    assert len(deadlines) == 0 and not clock.getDelayedCalls()


def test_a_failing_expiry_does_not_stop_the_others() -> None:
    clock = MemoryReactorClock()
    fired: list[str] = []

    def fire(item: str) -> None:
        fired.append(item)
        if item == "bad":
            raise RuntimeError("boom")

    deadlines: Deadlines[str] = Deadlines(clock, 1.0, fire)
    deadlines.add("bad")
    clock.advance(0.5)
    deadlines.add("good")
    try:
        clock.advance(0.5)
    except RuntimeError:
        pass
    clock.advance(0.5)
    assert fired == ["bad", "good"]
