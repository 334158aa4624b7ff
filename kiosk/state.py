"""The kiosk's behaviour as a pure state machine: ``step(state, event) -> Transition(state, effects)``.

``step`` is synchronous and clock-free: timers are effects (``StartTimer``) whose expiry comes back as a
``TimerExpired`` event, so the same table runs on a virtual clock in tests and on the loop in service.
The controller (``kiosk.controller``) is the only place effects become I/O. docs/behaviour.md describes
the states, modes, barge-in policy and timers, with the transition table.

Two agent contracts live here as well (docs/livekit.md): with manual turns the microphone's gate is the
visitor's turn (``BeginTurn`` as it opens, ``EndTurn(commit)`` as it closes); and the agent's tools arrive as
events (``ToolStarted``/``ToolFinished`` bracket a running tool, during which silence does not end the session;
``MessageRequested`` and ``EndRequested`` hand the visitor over once the agent has finished speaking;
``StaffCalled`` shows the staff pattern for a while).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any

from kiosk.effects import (
    OFFLINE_CUES,
    BeginTurn,
    CancelTimer,
    ClearPlayback,
    CloseSession,
    Cue,
    Effect,
    EndTurn,
    InterruptAgent,
    OfflineReason,
    OpenSession,
    PlayCue,
    ShowPattern,
    SpeakStatus,
    StartPublishing,
    StartRecording,
    StartTimer,
    StopCues,
    StopPublishing,
    StopRecording,
    Timer,
)
from kiosk.events import (
    AgentState,
    AgentStateChanged,
    ApiRefused,
    Button,
    ButtonHeld,
    ButtonPressed,
    ButtonReleased,
    CueFinished,
    DeviceFound,
    DeviceLost,
    EndRequested,
    ErrorOccurred,
    Event,
    LinkLost,
    LinkUp,
    MessageRequested,
    PlaybackFinished,
    PlaybackStarted,
    RecordingFailed,
    RecordingStored,
    RefusalReason,
    Route,
    RouteChanged,
    SessionClosed,
    SessionOpened,
    StaffCalled,
    Started,
    TimerExpired,
    ToolFinished,
    ToolStarted,
    VoiceStarted,
    VoiceStopped,
)
from kiosk.link.backoff import Backoff
from kiosk.personal import PersonalText
from kiosk.settings import (
    InteractionMode,
    InteractionSettings,
    LiveKitSettings,
    PanelSettings,
    SpoolSettings,
    ToolsSettings,
    TurnDetection,
)


class Phase(StrEnum):
    """What the kiosk is doing."""

    STARTING = "starting"
    IDLE = "idle"
    CONNECTING = "connecting"
    LISTENING = "listening"
    THINKING = "thinking"
    SPEAKING = "speaking"
    OFFLINE = "offline"
    RECORDING_MESSAGE = "recording_message"
    ERROR = "error"


# Phases in which a conversation session is open (or opening): leaving them closes it.
SESSION_PHASES = frozenset({Phase.CONNECTING, Phase.LISTENING, Phase.THINKING, Phase.SPEAKING})


class MessageStep(StrEnum):
    """Progress of "leave a message" while offline."""

    NONE = "none"  # nothing offered yet
    OFFER_PLAYING = "offer_playing"  # the reason's cue, then "press to leave a message", play
    OFFERED = "offered"  # a press now records
    TONE = "tone"  # the record tone plays; recording starts when it has played
    RECORDING = "recording"
    SAVING = "saving"  # handed to the store; confirmed only on RecordingStored


class Handover(StrEnum):
    """What the agent asked the kiosk to do once it has finished speaking."""

    NONE = "none"
    MESSAGE = "message"  # take_message: end the session, record the visitor's message (with the agent's note)
    END = "end"  # end_conversation: end the session politely


_DEFAULT_MAX_MESSAGE_SECONDS = 60.0


@dataclass(frozen=True, slots=True)
class Policy:
    """The settings the machine needs (from ``InteractionSettings`` and ``SpoolSettings``)."""

    mode: InteractionMode = InteractionMode.PUSH_TO_TALK
    barge_in: bool = True
    no_speech_timeout_seconds: float = 8.0
    idle_end_seconds: float = 20.0
    max_session_seconds: float = 300.0
    max_message_seconds: float = _DEFAULT_MAX_MESSAGE_SECONDS
    error_hold_seconds: float = 10.0
    status_hold_seconds: float = 5.0  # interaction.status_hold_seconds
    consent_notice: bool = False  # play the AI notice before the microphone first streams in a session
    # Offer "leave a message" while offline. Off when no operator key is configured (spool.recipient_public_key):
    # a message could not be sealed, and a visitor's voice is never stored in the clear.
    messages: bool = True
    turns: TurnDetection = TurnDetection.AUTO  # livekit.turns
    handover_wait_seconds: float = 10.0  # tools.handover_wait_seconds
    staff_pattern_seconds: float = 30.0  # panel.staff_output.pattern_seconds
    # A session lost to a transient room failure (LinkLost(transient=True)) is opened afresh this many times,
    # after reopen_delay_seconds doubling each try up to reopen_max_delay_seconds, before the kiosk goes offline
    # (livekit.reopen_*).
    reopen_attempts: int = 5
    reopen_delay_seconds: float = 0.5
    reopen_max_delay_seconds: float = 2.0

    @classmethod
    def from_settings(cls, interaction: InteractionSettings, spool: SpoolSettings | None = None, *,
                      consent_notice: bool = False, livekit: LiveKitSettings | None = None,
                      tools: ToolsSettings | None = None, panel: PanelSettings | None = None) -> Policy:
        """The policy for these settings (``consent_notice``: ``session.consent_notice``)."""
        staff = panel.staff_output if panel is not None else None
        return cls(
            mode=interaction.mode,
            barge_in=interaction.barge_in,
            no_speech_timeout_seconds=interaction.no_speech_timeout_seconds,
            idle_end_seconds=interaction.idle_end_seconds,
            max_session_seconds=interaction.max_session_seconds,
            max_message_seconds=spool.max_message_seconds if spool is not None else _DEFAULT_MAX_MESSAGE_SECONDS,
            error_hold_seconds=interaction.error_hold_seconds,
            status_hold_seconds=interaction.status_hold_seconds,
            consent_notice=consent_notice,
            messages=spool.recipient_public_key is not None if spool is not None else True,
            turns=livekit.turns if livekit is not None else TurnDetection.AUTO,
            handover_wait_seconds=tools.handover_wait_seconds if tools is not None else 10.0,
            staff_pattern_seconds=staff.pattern_seconds if staff is not None else 30.0,
            reopen_attempts=livekit.reopen_attempts if livekit is not None else 5,
            reopen_delay_seconds=livekit.reopen_delay_seconds if livekit is not None else 0.5,
            reopen_max_delay_seconds=livekit.reopen_max_delay_seconds if livekit is not None else 2.0,
        )

    @property
    def hands_free(self) -> bool:
        """Tap-to-talk and open-mic: voice activity, not the button, gates the microphone."""
        return self.mode is not InteractionMode.PUSH_TO_TALK

    def reopen_delay(self, attempt: int) -> float:
        """The wait before fresh session ``attempt`` (0-based): doubling from ``reopen_delay_seconds`` to the cap.

        No jitter (the machine is pure): only a kiosk with a visitor waiting tries, a few times.
        """
        backoff = Backoff(base_seconds=self.reopen_delay_seconds,
                          max_seconds=max(self.reopen_delay_seconds, self.reopen_max_delay_seconds), attempt=attempt)
        return backoff.ceiling_seconds()

    @property
    def manual_turns(self) -> bool:
        """The kiosk gives the agent its turn boundaries (``livekit.turns``; auto: push-to-talk only)."""
        if self.turns is TurnDetection.AUTO:
            return not self.hands_free
        return self.turns is TurnDetection.MANUAL


@dataclass(frozen=True, slots=True)
class KioskState:
    """Everything the policy needs; immutable, replaced by each step."""

    policy: Policy = field(default_factory=Policy)
    phase: Phase = Phase.STARTING
    online: bool = True
    offline_reason: OfflineReason = OfflineReason.OFFLINE  # meaningful while not online
    route: Route = Route.ARRAY
    echo_path_verified: bool = False  # voice barge-in only on a route whose echo path is verified
    device_ok: bool = True  # an audio route is available
    last_error: str | None = None
    talk_held: bool = False
    voice_active: bool = False  # between VoiceStarted and VoiceStopped
    heard_voice: bool = False  # voice since the last talk press, session start or recording start
    publishing: bool = False  # the microphone gate is open
    playing: bool = False  # agent audio is coming out of the speaker
    message: MessageStep = MessageStep.NONE
    consent_playing: bool = False  # the session's AI notice is playing: the microphone must not stream yet
    start_tone_playing: bool = False  # the session's start tone is playing: the visitor has not had a turn yet
    turn_open: bool = False  # manual turns: BeginTurn sent, EndTurn not yet (follows the gate)
    tool_running: bool = False  # a kiosk tool the agent called is running: silence does not end the session
    handover: Handover = Handover.NONE  # asked for by a tool; happens when the agent has finished speaking
    message_note: PersonalText | None = None  # take_message's summary, until it goes to the store with the audio
    staff_called: bool = False  # call_staff pulsed the output: the LEDs say so for a while
    agent_busy: bool = False  # the agent's last lk.agent.state was thinking or speaking (it has more to say)
    reopens: int = 0  # fresh sessions tried since a session was lost to a room failure (reset once one opens)
    reopen_wait: bool = False  # connecting: the reopen timer runs; OpenSession follows when it expires

    def with_(self, **changes: Any) -> KioskState:
        """A copy with ``changes``."""
        return _replace(self, changes)

    @property
    def voice_barge_in(self) -> bool:
        """Whether the visitor's voice may interrupt the agent (hands-free, enabled, verified echo path)."""
        return self.policy.hands_free and self.policy.barge_in and self.echo_path_verified


