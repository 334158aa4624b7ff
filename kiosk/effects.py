"""Effects: imperative commands that ``state.step`` returns and only the controller turns into I/O.

Effects are small frozen dataclasses. Cue and timer names are enums so the state machine, the
controller, the cue files and the docs share one spelling.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kiosk.personal import PersonalText


class Cue(StrEnum):
    """Local cues the state machine asks for (``kiosk.audio.cues`` ships one per name and language)."""

    SESSION_START = "session_start"  # tone: the session is open, the microphone can go live
    SESSION_END = "session_end"  # tone: the conversation ended (timeout, cap, cancel)
    OFFLINE = "offline"  # no network / service unreachable
    MAINTENANCE = "maintenance"  # the model is in maintenance
    CREDITS_EXHAUSTED = "credits_exhausted"  # the account has no credits left
    BUDGET_CAP = "budget_cap"  # the site's spending cap is reached
    LEAVE_MESSAGE = "leave_message"  # follows the offline cue: "press the button, speak after the tone"
    RECORDING_TONE = "recording_tone"  # recording starts after this tone
    MESSAGE_STORED = "message_stored"  # played only after RecordingStored
    MESSAGE_FAILED = "message_failed"  # the message could not be stored
    ERROR = "error"  # something failed during a conversation
    CONSENT_NOTICE = "consent_notice"  # "this assistant uses AI": before the microphone first streams
    # Status (a long hold): the controller plays these in sequence, see ``status_cues``.
    STATUS_PREAMBLE = "status_preamble"
    STATUS_ONLINE = "status_online"
    STATUS_ROUTE_ARRAY = "status_route_array"
    STATUS_ROUTE_HEADSET = "status_route_headset"
    STATUS_ROUTE_NONE = "status_route_none"
    STATUS_NO_ERROR = "status_no_error"
    STATUS_LAST_ERROR = "status_last_error"


class Timer(StrEnum):
    """Named timers; a ``StartTimer`` with a running name restarts it."""

    MAX_SESSION = "max_session"  # hard cap on one conversation (cost cap)
    NO_SPEECH = "no_speech"  # a hands-free session (or a message) nobody speaks in
    IDLE_END = "idle_end"  # no exchange for a while: end the session
    MAX_MESSAGE = "max_message"  # longest visitor message
    MESSAGE_OFFER = "message_offer"  # how long "press to leave a message" stays open
    ERROR_CLEAR = "error_clear"  # how long a recoverable error shows before returning to rest
    HANDOVER = "handover"  # longest wait for the agent to finish speaking before a tool's handover happens
    STAFF_CALLED = "staff_called"  # how long the "staff called" LED pattern shows after call_staff
    # The talk button held since the microphone went live, without a word: the staff's status request.
    STATUS_HOLD = "status_hold"
    # A session lost to a transient room failure: the wait before a fresh one is opened (livekit.reopen_*).
    REOPEN = "reopen"


class OfflineReason(StrEnum):
    """Why the kiosk cannot hold a conversation; each has its own cue and LED pattern."""

    OFFLINE = "offline"
    MAINTENANCE = "maintenance"
    CREDITS_EXHAUSTED = "credits_exhausted"
    BUDGET_CAP = "budget_cap"


OFFLINE_CUES: dict[OfflineReason, Cue] = {
    OfflineReason.OFFLINE: Cue.OFFLINE,
    OfflineReason.MAINTENANCE: Cue.MAINTENANCE,
    OfflineReason.CREDITS_EXHAUSTED: Cue.CREDITS_EXHAUSTED,
    OfflineReason.BUDGET_CAP: Cue.BUDGET_CAP,
}


@dataclass(frozen=True, slots=True)
class Effect:
    """Base of every effect."""


@dataclass(frozen=True, slots=True)
class OpenSession(Effect):
    """Get a session from the session API and join its room (``RoomLink.open``)."""


@dataclass(frozen=True, slots=True)
class CloseSession(Effect):
    """Leave the room (``RoomLink.close``); cancels an open still in progress."""


@dataclass(frozen=True, slots=True)
class StartPublishing(Effect):
    """Open the gate: cleaned microphone frames go to the room (the pre-roll first, unless ``preroll`` is off)."""

    preroll: bool = True


@dataclass(frozen=True, slots=True)
class StopPublishing(Effect):
    """Close the gate: nothing is streamed (nor billed)."""


@dataclass(frozen=True, slots=True)
class ClearPlayback(Effect):
    """Drop queued agent audio at once."""


@dataclass(frozen=True, slots=True)
class StopCues(Effect):
    """Stop the local cue that plays and drop the queued ones (no ``CueFinished`` for them)."""


@dataclass(frozen=True, slots=True)
class InterruptAgent(Effect):
    """Ask the agent to stop speaking (barge-in)."""


@dataclass(frozen=True, slots=True)
class PlayCue(Effect):
    """Play a local cue; the controller posts ``CueFinished(name)`` when it has played."""

    name: Cue


@dataclass(frozen=True, slots=True)
class ShowPattern(Effect):
    """Show an LED pattern (``kiosk.panel.patterns``)."""

    name: str


@dataclass(frozen=True, slots=True)
class StartTimer(Effect):
    """Start (or restart) a named timer; it posts ``TimerExpired(name)``."""

    name: Timer
    seconds: float


@dataclass(frozen=True, slots=True)
class CancelTimer(Effect):
    """Cancel a named timer; a no-op if it is not running."""

    name: Timer


@dataclass(frozen=True, slots=True)
class StartRecording(Effect):
    """Start keeping cleaned capture audio for a visitor's message."""


@dataclass(frozen=True, slots=True)
class StopRecording(Effect):
    """Stop recording; ``keep`` hands the message to the store (which posts RecordingStored/Failed).

    ``note``: the agent's one-line summary (``take_message``), stored sealed beside the recording.
    """

    keep: bool = True
    note: PersonalText | None = None


@dataclass(frozen=True, slots=True)
class BeginTurn(Effect):
    """Manual turns: the visitor's microphone goes live, the agent's turn input opens (its ``start_turn`` RPC)."""


@dataclass(frozen=True, slots=True)
class EndTurn(Effect):
    """Manual turns: the microphone closed; the turn ends.

    ``commit`` (the visitor spoke) asks for an answer (``end_turn``), otherwise the turn is dropped (``cancel_turn``).
    """

    commit: bool = True


@dataclass(frozen=True, slots=True)
class SpeakStatus(Effect):
    """Say the kiosk's status (a long hold): online or why not, the audio route, the last error."""

    online: bool
    offline_reason: OfflineReason | None
    route: str
    last_error: str | None


def status_cues(effect: SpeakStatus) -> list[Cue]:
    """The cues, in order, that say ``effect``'s status."""
    cues = [Cue.STATUS_PREAMBLE]
    cues.append(Cue.STATUS_ONLINE if effect.online else OFFLINE_CUES[effect.offline_reason or OfflineReason.OFFLINE])
    cues.append({"array": Cue.STATUS_ROUTE_ARRAY, "headset": Cue.STATUS_ROUTE_HEADSET}.get(
        effect.route, Cue.STATUS_ROUTE_NONE))
    cues.append(Cue.STATUS_LAST_ERROR if effect.last_error else Cue.STATUS_NO_ERROR)
    return cues
