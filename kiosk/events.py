"""Events: past-tense facts that reach the controller from the edges (buttons, audio, link, timers).

Events are small frozen dataclasses; adapters post them into the one asyncio loop (from other threads
with ``loop.call_soon_threadsafe``), and ``state.step`` turns them into a new state and effects.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from kiosk.effects import Cue, Timer
from kiosk.personal import PersonalText


class Button(StrEnum):
    """Which physical (or virtual-panel) button."""

    TALK = "talk"
    CANCEL = "cancel"


class AgentState(StrEnum):
    """Values of the agent participant's ``lk.agent.state`` attribute."""

    INITIALIZING = "initializing"
    IDLE = "idle"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"


class RefusalReason(StrEnum):
    """Why the session API (or the catalog) refused a session."""

    UNAUTHORISED = "unauthorised"
    CREDITS_EXHAUSTED = "credits_exhausted"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    MALFORMED_REPLY = "malformed_reply"
    MAINTENANCE = "maintenance"
    BUDGET_CAP = "budget_cap"
    UNREACHABLE = "unreachable"


class Tool(StrEnum):
    """The kiosk-side tools the agent may call over LiveKit RPC (``kiosk.tools``; docs/livekit.md)."""

    CALL_STAFF = "call_staff"  # pulse the staff-call output (relay, bell, beacon)
    TAKE_MESSAGE = "take_message"  # hand the visitor to the message recorder, with the agent's summary
    END_CONVERSATION = "end_conversation"  # end the session once the agent has said goodbye
    KIOSK_STATUS = "kiosk_status"  # route, online state, messages waiting (nothing personal)


class Route(StrEnum):
    """The audio route in use."""

    ARRAY = "array"
    HEADSET = "headset"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event."""


@dataclass(frozen=True, slots=True)
class Started(Event):
    """The kiosk finished starting (devices opened, first link attempt made)."""


@dataclass(frozen=True, slots=True)
class ButtonPressed(Event):
    """A button went down."""

    button: Button = Button.TALK


@dataclass(frozen=True, slots=True)
class ButtonReleased(Event):
    """A button came up."""

    button: Button = Button.TALK


@dataclass(frozen=True, slots=True)
class ButtonHeld(Event):
    """A button has been held for the configured hold time."""

    button: Button = Button.TALK


@dataclass(frozen=True, slots=True)
class VoiceStarted(Event):
    """The visitor started speaking (after pre-roll and minimum-speech checks)."""

    at_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class VoiceStopped(Event):
    """The visitor stopped speaking (after the hangover)."""

    at_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class SessionOpened(Event):
    """The room link is connected and the agent's audio path is ready."""

    session_id: str = ""


@dataclass(frozen=True, slots=True)
class SessionClosed(Event):
    """The session ended (by us, or the room went away for good)."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class ApiRefused(Event):
    """The session API or the catalog refused a session."""

    reason: RefusalReason = RefusalReason.SERVER_ERROR
    detail: str = ""


@dataclass(frozen=True, slots=True)
class AgentStateChanged(Event):
    """The agent's ``lk.agent.state`` changed."""

    state: AgentState = AgentState.IDLE


@dataclass(frozen=True, slots=True)
class PlaybackStarted(Event):
    """Agent (or cue) audio started coming out of the speaker."""


@dataclass(frozen=True, slots=True)
class PlaybackFinished(Event):
    """The playout buffer ran empty after agent (or cue) audio."""


@dataclass(frozen=True, slots=True)
class CueFinished(Event):
    """A local cue finished playing."""

    cue: Cue


@dataclass(frozen=True, slots=True)
class LinkUp(Event):
    """What the kiosk needs online (session API, catalog, LiveKit) is reachable again.

    ``proven``: the check behind it covers every refusal seen since the kiosk went offline (the API unreachable
    or timing out, the model in maintenance, a room whose server took no connections), so the next session should
    be granted. False when it cannot tell: a 401, a 5xx, a malformed reply, a rate limit, exhausted credits or a
    budget cap refuse the session request while the catalog still answers, and no check shows an agent will come.
    """

    proven: bool = False


@dataclass(frozen=True, slots=True)
class LinkLost(Event):
    """The room link dropped for good, or the session API is unreachable.

    ``transient``: the room itself failed (its server refused the connection, the SDK gave up, a reconnect did
    not succeed), so a fresh session may open at once and the state machine tries again a few times before
    going offline; False when the session opened but no agent came, where another try would keep the visitor
    waiting as long again.
    """

    reason: str = ""
    transient: bool = True


@dataclass(frozen=True, slots=True)
class LinkReconnecting(Event):
    """The rtc SDK is resuming or reconnecting; the session goes on if it succeeds."""


@dataclass(frozen=True, slots=True)
class DeviceLost(Event):
    """A sound device vanished or stopped delivering frames."""

    device: str = ""


@dataclass(frozen=True, slots=True)
class DeviceFound(Event):
    """A sound device (re)appeared and opened."""

    device: str = ""


@dataclass(frozen=True, slots=True)
class HeadsetPlugged(Event):
    """A configured headset appeared."""


@dataclass(frozen=True, slots=True)
class HeadsetUnplugged(Event):
    """The headset went away."""


@dataclass(frozen=True, slots=True)
class RouteChanged(Event):
    """The audio route switched; ``echo_path_verified`` says whether barge-in by voice is safe on it."""

    route: Route = Route.ARRAY
    echo_path_verified: bool = True


@dataclass(frozen=True, slots=True)
class TimerExpired(Event):
    """A timer started by a ``StartTimer`` effect ran out."""

    name: Timer


@dataclass(frozen=True, slots=True)
class RecordingStored(Event):
    """A visitor's message is durably stored (safe to confirm)."""

    message_id: str = ""


@dataclass(frozen=True, slots=True)
class RecordingFailed(Event):
    """A visitor's message could not be stored."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class ErrorOccurred(Event):
    """Something failed that the kiosk must show (error pattern) and recover from."""

    code: str = ""
    message: str = ""


@dataclass(frozen=True, slots=True)
class ToolStarted(Event):
    """The agent called a kiosk tool and it is running (the session must not end on silence meanwhile)."""

    tool: Tool = Tool.KIOSK_STATUS


@dataclass(frozen=True, slots=True)
class ToolFinished(Event):
    """A kiosk tool finished (``outcome``: ``ok`` or the refusal's code)."""

    tool: Tool = Tool.KIOSK_STATUS
    outcome: str = "ok"


@dataclass(frozen=True, slots=True)
class MessageRequested(Event):
    """The agent asked the kiosk to record the visitor's message (``take_message``), with its summary.

    The summary is personal data: it travels as ``PersonalText`` (never in a log line) to the sealed store.
    """

    note: PersonalText | None = None


@dataclass(frozen=True, slots=True)
class EndRequested(Event):
    """The agent asked the kiosk to end the conversation (``end_conversation``) once it has said goodbye."""


@dataclass(frozen=True, slots=True)
class StaffCalled(Event):
    """The staff-call output was pulsed (``call_staff``): the LEDs say staff are on their way for a while."""