_STATE_FIELDS = tuple(f.name for f in fields(KioskState))
_STATE_INDEX = {name: i for i, name in enumerate(_STATE_FIELDS)}
_state_values = operator.attrgetter(*_STATE_FIELDS)


def _replace(state: KioskState, changes: dict[str, Any]) -> KioskState:
    """``dataclasses.replace(state, **changes)`` at a third of its cost; an unknown name is a TypeError, as there.

    Every step makes a state or two, and the state search (tests/unit/test_state.py) steps hundreds of thousands.
    """
    values = list(_state_values(state))
    for name, value in changes.items():
        index = _STATE_INDEX.get(name)
        if index is None:
            raise TypeError(f"KioskState has no field {name!r}")
        values[index] = value
    return KioskState(*values)


@dataclass(frozen=True, slots=True)
class Transition:
    """The result of one step: the next state and the effects to carry out, in order."""

    state: KioskState
    effects: tuple[Effect, ...]


# Phases whose pattern a running tool or a staff call may show over (never while the microphone is live).
_TOOL_PATTERN_PHASES = frozenset({Phase.LISTENING, Phase.THINKING, Phase.SPEAKING})
_STAFF_PATTERN_PHASES = _TOOL_PATTERN_PHASES | {Phase.IDLE}


def pattern_key(state: KioskState) -> str:
    """The name of the LED pattern for ``state`` (``kiosk.panel.patterns.PATTERNS`` maps it to data)."""
    if state.phase is Phase.OFFLINE:
        return state.offline_reason.value
    if state.consent_playing and state.phase in SESSION_PHASES:
        return "consent"
    if not state.publishing:
        if state.tool_running and state.phase in _TOOL_PATTERN_PHASES:
            return "tool"
        if state.staff_called and state.phase in _STAFF_PATTERN_PHASES:
            return "staff_called"
    return state.phase.value


