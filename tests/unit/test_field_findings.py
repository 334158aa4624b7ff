"""What the field bench (docs/field.md) found in the behaviour, replayed through the pure state machine.

Each test replays the steps the kiosk took in a field run (the order and the events come from the kiosk's
trace), then says what should happen instead; each failed before its fix.
"""

from __future__ import annotations

from kiosk.effects import CloseSession, Cue, SpeakStatus, StartTimer, StopRecording, Timer
from kiosk.events import (
    ApiRefused,
    ButtonHeld,
    ButtonPressed,
    ButtonReleased,
    CueFinished,
    Event,
    LinkLost,
    RefusalReason,
    SessionOpened,
    Started,
    TimerExpired,
    VoiceStarted,
    VoiceStopped,
)
from kiosk.state import KioskState, MessageStep, Phase, Policy, initial_state, step


def run(state: KioskState, *events: Event) -> tuple[KioskState, list[object]]:
    effects: list[object] = []
    for event in events:
        transition = step(state, event)
        state = transition.state
        effects += transition.effects
    return state, effects


def idle() -> KioskState:
    state, _ = run(initial_state(Policy()), Started())
    return state


def test_holding_the_talk_button_until_the_start_tone_is_not_a_status_request() -> None:
    """Field bench, loaded machine: press at 0.07 s, SessionOpened at 4.46 s (the start tone began), ButtonHeld at
    5.12 s while the tone still played: the kiosk closed the session and spoke the staff status. The visitor had
    held the button since the press, waiting for the tone, and had had no chance to speak."""
    # Still connecting when the hold time is reached.
    state, effects = run(idle(), ButtonPressed(), ButtonHeld())
    assert state.phase is Phase.CONNECTING and CloseSession() not in effects
    assert not any(isinstance(e, SpeakStatus) for e in effects)
    # Opened, the start tone still playing, when the hold time is reached (what the trace shows).
    state, effects = run(idle(), ButtonPressed(), SessionOpened("s1"), ButtonHeld())
    assert state.phase is Phase.LISTENING and state.publishing and CloseSession() not in effects
    assert not any(isinstance(e, SpeakStatus) for e in effects)


def test_the_hold_time_counts_from_when_the_microphone_went_live() -> None:
    """Field bench, loaded machine (10 of 67 questions): press at 0, SessionOpened at 3.3 s, start tone done at
    3.6 s, the visitor starts speaking, ButtonHeld at 5.0 s before the voice detection had reported them: the
    kiosk closed the session and spoke the staff status. The hold now counts from the gate's opening."""
    state, effects = run(idle(), ButtonPressed(), SessionOpened("s1"), CueFinished(Cue.SESSION_START), ButtonHeld())
    assert state.phase is Phase.LISTENING and state.publishing and CloseSession() not in effects
    assert not any(isinstance(e, SpeakStatus) for e in effects)
    assert StartTimer(Timer.STATUS_HOLD, state.policy.status_hold_seconds) in run(
        idle(), ButtonPressed(), SessionOpened("s1"))[1]
    # The visitor speaks: their turn, however long the hold.
    spoke, effects = run(state, VoiceStarted(), TimerExpired(Timer.STATUS_HOLD))
    assert spoke.phase is Phase.LISTENING and not any(isinstance(e, SpeakStatus) for e in effects)


def test_a_silent_hold_from_when_the_microphone_went_live_still_asks_for_the_status() -> None:
    """Staff with a one-button panel: held in silence for the hold time once live, the status is spoken."""
    state, effects = run(idle(), ButtonPressed(), SessionOpened("s1"), CueFinished(Cue.SESSION_START),
                         ButtonHeld(), TimerExpired(Timer.STATUS_HOLD))
    assert state.phase is Phase.IDLE and CloseSession() in effects
    assert any(isinstance(e, SpeakStatus) for e in effects)
    # Released in between: the timer that fires later is no status request.
    state, effects = run(idle(), ButtonPressed(), SessionOpened("s1"), CueFinished(Cue.SESSION_START),
                         ButtonReleased(), TimerExpired(Timer.STATUS_HOLD))
    assert not any(isinstance(e, SpeakStatus) for e in effects)


def _offered() -> KioskState:
    state, _ = run(idle(), ButtonPressed(), ApiRefused(RefusalReason.CREDITS_EXHAUSTED), ButtonReleased(),
                   CueFinished(Cue.CREDITS_EXHAUSTED), CueFinished(Cue.LEAVE_MESSAGE))
    assert state.phase is Phase.OFFLINE and state.message is MessageStep.OFFERED
    return state


def test_the_release_of_the_tap_that_starts_a_message_does_not_end_it() -> None:
    """Field bench: the tap's release came just after the recording tone, when the tone's own echo had already
    been reported as voice, so the release ended the recording: a 0.1 s message was stored and "your message has
    been saved" played before the visitor said a word."""
    state, _ = run(_offered(), ButtonPressed(), CueFinished(Cue.RECORDING_TONE), VoiceStarted())  # the tone's echo
    assert state.message is MessageStep.RECORDING
    state, effects = run(state, ButtonReleased())
    assert state.message is MessageStep.RECORDING and not any(isinstance(e, StopRecording) for e in effects)


def test_a_message_still_ends_on_silence_or_the_next_press() -> None:
    started, _ = run(_offered(), ButtonPressed(), CueFinished(Cue.RECORDING_TONE), ButtonReleased(), VoiceStarted())
    state, effects = run(started, VoiceStopped())
    assert StopRecording(keep=True) in effects and state.message is MessageStep.SAVING
    state, effects = run(started, ButtonPressed())
    assert StopRecording(keep=True) in effects and state.message is MessageStep.SAVING
    # A visitor who held the button through the tone and spoke ends the message by going quiet, not by letting go.
    held, _ = run(_offered(), ButtonPressed(), CueFinished(Cue.RECORDING_TONE), VoiceStarted())
    state, effects = run(held, ButtonReleased(), VoiceStopped())
    assert StopRecording(keep=True) in effects and state.message is MessageStep.SAVING


def test_a_visitor_who_speaks_as_the_tone_ends_is_recorded() -> None:
    """Suite on a loaded machine: voice began across the recording tone (its echo, then the visitor at once) and
    its one VoiceStopped came once recording ran; that voice never counted, so the no-speech timer discarded the
    message. The engine segments voice afresh as recording starts and reports the visitor again."""
    state, _ = run(_offered(), ButtonPressed(), VoiceStarted(), CueFinished(Cue.RECORDING_TONE))
    assert state.message is MessageStep.RECORDING and not state.voice_active and not state.heard_voice
    state, effects = run(state, VoiceStarted(), VoiceStopped())  # the visitor, reported anew
    assert StopRecording(keep=True) in effects and state.message is MessageStep.SAVING


def test_the_offline_replay_starts_where_the_field_run_did() -> None:
    """The offline path reaches the recording as the field run did (so the test above replays that run)."""
    state, _ = run(idle(), LinkLost("down"), ButtonPressed(), CueFinished(Cue.OFFLINE), CueFinished(Cue.LEAVE_MESSAGE),
                   ButtonPressed(), CueFinished(Cue.RECORDING_TONE), VoiceStarted())
    assert state.message is MessageStep.RECORDING
