"""Clocks: the virtual clock fires due timers in order at their own due time; the loop clock is the loop's."""

from __future__ import annotations

import asyncio

import pytest

from kiosk.clock import LoopClock, VirtualClock


def test_virtual_clock_fires_in_due_order_at_due_time() -> None:
    clock = VirtualClock(start_seconds=100.0)
    fired: list[tuple[str, float]] = []
    clock.call_later(2.0, lambda: fired.append(("b", clock.now())))
    clock.call_later(1.0, lambda: fired.append(("a", clock.now())))
    clock.call_later(2.0, lambda: fired.append(("c", clock.now())))  # same due time: first scheduled first
    assert clock.advance(1.5) == 1
    assert fired == [("a", 101.0)] and clock.now() == 101.5
    assert clock.advance(10.0) == 2
    assert fired == [("a", 101.0), ("b", 102.0), ("c", 102.0)] and clock.now() == 111.5


def test_virtual_clock_cancel_and_chained_timers() -> None:
    clock = VirtualClock()
    fired: list[float] = []
    handle = clock.call_later(1.0, lambda: fired.append(-1.0))
    handle.cancel()
    handle.cancel()  # idempotent

    def chain() -> None:
        fired.append(clock.now())
        if len(fired) < 3:
            clock.call_later(0.5, chain)

    clock.call_later(0.5, chain)
    assert clock.pending() == [0.5]
    clock.advance(5.0)
    assert fired == [0.5, 1.0, 1.5]
    assert clock.pending() == []
    with pytest.raises(ValueError):
        clock.advance(-1.0)


def test_virtual_clock_zero_and_negative_delays_fire_on_next_advance() -> None:
    clock = VirtualClock()
    fired: list[str] = []
    clock.call_later(-3.0, lambda: fired.append("late"))
    clock.call_later(0.0, lambda: fired.append("now"))
    assert fired == []
    clock.advance(0.0)
    assert fired == ["late", "now"]


async def test_loop_clock_uses_the_running_loop() -> None:
    loop = asyncio.get_running_loop()
    clock = LoopClock()
    assert abs(clock.now() - loop.time()) < 0.05
    done = asyncio.Event()
    handle = clock.call_later(0.0, done.set)
    await asyncio.wait_for(done.wait(), 1.0)
    cancelled: list[int] = []
    handle = clock.call_later(0.01, lambda: cancelled.append(1))
    handle.cancel()
    await asyncio.sleep(0.03)
    assert cancelled == []