def initial_state(policy: Policy, *, route: Route = Route.ARRAY, echo_path_verified: bool = False) -> KioskState:
    """The state at start-up."""
    return KioskState(policy=policy, route=route, echo_path_verified=echo_path_verified)


def step(state: KioskState, event: Event) -> Transition:
    """Apply ``event`` to ``state``: the next state and the effects (pure, no clock, no I/O)."""
    b = _Builder(state)
    _dispatch(b, event)
    effects = b.effects
    if pattern_key(b.state) != pattern_key(state):
        effects.append(ShowPattern(pattern_key(b.state)))
    return Transition(b.state, tuple(effects))


# ----------------------------------------------------------------------------------------- internals
_REFUSAL_REASONS: dict[RefusalReason, OfflineReason] = {
    RefusalReason.MAINTENANCE: OfflineReason.MAINTENANCE,
    RefusalReason.CREDITS_EXHAUSTED: OfflineReason.CREDITS_EXHAUSTED,
    RefusalReason.BUDGET_CAP: OfflineReason.BUDGET_CAP,
}
_SESSION_TIMERS = (Timer.MAX_SESSION, Timer.NO_SPEECH, Timer.IDLE_END)
# Phases in which the agent converses (its tools' handovers apply): a session, opened.
_CONVERSING = frozenset({Phase.LISTENING, Phase.THINKING, Phase.SPEAKING})
_OFFER = frozenset({MessageStep.OFFER_PLAYING, MessageStep.OFFERED})  # offered, nothing recorded yet


