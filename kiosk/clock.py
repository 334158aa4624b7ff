"""Clocks: ``LoopClock`` over the running asyncio loop, ``VirtualClock`` for tests (time moves on ``advance``).

Both satisfy ``kiosk.ports.Clock``: ``now()`` in monotonic seconds and ``call_later`` returning a handle
that cancels. Timer callbacks run on the loop's thread (the virtual clock runs them inside ``advance``).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

from kiosk.ports import Cancellable


class LoopClock:
    """The running asyncio loop's monotonic clock and timers."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()

    def now(self) -> float:
        """The loop's monotonic time in seconds."""
        return self._loop.time()

    def call_later(self, delay_seconds: float, callback: Callable[[], None]) -> Cancellable:
        """Run ``callback`` on the loop after ``delay_seconds``."""
        return self._loop.call_later(max(0.0, delay_seconds), callback)


@dataclass(order=True)
class _VirtualTimer:
    due_seconds: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class VirtualClock:
    """Time that only moves when a test calls ``advance``; due timers fire in order of due time."""

    def __init__(self, start_seconds: float = 0.0) -> None:
        self._now_seconds = start_seconds
        self._timers: list[_VirtualTimer] = []
        self._seq = itertools.count()

    def now(self) -> float:
        """The virtual time in seconds."""
        return self._now_seconds

    def call_later(self, delay_seconds: float, callback: Callable[[], None]) -> Cancellable:
        """Schedule ``callback`` at ``now + delay_seconds`` (it fires during a later ``advance``)."""
        timer = _VirtualTimer(self._now_seconds + max(0.0, delay_seconds), next(self._seq), callback)
        heapq.heappush(self._timers, timer)
        return timer

    def advance(self, seconds: float) -> int:
        """Move time forward by ``seconds``, firing each due timer at its own due time; returns how many fired.

        Timers scheduled by a callback fire in the same call if they fall due within the window.
        """
        if seconds < 0:
            raise ValueError("a clock cannot go backwards: advance by 0 seconds or more")
        end_seconds = self._now_seconds + seconds
        fired = 0
        while self._timers and self._timers[0].due_seconds <= end_seconds:
            timer = heapq.heappop(self._timers)
            if timer.cancelled:
                continue
            self._now_seconds = max(self._now_seconds, timer.due_seconds)
            timer.callback()
            fired += 1
        self._now_seconds = end_seconds
        return fired

    def pending(self) -> list[float]:
        """Due times of the timers still pending (not cancelled), earliest first."""
        return sorted(t.due_seconds for t in self._timers if not t.cancelled)
