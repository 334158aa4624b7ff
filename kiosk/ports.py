"""Ports: the roles the controller and the app talk to, each a ``Protocol`` with a real adapter.

Audio crosses these ports in the internal format: 16 kHz mono int16, 10 ms (160-sample) frames, as
``numpy`` arrays. Adapters never raise into the controller for expected failures: they post events
(``kiosk.events``) through the ``EventSink`` they were given.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from kiosk.audio.format import Pcm
from kiosk.events import Event, Tool
from kiosk.personal import PersonalText

__all__ = ["AecStats", "AudioControl", "Cancellable", "Clock", "EchoCanceller", "EventSink", "FrameSink",
           "MessageStore", "Panel", "Pcm", "PlayoutSink", "Recording", "RoomLink", "StaffSignal", "ToolHandler",
           "VoiceDetector"]

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


class AudioControl(Protocol):
    """The audio engine as the controller sees it: the gate, playback, cues and recording."""

    def set_gate(self, streaming: bool, *, preroll: bool = True) -> None:
        """Open or close the gate that sends cleaned frames to the room link.

        On opening, the pre-roll (the last ``vad.preroll_ms`` before it) goes first unless ``preroll`` is False.
        On closing, frames captured before the close still go out (a busy capture path delivers them late).
        """
        ...

    async def wait_gate_closed(self) -> bool:
        """Return once no frame captured before the gate's last close can still go out.

        True when the voice detection heard the visitor start speaking in what went out since the gate opened:
        on a busy machine the last frames before a release are processed after it, and their voice counts.
        """
        ...

    def clear_playback(self) -> None:
        """Drop queued agent audio at once (barge-in, session end)."""
        ...

    async def play_cue(self, name: str) -> None:
        """Play a local cue (``kiosk.audio.cues``) to the end; cues also feed the echo reference."""
        ...

    def start_recording(self) -> None:
        """Start keeping cleaned capture audio for a visitor's message; voice is segmented afresh from here."""
        ...

    def stop_recording(self) -> Recording:
        """Stop and hand over what was recorded."""
        ...


class MessageStore(Protocol):
    """Durable storage for visitors' messages (the spool)."""

    async def store_recording(self, recording: Recording, note: PersonalText | None = None) -> str:
        """Store ``recording`` (and the agent's ``note``, sealed beside it) durably and return its message id.

        Raises ``KioskError`` if it cannot.
        """
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

    async def begin_turn(self) -> None:
        """Manual turns: the visitor's turn starts (the agent's ``start_turn``); failures are logged, never raised."""
        ...

    async def end_turn(self, commit: bool) -> None:
        """Manual turns: the turn ends, answered (``end_turn``) or dropped (``cancel_turn``); never raises."""
        ...


class ToolHandler(Protocol):
    """Runs the kiosk-side tools the agent calls over RPC (``kiosk.tools.ToolRunner``)."""

    async def call(self, tool: Tool, payload: str, *, trusted: bool, session_id: str,
                   response_timeout_seconds: float | None = None) -> str:
        """Run ``tool`` with the RPC's JSON ``payload``; the JSON result, or ``ToolRefused`` naming why not.

        ``trusted``: the caller is the session's agent (only it may use the tools).
        """
        ...


class StaffSignal(Protocol):
    """The staff-call output (relay, bell or beacon on a GPIO), driven by the panel adapter."""

    def call_staff(self) -> None:
        """Pulse the output once (``panel.staff_output.pulse_seconds``); ``DeviceError`` if it cannot."""
        ...


class Panel(Protocol):
    """Buttons and LEDs (gpiozero, or the virtual terminal panel on a laptop)."""

    def show(self, pattern: str) -> None:
        """Show the named LED pattern (``kiosk.panel.patterns``)."""
        ...

    def close(self) -> None:
        """Release the pins."""
        ...


# ------------------------------------------------------------------------------ the capture chain's ports
@dataclass(frozen=True)
class AecStats:
    """What an echo canceller knows about the echo path."""

    delay_ms: float | None  # estimated bulk delay of the echo behind the reference (None: not yet known)
    drift_ppm: float  # capture clock minus playback clock, as the delay's slope
    erle_db: float  # online echo return loss enhancement over recent far-end-active frames
    converged: bool  # a verified echo path: ERLE good for at least a second
    frames: int  # frames processed since the last reset


class EchoCanceller(Protocol):
    """Removes the echo of the far-end reference from the microphone, one 10 ms frame at a time.

    ``kiosk.audio.aec.make_echo_canceller`` builds the configured one; the capture chain reads ``stats``,
    ``settled`` and ``linear_residual`` to tell a visitor from echo the canceller failed to remove.
    """

    name: str

    def process(self, near: Pcm, far: Pcm) -> Pcm:
        """Cancel the echo of ``far`` in ``near`` (160 int16 samples each); the result is valid until the next call."""
        ...

    def reset(self) -> None:
        """Forget the adapted echo path (after a device or route change)."""
        ...

    def stats(self) -> AecStats:
        """The current estimates."""
        ...

    @property
    def settled(self) -> bool:
        """The echo path held since the last alignment: the output is not echo the canceller lost track of."""
        ...

    @property
    def linear_residual(self) -> Pcm | None:
        """The linear filter's residual of the last frame, before any suppression (None: no such filter)."""
        ...


class VoiceDetector(Protocol):
    """Says, per 10 ms frame (160 int16 samples at 16 kHz), whether the visitor at the kiosk speaks."""

    def is_speech(self, frame: Pcm) -> bool:
        """True if this frame counts as speech."""
        ...

    def reset(self) -> None:
        """Forget adaptive state (route change, new session)."""
        ...