class _Builder:
    """The state being built and the effects so far."""

    def __init__(self, state: KioskState) -> None:
        self.state = state
        self.effects: list[Effect] = []

    @property
    def s(self) -> KioskState:
        return self.state

    def set(self, **changes: Any) -> None:
        self.state = _replace(self.state, changes)

    def do(self, *effects: Effect) -> None:
        self.effects.extend(effects)

    def publish(self, on: bool, *, preroll: bool = True) -> None:
        """Open or close the gate; with manual turns the visitor's turn opens just before and ends just after."""
        if on and self.state.consent_playing:
            return  # nothing streams before the visitor has heard the notice; its end decides again
        if self.state.publishing == on:
            return
        if on and self.state.policy.manual_turns and not self.state.turn_open:
            # First the agent's turn input, then the audio (the pre-roll covers the RPC's travel time).
            self.do(BeginTurn())
            self.set(turn_open=True)
        self.do(StartPublishing(preroll) if on else StopPublishing())
        self.set(publishing=on)
        if on and self.state.talk_held and not self.state.policy.hands_free:
            # The visitor may speak from now on: a hold is a status request only if this long passes in silence.
            self.timer(Timer.STATUS_HOLD, self.state.policy.status_hold_seconds)
        if not on and self.state.turn_open:
            # The turn is committed (answer it) only if the visitor said something; otherwise dropped.
            self.do(EndTurn(commit=self.state.heard_voice))
            self.set(turn_open=False)

    def timer(self, name: Timer, seconds: float) -> None:
        self.do(StartTimer(name, seconds))

    def cancel(self, *names: Timer) -> None:
        self.do(*(CancelTimer(n) for n in names))

    def rest(self) -> None:
        """Back to where the kiosk waits for a visitor: idle if online, else offline (nothing offered)."""
        self.set(phase=Phase.IDLE if self.state.online else Phase.OFFLINE, message=MessageStep.NONE,
                 heard_voice=False, message_note=None)

    def drop_handover(self) -> None:
        """Forget a handover the agent asked for (the visitor spoke up again, or the session ends)."""
        if self.state.handover is not Handover.NONE:
            self.cancel(Timer.HANDOVER)
            self.set(handover=Handover.NONE, message_note=None)

    def leave(self, *, keep_message: bool) -> None:
        """Tear down what the current phase runs (session, recording, offer), without changing phase."""
        s = self.state
        if s.phase in SESSION_PHASES:
            # The session's close ends a manual turn with it: no end_turn into a room being left.
            self.set(turn_open=False)
            self.publish(False)
            self.do(ClearPlayback(), CloseSession())
            self.cancel(*_SESSION_TIMERS)
            self.drop_handover()
            # A tool still running belongs to the session being left: its silence no longer matters.
            self.set(playing=False, consent_playing=False, start_tone_playing=False, tool_running=False,
                     agent_busy=False, reopens=0)
            if s.reopen_wait:
                self.cancel(Timer.REOPEN)
                self.set(reopen_wait=False)
        elif s.phase is Phase.RECORDING_MESSAGE and s.message is MessageStep.RECORDING:
            self.do(StopRecording(keep=keep_message, note=s.message_note if keep_message else None))
            self.cancel(Timer.MAX_MESSAGE, Timer.NO_SPEECH)
            self.set(message_note=None)
        elif s.phase is Phase.OFFLINE and s.message is MessageStep.OFFERED:
            self.cancel(Timer.MESSAGE_OFFER)

    def end_session(self, cue: Cue | None) -> None:
        self.leave(keep_message=True)
        if cue is not None:
            self.do(PlayCue(cue))
        self.rest()

    def explain_offline(self) -> None:
        """Say why the kiosk is offline, then offer a message (only when messages can be sealed and stored)."""
        self.do(PlayCue(OFFLINE_CUES[self.state.offline_reason]))
        if self.state.policy.messages:
            self.do(PlayCue(Cue.LEAVE_MESSAGE))
            self.set(message=MessageStep.OFFER_PLAYING)

    def go_offline(self, reason: OfflineReason, *, visitor_present: bool) -> None:
        """Record the reason; with a visitor present, end the session and say why (then offer a message)."""
        self.set(online=False, offline_reason=reason)
        phase = self.state.phase
        if phase in SESSION_PHASES:
            self.leave(keep_message=True)
            self.set(phase=Phase.OFFLINE, message=MessageStep.NONE, heard_voice=False)
            if visitor_present:
                self.explain_offline()
        elif phase is Phase.IDLE:
            # Nobody asked: show the pattern, say nothing until a visitor presses.
            self.set(phase=Phase.OFFLINE, message=MessageStep.NONE)

    def error(self, code: str, *, device: bool) -> None:
        s = self.state
        visitor_present = s.phase in SESSION_PHASES
        self.leave(keep_message=True)
        if visitor_present and not device:
            self.do(PlayCue(Cue.ERROR))
        self.timer(Timer.ERROR_CLEAR, s.policy.error_hold_seconds)
        self.set(phase=Phase.ERROR, last_error=code, message=MessageStep.NONE, heard_voice=False, message_note=None)
        if device:
            self.set(device_ok=False)


