"""Ports: the roles the controller and the app talk to, each a ``Protocol`` with a real adapter.

Audio crosses these ports in the internal format: 16 kHz mono int16, 10 ms (160-sample) frames, as
``numpy`` arrays. Adapters never raise into the controller for expected failures: they post events
(``kiosk.events``) through the ``EventSink`` they were given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import numpy.typing as npt

from kiosk.events import Event

Pcm = npt.NDArray[np.int16]

# Post an event into the controller's loop. Safe to call from the loop; adapters on other threads use
# ``loop.call_soon_threadsafe(sink, event)``.
EventSink = Callable[[Event], None]


class Clock(Protocol):
    """Time in seconds and timers; the real one is the asyncio loop, tests use a virtual clock."""

    def now(self) -> float:
        """Monotonic seconds."""
        ...

    def call_later(self, delay_seconds: float, callback: Callable[[], None]) -> Cancellable:
        """Run ``callback`` after ``delay_seconds``; the handle cancels it."""
        ...


class Cancellable(Protocol):
    """A timer handle."""

    def cancel(self) -> None:
        """Cancel; a no-op if it already ran."""
        ...


class FrameSink(Protocol):
    """Where cleaned capture frames go when the gate is open (the room link's published track)."""

    def push_frame(self, pcm: Pcm, captured_at: float | None = None) -> None:
        """Take one 10 ms frame (``captured_at``: loop time it was captured); never blocks, drops the oldest."""
        ...


class PlayoutSink(Protocol):
    """Where received agent audio goes (the audio engine's bounded playout buffer)."""

    async def write(self, pcm: Pcm) -> None:
        """Queue 16 kHz mono audio for playout; waits while the buffer is full (the producer is the agent)."""
        ...

    def clear(self) -> None:
        """Drop everything queued (barge-in)."""
        ...


@dataclass(frozen=True)
class Recording:
    """A visitor's message as recorded: 16 kHz mono int16."""

    pcm: Pcm
    duration_seconds: float


class AudioEngine(Protocol):
    """Capture chain and playout as the controller sees them."""

    def set_gate(self, streaming: bool) -> None:
        """Open or close the gate that sends cleaned frames to the room link."""
        ...

    def clear_playback(self) -> None:
        """Drop queued agent audio at once (barge-in, session end)."""
        ...

    async def play_cue(self, name: str) -> None:
        """Play a local cue (``kiosk.audio.cues``) to the end; cues also feed the echo reference."""
        ...

    def start_recording(self) -> None:
        """Start keeping cleaned capture audio for a visitor's message."""
        ...

    def stop_recording(self) -> Recording:
        """Stop and hand over what was recorded."""
        ...


class MessageStore(Protocol):
    """Durable storage for visitors' messages (the spool)."""

    async def store_recording(self, recording: Recording) -> str:
        """Store ``recording`` durably and return its message id; raises ``KioskError`` if it cannot."""
        ...


class RoomLink(Protocol):
    """A conversation session: the session API plus the LiveKit room."""

    async def open(self) -> None:
        """Get a session and connect; posts SessionOpened, ApiRefused or LinkLost."""
        ...

    async def close(self) -> None:
        """Leave the room; posts SessionClosed."""
        ...

    async def interrupt_agent(self) -> None:
        """Ask the agent to stop speaking (barge-in)."""
        ...

    def set_publishing(self, on: bool) -> None:
        """Unmute or mute the published microphone track."""
        ...


class Panel(Protocol):
    """Buttons and LEDs (gpiozero, or the virtual terminal panel on a laptop)."""

    def show(self, pattern: str) -> None:
        """Show the named LED pattern (``kiosk.panel.patterns``)."""
        ...

    def close(self) -> None:
        """Release the pins."""
        ...
