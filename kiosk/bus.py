"""The controller's event bus: bounded, control events ahead of audio events, never blocks a producer.

Producers on the loop call ``post``; producers on other threads (PortAudio, gpiozero) call
``post_threadsafe``, which only schedules ``post`` on the loop. One consumer (the controller) awaits
``get``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from kiosk.events import (
    AgentStateChanged,
    CueFinished,
    Event,
    PlaybackFinished,
    PlaybackStarted,
    VoiceStarted,
    VoiceStopped,
)

_LOGGER = logging.getLogger(__name__)

# Events derived from the audio streams; everything else (buttons, timers, link, devices, errors) is
# control and is delivered first, so a cancel press is never stuck behind a burst of voice events.
AUDIO_EVENTS: tuple[type[Event], ...] = (
    VoiceStarted, VoiceStopped, PlaybackStarted, PlaybackFinished, CueFinished, AgentStateChanged,
)


class EventBus:
    """Two bounded FIFO lanes (control, audio); when a lane is full its oldest event is dropped and counted."""

    def __init__(self, capacity: int = 256, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._control: deque[Event] = deque()
        self._audio: deque[Event] = deque()
        self._capacity = capacity
        self._loop = loop
        self._ready = asyncio.Event()
        self.dropped = 0

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop that ``post_threadsafe`` hands events to."""
        self._loop = loop

    def post(self, event: Event) -> None:
        """Queue ``event`` (loop thread only); never blocks."""
        lane = self._audio if isinstance(event, AUDIO_EVENTS) else self._control
        if len(lane) >= self._capacity:
            # Drop the oldest: the consumer is far behind, and fresh facts matter more than stale ones.
            lane.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 100 == 0:
                _LOGGER.warning("event bus full: dropped %d events so far (the controller is not keeping up)",
                                self.dropped)
        lane.append(event)
        self._ready.set()

    def post_threadsafe(self, event: Event) -> None:
        """Hand ``event`` over from another thread: schedules ``post`` on the loop and returns at once."""
        # Thread boundary: the deques are touched only on the loop's thread; other threads just schedule.
        if self._loop is None:
            raise RuntimeError("EventBus.post_threadsafe before bind(loop): bind the bus to the running loop first")
        self._loop.call_soon_threadsafe(self.post, event)

    def get_nowait(self) -> Event | None:
        """The next event (control first), or None when both lanes are empty."""
        if self._control:
            return self._control.popleft()
        if self._audio:
            return self._audio.popleft()
        self._ready.clear()
        return None

    async def get(self) -> Event:
        """Wait for the next event (control first)."""
        while True:
            event = self.get_nowait()
            if event is not None:
                return event
            await self._ready.wait()

    def __len__(self) -> int:
        return len(self._control) + len(self._audio)