def _dispatch(b: _Builder, event: Event) -> None:
    """Events every state handles the same way first, then the phase's own handler."""
    s = b.s
    match event:
        case DeviceLost():
            b.error("device_lost", device=True)
            return
        case RouteChanged(route=Route.NONE):
            b.set(route=Route.NONE, echo_path_verified=False)
            b.error("no_audio_route", device=True)
            return
        case RouteChanged(route=route, echo_path_verified=verified):
            # A fallback route took over (or the array came back): the session goes on; only the
            # barge-in policy follows the route.
            b.set(route=route, echo_path_verified=verified)
            _device_back(b)
            return
        case DeviceFound():
            _device_back(b)
            return
        case ErrorOccurred(code=code):
            b.error(code or "error", device=False)
            return
        case LinkLost(transient=True) if s.phase in SESSION_PHASES and s.reopens < s.policy.reopen_attempts:
            _reopen(b)
            return
        case LinkLost():
            b.go_offline(OfflineReason.OFFLINE, visitor_present=True)
            return
        case ToolStarted():
            b.set(tool_running=True)
            return
        case ToolFinished():
            b.set(tool_running=False)
            if s.phase in (Phase.LISTENING, Phase.THINKING) and not s.publishing and not s.consent_playing:
                # Silence while the tool ran did not end the session (its timers waited): the wait for the
                # next exchange starts now, so a session whose agent falls silent still ends.
                b.timer(Timer.IDLE_END, s.policy.idle_end_seconds)
            return
        case StaffCalled():
            b.set(staff_called=True)
            b.timer(Timer.STAFF_CALLED, s.policy.staff_pattern_seconds)
            return
        case TimerExpired(name=Timer.STAFF_CALLED):
            b.set(staff_called=False)
            return
        case MessageRequested(note=note) if s.phase in _CONVERSING and s.policy.messages:
            b.set(handover=Handover.MESSAGE, message_note=note)
            b.timer(Timer.HANDOVER, s.policy.handover_wait_seconds)
            return
        case EndRequested() if s.phase in _CONVERSING:
            b.set(handover=Handover.END, message_note=None)
            b.timer(Timer.HANDOVER, s.policy.handover_wait_seconds)
            return
        case TimerExpired(name=Timer.HANDOVER) if s.handover is not Handover.NONE and s.phase in _CONVERSING:
            # The agent did not finish speaking in time (or never spoke): hand over now, unless its answer is
            # still coming out of the speaker (its end hands over) or the visitor is talking.
            if not (s.playing or s.publishing):
                _handover(b)
            return
        case ApiRefused(reason=reason):
            # Every refusal reads as one of four plain reasons to the visitor; the exact one (e.g. an
            # unauthorised device credential) goes to last_error for staff and the status.
            b.set(last_error=f"api_{reason.value}")
            b.go_offline(_REFUSAL_REASONS.get(reason, OfflineReason.OFFLINE), visitor_present=True)
            return
        case LinkUp(proven=proven):
            b.set(online=True)
            if s.phase is Phase.OFFLINE and (s.message is MessageStep.NONE or proven and s.message in _OFFER):
                if s.message is not MessageStep.NONE:
                    # The service is back while a visitor hears or holds the message offer: take it back and
                    # say so, so the next press is a conversation rather than a message nobody needed.
                    b.do(StopCues(), PlayCue(Cue.STATUS_ONLINE))
                b.leave(keep_message=False)
                b.rest()
            # Otherwise a visitor being offered, or leaving, a message keeps that: an unproven "online" (the
            # catalog answers, which says nothing of a 5xx or exhausted credits) may be refused again at the
            # next press, and a recording is never cut. The offer's own end brings the kiosk back to idle.
            return
        case ButtonHeld(button=button):
            _held(b, button)
            return
        case TimerExpired(name=Timer.STATUS_HOLD):
            waiting = s.consent_playing or s.start_tone_playing
            if s.phase in SESSION_PHASES and s.talk_held and s.publishing and not s.heard_voice and not waiting:
                _speak_status(b)
            return
        case ButtonPressed(button=Button.TALK) if s.phase is Phase.RECORDING_MESSAGE:
            b.set(talk_held=True)  # what the visitor said so far still counts: the press may end the message
        case ButtonPressed(button=Button.TALK):
            b.set(talk_held=True, heard_voice=False)
            if s.phase in SESSION_PHASES:
                b.drop_handover()  # the visitor speaks up again: the conversation goes on
        case ButtonReleased(button=Button.TALK):
            b.set(talk_held=False)
        case VoiceStarted():
            b.set(voice_active=True, heard_voice=True)
        case VoiceStopped():
            b.set(voice_active=False)
        case AgentStateChanged(state=agent) if s.phase in SESSION_PHASES:
            b.set(agent_busy=agent in (AgentState.THINKING, AgentState.SPEAKING))
        case PlaybackStarted():
            b.set(playing=True)
        case PlaybackFinished():
            b.set(playing=False)
        case RecordingFailed() if s.phase is not Phase.RECORDING_MESSAGE:
            b.set(last_error="recording_failed")
            return
        case SessionOpened() if s.phase not in SESSION_PHASES:
            # A session we no longer want (cancelled while it opened): close it, it costs money.
            b.do(CloseSession())
            return
        case SessionClosed() if s.phase in SESSION_PHASES and s.phase is not Phase.CONNECTING:
            # While connecting, a SessionClosed is the previous session's (the link runs close and open
            # in order); the new session's failure arrives as LinkLost or ApiRefused.
            b.end_session(Cue.SESSION_END)
            return
        case CueFinished(cue=Cue.SESSION_START) if s.start_tone_playing:
            b.set(start_tone_playing=False)
            return
        case CueFinished(cue=Cue.CONSENT_NOTICE) if s.consent_playing and s.phase in SESSION_PHASES:
            # Voice during the notice was its echo or a visitor talking over it: not a reason to stream; a
            # visitor still holding the button (or still speaking, hands-free) goes live now.
            b.set(consent_playing=False)
            if s.phase is Phase.LISTENING:
                _go_live(b, start_tone=True, preroll=False)
            return
        case ButtonPressed(button=Button.CANCEL):
            _cancel(b)
            return
        case TimerExpired(name=Timer.MAX_SESSION) if s.phase in SESSION_PHASES:
            b.end_session(Cue.SESSION_END)
            return
    handler = _PHASE_HANDLERS.get(b.s.phase)
    if handler is not None:
        handler(b, event)


def _device_back(b: _Builder) -> None:
    if not b.s.device_ok:
        b.set(device_ok=True)
        if b.s.phase is Phase.ERROR:
            b.cancel(Timer.ERROR_CLEAR)
            b.rest()


def _held(b: _Builder, button: Button) -> None:
    """A long hold asks for the status, unless the talk button is held by a visitor who talks or waits to.

    In a conversation the talk button's hold time counts from the moment the microphone went live, not from
    the press: a visitor who pressed waits for the session to open, the AI notice and the start tone before
    speaking, and on a slow connection the press-time hold passed before they could say a word (the field
    bench lost 10 of 67 questions so). There the ``status_hold`` timer, started as the gate opens, decides.
    """
    s = b.s
    if button is Button.TALK and (s.heard_voice or s.phase in SESSION_PHASES):
        return
    if s.message is MessageStep.SAVING:
        return  # the visitor's message is being stored: its confirmation must still play
    _speak_status(b)


def _speak_status(b: _Builder) -> None:
    """The staff's status: in a conversation or an offer, that ends first."""
    s = b.s
    if s.phase in (Phase.STARTING, Phase.ERROR):
        b.do(_status(s))
        return
    b.leave(keep_message=False)
    b.do(_status(b.s))
    b.rest()


def _status(s: KioskState) -> SpeakStatus:
    return SpeakStatus(online=s.online, offline_reason=None if s.online else s.offline_reason,
                       route=s.route.value, last_error=s.last_error)


def _cancel(b: _Builder) -> None:
    """The cancel button ends a session, a recording or an offer."""
    s = b.s
    if s.message is MessageStep.SAVING:
        return  # the message is already being stored: its confirmation must still play
    if s.phase in SESSION_PHASES:
        b.end_session(Cue.SESSION_END)
    elif s.phase is Phase.RECORDING_MESSAGE:
        b.leave(keep_message=False)
        b.rest()
    elif s.phase is Phase.OFFLINE and s.message is not MessageStep.NONE:
        b.leave(keep_message=False)
        b.set(message=MessageStep.NONE)


def _open(b: _Builder) -> None:
    b.do(OpenSession())
    b.timer(Timer.MAX_SESSION, b.s.policy.max_session_seconds)
    b.set(phase=Phase.CONNECTING, heard_voice=b.s.voice_active, playing=False)


def _idle(b: _Builder, event: Event) -> None:
    s = b.s
    match event:
        case ButtonPressed(button=Button.TALK):
            _open(b)
        case VoiceStarted() if s.policy.mode is InteractionMode.OPEN_MIC:
            _open(b)


def _starting(b: _Builder, event: Event) -> None:
    if isinstance(event, Started):
        b.rest()


def _reopen(b: _Builder) -> None:
    """A session was lost to a room failure (a server restarting, a reconnect that failed): try a fresh one.

    The session is left as any other, the kiosk shows ``connecting`` and opens a fresh session after a short,
    doubling wait; ``SessionOpened`` goes on as a press would (the start tone, the microphone if the button is
    held), ``ApiRefused`` or the last attempt's ``LinkLost`` takes the kiosk offline as before. Only while a
    visitor is there, and at most ``reopen_attempts`` times: a service that is really down is not hammered.
    """
    attempt = b.s.reopens
    b.leave(keep_message=False)
    b.timer(Timer.REOPEN, b.s.policy.reopen_delay(attempt))
    b.set(phase=Phase.CONNECTING, reopens=attempt + 1, reopen_wait=True, heard_voice=False)


def _connecting(b: _Builder, event: Event) -> None:
    s = b.s
    p = s.policy
    match event:
        case TimerExpired(name=Timer.REOPEN) if s.reopen_wait:
            b.set(reopen_wait=False)
            _open(b)
        case SessionOpened() if s.reopen_wait:
            # Not the fresh session (that is not asked for yet): a late one, closed as any unwanted session.
            b.do(CloseSession())
        case SessionOpened() if p.consent_notice:
            # The visitor hears that an AI processes what they say before anything is streamed; the LED shows
            # the notice. Its end (CueFinished) goes live as a session without the notice does here.
            b.set(phase=Phase.LISTENING, consent_playing=True)
            b.do(PlayCue(Cue.CONSENT_NOTICE))
        case SessionOpened():
            b.set(phase=Phase.LISTENING)
            _go_live(b, start_tone=not s.voice_active)
        case ButtonPressed(button=Button.TALK) if p.hands_free and s.reopens:
            # The kiosk is bringing a lost conversation back: a visitor who taps now most likely means "I am still
            # here" (the answer stopped), so the tap does not end it; the cancel button does.
            pass
        case ButtonPressed(button=Button.TALK) if p.hands_free:
            # The next tap ends it, even before it opened.
            b.end_session(None)


def _go_live(b: _Builder, *, start_tone: bool, preroll: bool = True) -> None:
    """The session is open and may stream: the start tone, then the microphone as the mode says.

    ``preroll=False`` after the AI notice: what was said while it played is not sent.
    """
    s = b.s
    p = s.policy
    if start_tone:
        b.do(PlayCue(Cue.SESSION_START))
        b.set(start_tone_playing=True)
    if not p.hands_free:
        if s.talk_held:
            b.publish(True, preroll=preroll)
        else:
            b.timer(Timer.IDLE_END, p.idle_end_seconds)
    elif s.voice_active:
        b.publish(True, preroll=preroll)
    else:
        b.timer(Timer.NO_SPEECH, p.no_speech_timeout_seconds)


def _barge_in(b: _Builder) -> None:
    b.do(ClearPlayback(), InterruptAgent())
    b.drop_handover()
    b.set(playing=False, phase=Phase.LISTENING)


def _handover(b: _Builder) -> None:
    """Do what the agent's tool asked for, now that the agent has finished speaking."""
    s = b.s
    if s.handover is Handover.MESSAGE:
        note = s.message_note
        b.leave(keep_message=True)
        # The offline recorder's flow, online: the tone, then the visitor's message, stored with the note.
        b.do(PlayCue(Cue.RECORDING_TONE))
        b.set(phase=Phase.RECORDING_MESSAGE, message=MessageStep.TONE, message_note=note, heard_voice=False)
    else:
        b.end_session(Cue.SESSION_END)


def _agent_done(s: KioskState) -> bool:
    """A handover is due: the agent has said all it will (its state) and it has played out; nobody talks."""
    return s.handover is not Handover.NONE and not (s.agent_busy or s.playing or s.publishing or s.consent_playing)


def _listening(b: _Builder, event: Event) -> None:
    s = b.s
    p = s.policy
    match event:
        case ButtonPressed(button=Button.TALK) if p.hands_free:
            b.end_session(Cue.SESSION_END)
        case _ if s.consent_playing:
            # Until the notice has played, buttons and voice only update the state (in _dispatch); the
            # notice's own playback is not the agent speaking.
            return
        case ButtonPressed(button=Button.TALK) if not p.hands_free:
            b.publish(True)
            b.cancel(Timer.IDLE_END)
        case ButtonReleased(button=Button.TALK) if not p.hands_free:
            was_publishing = s.publishing
            b.publish(False)
            b.timer(Timer.IDLE_END, p.idle_end_seconds)
            if was_publishing and s.heard_voice:
                b.set(phase=Phase.THINKING)
        case VoiceStarted() if p.hands_free:
            b.publish(True)
            b.cancel(Timer.NO_SPEECH, Timer.IDLE_END)
        case VoiceStarted() if s.talk_held:
            b.cancel(Timer.IDLE_END)
        case VoiceStopped() if p.hands_free and s.publishing:
            b.publish(False)
            b.timer(Timer.IDLE_END, p.idle_end_seconds)
            b.set(phase=Phase.THINKING)
        case TimerExpired(name=Timer.NO_SPEECH | Timer.IDLE_END) if not (s.voice_active or s.talk_held
                                                                          or s.tool_running):
            b.end_session(Cue.SESSION_END)
        case AgentStateChanged(state=AgentState.LISTENING | AgentState.IDLE) if _agent_done(s):
            _handover(b)
        case AgentStateChanged(state=AgentState.SPEAKING) | PlaybackStarted() if not s.publishing:
            b.cancel(Timer.IDLE_END, Timer.NO_SPEECH)
            b.set(phase=Phase.SPEAKING)


def _thinking(b: _Builder, event: Event) -> None:
    s = b.s
    p = s.policy
    match event:
        case AgentStateChanged(state=AgentState.SPEAKING) | PlaybackStarted():
            b.cancel(Timer.IDLE_END)
            b.set(phase=Phase.SPEAKING)
        case ButtonPressed(button=Button.TALK) if not p.hands_free:
            b.publish(True)
            b.cancel(Timer.IDLE_END)
            b.set(phase=Phase.LISTENING)
        case ButtonPressed(button=Button.TALK):
            b.end_session(Cue.SESSION_END)
        case VoiceStarted() if p.hands_free:
            b.publish(True)
            b.cancel(Timer.IDLE_END)
            b.set(phase=Phase.LISTENING)
        case AgentStateChanged(state=AgentState.LISTENING | AgentState.IDLE) if _agent_done(s):
            _handover(b)
        case TimerExpired(name=Timer.IDLE_END) if not s.tool_running:
            b.end_session(Cue.SESSION_END)


def _speaking(b: _Builder, event: Event) -> None:
    s = b.s
    p = s.policy
    match event:
        case PlaybackFinished() | AgentStateChanged(state=AgentState.LISTENING | AgentState.IDLE) if not b.s.playing:
            if _agent_done(b.s):
                _handover(b)
                return
            b.set(phase=Phase.LISTENING)
            b.timer(Timer.IDLE_END, p.idle_end_seconds)
        case ButtonPressed(button=Button.TALK):
            # Barge-in by press works on every route: a press is never the agent's own echo.
            _barge_in(b)
            if p.hands_free:
                b.timer(Timer.IDLE_END, p.idle_end_seconds)
            else:
                b.publish(True)
        case VoiceStarted() if s.voice_barge_in:
            _barge_in(b)
            b.publish(True)
        case VoiceStopped() if s.publishing:
            b.publish(False)


def _offline(b: _Builder, event: Event) -> None:
    s = b.s
    match event:
        case ButtonPressed(button=Button.TALK) if s.message is MessageStep.NONE:
            b.explain_offline()
        case ButtonPressed(button=Button.TALK) if s.message is MessageStep.OFFERED:
            b.cancel(Timer.MESSAGE_OFFER)
            b.do(PlayCue(Cue.RECORDING_TONE))
            b.set(phase=Phase.RECORDING_MESSAGE, message=MessageStep.TONE)
        case CueFinished(cue=Cue.LEAVE_MESSAGE) if s.message is MessageStep.OFFER_PLAYING:
            b.timer(Timer.MESSAGE_OFFER, s.policy.idle_end_seconds)
            b.set(message=MessageStep.OFFERED)
        case TimerExpired(name=Timer.MESSAGE_OFFER) if s.message is MessageStep.OFFERED:
            # Idle again if the service came back while the offer stood (an unproven LinkUp leaves the offer be).
            b.rest()


def _recording(b: _Builder, event: Event) -> None:
    s = b.s
    p = s.policy
    recording = s.message is MessageStep.RECORDING
    match event:
        case CueFinished(cue=Cue.RECORDING_TONE) if s.message is MessageStep.TONE:
            b.do(StartRecording())
            b.timer(Timer.MAX_MESSAGE, p.max_message_seconds)
            b.timer(Timer.NO_SPEECH, p.no_speech_timeout_seconds)
            # Only voice that starts once recording runs counts: voice reported across the tone is mostly
            # the tone's own echo, and letting it count ends the message at the first VoiceStopped. The engine
            # segments voice afresh as recording starts, so a visitor who began at once is reported again.
            b.set(message=MessageStep.RECORDING, heard_voice=False, voice_active=False)
        case VoiceStarted() if recording:
            b.cancel(Timer.NO_SPEECH)
        case VoiceStopped() if recording and s.heard_voice:
            # A message ends on silence, a second press or its time limit, never on a release: the visitor taps
            # (or holds) to start it, and the recording tone's echo may already have been taken for voice.
            _finish_recording(b)
        case ButtonPressed(button=Button.TALK) if recording:
            # Pressing again ends the message; with nothing said there is nothing to keep.
            if s.heard_voice:
                _finish_recording(b)
            else:
                b.leave(keep_message=False)
                b.rest()
        case TimerExpired(name=Timer.MAX_MESSAGE) if recording:
            _finish_recording(b)
        case TimerExpired(name=Timer.NO_SPEECH) if recording and not s.heard_voice:
            b.leave(keep_message=False)
            b.rest()
        case RecordingStored() if s.message is MessageStep.SAVING:
            b.do(PlayCue(Cue.MESSAGE_STORED))
            b.rest()
        case RecordingFailed() if s.message is MessageStep.SAVING:
            b.do(PlayCue(Cue.MESSAGE_FAILED))
            b.set(last_error="recording_failed")
            b.rest()


def _finish_recording(b: _Builder) -> None:
    b.leave(keep_message=True)
    b.set(message=MessageStep.SAVING)


def _error(b: _Builder, event: Event) -> None:
    if isinstance(event, TimerExpired) and event.name == Timer.ERROR_CLEAR and b.s.device_ok:
        b.rest()


_PHASE_HANDLERS = {
    Phase.STARTING: _starting,
    Phase.IDLE: _idle,
    Phase.CONNECTING: _connecting,
    Phase.LISTENING: _listening,
    Phase.THINKING: _thinking,
    Phase.SPEAKING: _speaking,
    Phase.OFFLINE: _offline,
    Phase.RECORDING_MESSAGE: _recording,
    Phase.ERROR: _error,
}
