"""The controller end to end on virtual time: a mock pin is driven, gpiozero posts the event, the machine
steps, the controller carries out the effects (gate, session, cues, timers) and the LED pins follow."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from kiosk.bus import EventBus
from kiosk.effects import CloseSession, InterruptAgent, OpenSession, SpeakStatus, StartPublishing
from kiosk.events import (
    AgentState,
    AgentStateChanged,
    Button,
    ButtonPressed,
    DeviceFound,
    DeviceLost,
    ErrorOccurred,
    LinkLost,
    LinkUp,
    PlaybackFinished,
    PlaybackStarted,
    RefusalReason,
    Route,
    RouteChanged,
    SessionOpened,
    VoiceStarted,
    VoiceStopped,
)
from kiosk.settings import InteractionMode, InteractionSettings
from kiosk_dev.behaviour import Rig

MakeRig = Callable[..., Awaitable[Rig]]
GREEN = (0.0, 1.0, 0.0)
RED = (1.0, 0.0, 0.0)


def rgb(rig: Rig) -> tuple[float, ...]:
    return tuple(float(rig.pin(p).state) for p in (22, 23, 24))


async def test_push_to_talk_end_to_end(make_rig: MakeRig) -> None:
    rig = await make_rig(mode=InteractionMode.PUSH_TO_TALK)
    assert rig.phase == "idle" and rig.panel.pattern is not None and rig.panel.pattern.name == "idle"
    rig.button_pin().drive_low()  # the visitor presses
    await rig.settle()
    assert rig.phase == "listening"
    assert rig.room.calls == ["open", "publish:on"] and rig.audio.gate
    assert rig.audio.cues == ["session_start"]
    assert rgb(rig) == GREEN
    await rig.post(VoiceStarted(), VoiceStopped())
    rig.button_pin().drive_high()
    await rig.settle()
    assert rig.phase == "thinking" and not rig.audio.gate and rig.room.calls[-1] == "publish:off"
    await rig.post(AgentStateChanged(AgentState.SPEAKING), PlaybackStarted())
    assert rig.phase == "speaking" and rig.panel.pattern is not None and rig.panel.pattern.name == "speaking"
    await rig.post(PlaybackFinished())
    assert rig.phase == "listening"
    await rig.advance(19.5)
    assert rig.phase == "listening"
    await rig.advance(1.0)  # idle_end_seconds = 20 since the answer finished
    assert rig.phase == "idle" and rig.room.calls[-1] == "close" and rig.audio.cues[-1] == "session_end"
    assert [s for _, s in rig.controller.timeline] == [
        "starting", "idle", "connecting", "listening", "thinking", "speaking", "listening", "idle"]


async def test_push_to_talk_press_barges_in(make_rig: MakeRig) -> None:
    rig = await make_rig(mode=InteractionMode.PUSH_TO_TALK, echo_path_verified=True, agent=True,
                         voice_follows_gate=True)
    await rig.press()
    await rig.release()
    await rig.advance(1.0)  # the scripted agent thinks 0.8 s, then speaks
    assert rig.phase == "speaking"
    await rig.post(VoiceStarted())  # push-to-talk: voice never interrupts, even on a verified route
    assert rig.phase == "speaking" and "interrupt" not in rig.room.calls
    await rig.press()
    assert rig.phase == "listening" and rig.audio.gate
    assert rig.audio.calls.count("clear_playback") == 1 and rig.room.calls.count("interrupt") == 1
    assert rgb(rig) == GREEN


@pytest.mark.parametrize("mode", [InteractionMode.TAP_TO_TALK, InteractionMode.OPEN_MIC])
@pytest.mark.parametrize("verified", [True, False], ids=["verified", "unverified"])
async def test_hands_free_barge_in_follows_the_echo_path(make_rig: MakeRig, mode: InteractionMode,
                                                        verified: bool) -> None:
    rig = await make_rig(mode=mode, echo_path_verified=verified)
    await rig.press()
    await rig.release()
    assert rig.phase == "listening" and not rig.audio.gate  # hands-free: the voice opens the gate
    await rig.post(VoiceStarted())
    assert rig.audio.gate
    await rig.post(VoiceStopped())
    assert rig.phase == "thinking" and not rig.audio.gate
    await rig.post(AgentStateChanged(AgentState.SPEAKING), PlaybackStarted())
    await rig.post(VoiceStarted())
    if verified:
        assert rig.phase == "listening" and rig.audio.gate and rig.room.calls.count("interrupt") == 1
        assert "clear_playback" in rig.audio.calls
    else:
        assert rig.phase == "speaking" and not rig.audio.gate and "interrupt" not in rig.room.calls
        await rig.press()  # the fallback: push-to-talk semantics, a press interrupts
        assert rig.phase == "listening" and rig.room.calls.count("interrupt") == 1


async def test_route_change_mid_session_switches_barge_in_policy(make_rig: MakeRig) -> None:
    rig = await make_rig(mode=InteractionMode.TAP_TO_TALK, echo_path_verified=True)
    await rig.press()
    await rig.post(RouteChanged(Route.HEADSET, echo_path_verified=False))
    assert rig.phase == "listening" and "close" not in rig.room.calls  # the session survives the switch
    await rig.post(AgentStateChanged(AgentState.SPEAKING), VoiceStarted())
    assert rig.phase == "speaking" and "interrupt" not in rig.room.calls


async def test_tap_to_talk_no_speech_timer_ends_session(make_rig: MakeRig) -> None:
    rig = await make_rig(mode=InteractionMode.TAP_TO_TALK)
    await rig.press()
    await rig.release()
    await rig.advance(7.75)
    assert rig.phase == "listening"
    await rig.advance(0.5)
    assert rig.phase == "idle" and rig.room.calls[-1] == "close"
    assert rig.panel.pattern is not None and rig.panel.pattern.name == "idle"


async def test_tap_to_talk_next_tap_ends(make_rig: MakeRig) -> None:
    rig = await make_rig(mode=InteractionMode.TAP_TO_TALK)
    await rig.press()
    await rig.release()
    await rig.press()
    assert rig.phase == "idle" and rig.room.calls == ["open", "close"]


async def test_open_mic_speech_opens_a_session(make_rig: MakeRig) -> None:
    rig = await make_rig(mode=InteractionMode.OPEN_MIC)
    await rig.post(VoiceStarted())
    assert rig.phase == "listening" and rig.audio.gate and rig.audio.cues == []
    await rig.post(VoiceStopped())
    await rig.advance(20.5)  # nobody answers or speaks: the idle end
    assert rig.phase == "idle"


async def test_max_session_cap_while_talking(make_rig: MakeRig) -> None:
    rig = await make_rig(interaction=InteractionSettings(max_session_seconds=30.0))
    await rig.press()
    await rig.post(VoiceStarted())
    await rig.advance(29.0)
    assert rig.phase == "listening" and rig.audio.gate
    await rig.advance(2.0)
    assert rig.phase == "idle" and not rig.audio.gate and rig.room.calls[-1] == "close"


async def test_cancel_button_ends_the_session(make_rig: MakeRig) -> None:
    rig = await make_rig()
    await rig.press()
    await rig.press(Button.CANCEL)
    assert rig.phase == "idle" and not rig.audio.gate and rig.room.calls[-1] == "close"
    await rig.release(Button.CANCEL)
    await rig.release()
    await rig.advance(400.0, step_seconds=50.0)  # every session timer was cancelled
    assert rig.phase == "idle" and rig.audio.cues == ["session_start", "session_end"]


async def test_cancel_while_connecting_abandons_the_open(make_rig: MakeRig) -> None:
    rig = await make_rig()
    rig.room.auto_open = False
    await rig.press()
    assert rig.phase == "connecting"
    await rig.press(Button.CANCEL)
    await rig.post(SessionOpened("late"))  # the link finished opening after all: closed again
    assert rig.phase == "idle" and rig.room.calls == ["open", "close", "close"]


async def test_refusal_offline_message_then_record_and_confirm(make_rig: MakeRig) -> None:
    rig = await make_rig()
    rig.room.refuse = RefusalReason.MAINTENANCE
    await rig.press()
    await rig.release()
    assert rig.phase == "offline" and rig.panel.pattern is not None and rig.panel.pattern.name == "maintenance"
    assert rig.audio.cues == ["maintenance", "leave_message"]
    await rig.press()
    await rig.release()
    assert rig.phase == "recording_message" and rgb(rig) == RED
    assert rig.audio.cues[-1] == "recording_tone" and "record:start" in rig.audio.calls
    await rig.post(VoiceStarted())
    await rig.advance(4.0)
    await rig.post(VoiceStopped())
    assert rig.audio.cues[-1] == "message_stored" and len(rig.store.messages) == 1
    assert rig.store.messages[0].duration_seconds == pytest.approx(4.0)
    assert rig.phase == "offline"
    await rig.post(LinkUp())
    assert rig.phase == "idle"


async def test_message_max_length_and_store_failure(make_rig: MakeRig) -> None:
    rig = await make_rig(interaction=InteractionSettings())
    await rig.post(LinkLost("cable"))
    assert rig.phase == "offline" and rig.audio.cues == []  # nobody asked: say nothing
    rig.store.fail = True
    for _ in range(2):  # the first press says why, the second records
        await rig.press()
        await rig.release()
    await rig.post(VoiceStarted())
    await rig.advance(61.0)  # spool max_message_seconds default: 60
    assert "record:stop" in rig.audio.calls and rig.audio.cues[-1] == "message_failed"
    assert rig.controller.state.last_error == "recording_failed" and rig.store.messages == []


async def test_message_offer_expires(make_rig: MakeRig) -> None:
    rig = await make_rig()
    await rig.post(LinkLost("x"))
    await rig.press()
    await rig.release()
    await rig.advance(21.0)  # the offer stays open idle_end_seconds
    await rig.press()
    assert rig.phase == "offline" and rig.audio.cues == ["offline", "leave_message"] * 2


async def test_the_offer_is_cut_short_when_the_service_is_proven_back(make_rig: MakeRig) -> None:
    rig = await make_rig()
    rig.audio.cue_seconds = 0.3  # cues take real time here, so one is still playing when the service returns
    await rig.post(LinkLost("x"))
    rig.controller.post(ButtonPressed(Button.TALK))
    await asyncio.sleep(0.1)
    assert rig.audio.cues == ["offline"]  # "leave a message" is queued behind it
    rig.controller.post(LinkUp(proven=True))
    await rig.settle()
    assert rig.audio.cues == ["offline", "status_online"] and "clear_playback" in rig.audio.calls
    assert rig.phase == "idle"


async def test_cue_that_cannot_play_does_not_hang_the_flow(make_rig: MakeRig) -> None:
    rig = await make_rig()
    rig.audio.failing_cues = {"leave_message", "recording_tone"}
    await rig.post(LinkLost("x"))
    for _ in range(2):
        await rig.press()
        await rig.release()
    assert rig.phase == "recording_message" and rig.audio.recording


async def test_device_lost_and_found(make_rig: MakeRig) -> None:
    rig = await make_rig()
    await rig.press()
    await rig.post(DeviceLost("array"))
    assert rig.phase == "error" and rig.room.calls[-1] == "close" and not rig.audio.gate
    await rig.advance(30.0)
    assert rig.phase == "error"  # no audio route: the error stays
    await rig.post(DeviceFound("array"))
    assert rig.phase == "idle" and rig.panel.pattern is not None and rig.panel.pattern.name == "idle"


async def test_error_clears_after_its_hold(make_rig: MakeRig) -> None:
    rig = await make_rig(interaction=InteractionSettings(error_hold_seconds=3.0))
    await rig.post(ErrorOccurred("x", "y"))
    assert rig.phase == "error"
    await rig.advance(2.75)
    assert rig.phase == "error"
    await rig.advance(0.5)
    assert rig.phase == "idle"


async def test_status_hold_on_gpiozeros_hold_timer(make_rig: MakeRig) -> None:
    """A silent hold: gpiozero's hold (real time) starts it; once the session is live the hold time counts on the
    kiosk's clock from the microphone going live."""
    rig = await make_rig(interaction=InteractionSettings(status_hold_seconds=0.2))
    rig.button_pin().drive_low()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0
    while not any(isinstance(e, SpeakStatus) for _, e in rig.controller.executed):
        assert loop.time() < deadline, "no status after a long hold"
        await asyncio.sleep(0.02)  # gpiozero's hold thread runs in real time
        await rig.advance(0.02)
    rig.button_pin().drive_high()
    await rig.settle()
    assert rig.phase == "idle" and "close" in rig.room.calls
    assert rig.audio.cues[-4:] == ["status_preamble", "status_online", "status_route_array", "status_no_error"]


async def test_stale_timer_never_reaches_the_machine(make_rig: MakeRig) -> None:
    rig = await make_rig(mode=InteractionMode.TAP_TO_TALK)
    await rig.press()
    await rig.release()
    rig.clock.advance(8.0)  # no_speech fires: its event is queued, not handled yet
    rig.controller.handle(VoiceStarted())  # handled first: cancels the timer that already fired
    await rig.settle()
    assert rig.phase == "listening" and rig.audio.gate  # the queued expiry was recognised as stale


async def test_heartbeat_keeps_alive_seconds_on_virtual_time(make_rig: MakeRig) -> None:
    rig = await make_rig()
    before = rig.controller.alive_seconds
    await rig.advance(10.0, step_seconds=1.0)
    assert rig.controller.alive_seconds >= before + 9.0
    assert rig.controller.bus.dropped == 0


async def test_effects_in_order_and_report(make_rig: MakeRig) -> None:
    rig = await make_rig()
    await rig.press()
    await rig.release()
    effects = [e for _, e in rig.controller.executed]
    assert effects.index(OpenSession()) < effects.index(StartPublishing())
    assert InterruptAgent() not in effects and CloseSession() not in effects
    report = rig.controller.report()
    assert report["state"] == "listening" and report["timeline"][0]["state"] == "starting"


async def test_bus_puts_control_ahead_of_audio_and_drops_oldest() -> None:
    bus = EventBus(capacity=3)
    bus.post(VoiceStarted())
    bus.post(ButtonPressed())
    bus.post(PlaybackFinished())
    assert await bus.get() == ButtonPressed()
    assert await bus.get() == VoiceStarted()
    for i in range(5):
        bus.post(LinkLost(str(i)))
    assert bus.dropped == 2
    assert [bus.get_nowait() for _ in range(4)] == [LinkLost("2"), LinkLost("3"), LinkLost("4"), PlaybackFinished()]
    assert bus.get_nowait() is None


async def test_threadsafe_post_from_another_thread() -> None:
    import threading

    bus = EventBus()
    bus.bind(asyncio.get_running_loop())
    thread = threading.Thread(target=bus.post_threadsafe, args=(ButtonPressed(),))
    thread.start()
    thread.join()
    assert await asyncio.wait_for(bus.get(), 1.0) == ButtonPressed()


async def test_controller_consumes_the_bus_it_is_given_even_when_empty() -> None:
    # An empty EventBus is falsy (it has __len__); the composition root hands the controller an empty bus
    # that the audio engine and the panel already post into.
    from kiosk.clock import LoopClock
    from kiosk.controller import Controller
    from kiosk.events import Started
    from kiosk.state import Phase, Policy
    from kiosk_dev.behaviour import SimulatedAudio, SimulatedRoom

    bus = EventBus()
    clock = LoopClock()
    controller = Controller(policy=Policy(), audio=SimulatedAudio(bus.post, clock),
                            link=SimulatedRoom(bus.post, clock), clock=clock, bus=bus)
    assert controller.bus is bus
    controller.start()
    bus.post(Started())
    await controller.settle()
    assert controller.phase is Phase.IDLE
    await controller.aclose()


async def test_the_consent_notice_plays_before_the_gate_opens(make_rig: MakeRig) -> None:
    """Through the real controller and mock pins: the notice plays and the LED shows it while the visitor
    holds the button; the gate opens (and the room unmutes) only after the notice has played."""
    rig = await make_rig(mode=InteractionMode.PUSH_TO_TALK, consent_notice=True)
    rig.audio.cue_seconds = 0.3  # the notice takes (real) time to play
    rig.button_pin().drive_low()
    for _ in range(100):
        await asyncio.sleep(0.01)
        if "cue:consent_notice" in rig.audio.calls:
            break
    assert rig.panel.pattern is not None and rig.panel.pattern.name == "consent"
    assert not rig.audio.gate and "publish:on" not in rig.room.calls
    await rig.settle()
    calls = rig.audio.calls
    assert calls.index("cue:consent_notice") < calls.index("gate:on:no-preroll")  # the notice-time audio is not sent
    assert calls.index("cue:consent_notice") < calls.index("cue:session_start")
    assert rig.audio.gate and rig.room.calls[-1] == "publish:on" and rgb(rig) == GREEN


# ------------------------------------------------------------------------------------ manual turns and tools
async def test_push_to_talk_gives_the_agent_its_turns(make_rig: MakeRig) -> None:
    """The scripted agent answers only at end_turn; a press without speech is a cancel_turn and no answer."""
    rig = await make_rig(mode=InteractionMode.PUSH_TO_TALK, agent=True)
    await rig.press()
    await rig.release()  # nothing said
    assert rig.room.calls == ["open", "publish:on", "publish:off"] and rig.room.turns == ["start_turn", "cancel_turn"]
    await rig.advance(2.0)
    assert rig.phase == "listening"  # no answer came
    await rig.press()
    await rig.post(VoiceStarted(), VoiceStopped())
    await rig.advance(3.0)  # a long pause with the button held: the turn stays open, nobody answers
    assert rig.phase == "listening" and rig.room.turns[-1] == "start_turn"
    await rig.release()
    assert rig.room.turns[-1] == "end_turn" and rig.phase == "thinking"
    await rig.advance(1.0)
    assert rig.phase == "speaking"


async def test_voice_processed_after_the_release_makes_the_turn_one_to_answer(make_rig: MakeRig) -> None:
    """A busy machine processes the last frames before a release after it: when they held the visitor's voice
    (the engine says so once the gate has drained), the turn is answered, not cancelled."""
    rig = await make_rig(mode=InteractionMode.PUSH_TO_TALK, agent=True)
    await rig.press()
    rig.audio.voice_after_release = True
    await rig.release()  # the state machine has heard no voice yet
    assert rig.room.turns == ["start_turn", "end_turn"]
    await rig.advance(2.0)
    assert rig.phase in ("thinking", "speaking")


async def test_turns_agent_setting_sends_no_turns(make_rig: MakeRig) -> None:
    from kiosk.settings import TurnDetection
    from kiosk.state import Policy

    policy = Policy(turns=TurnDetection.AGENT)
    rig = await make_rig(policy=policy, agent=True)
    await rig.press()
    await rig.post(VoiceStarted(), VoiceStopped())
    await rig.release()
    await rig.advance(1.0)
    assert rig.phase == "speaking" and rig.room.turns == []


async def test_a_running_tool_holds_the_session_and_shows_on_the_leds(make_rig: MakeRig) -> None:
    from kiosk.events import Tool, ToolFinished, ToolStarted

    rig = await make_rig()
    await rig.press()
    await rig.post(VoiceStarted(), VoiceStopped())
    await rig.release()
    assert rig.phase == "thinking"
    await rig.post(ToolStarted(Tool.CALL_STAFF))
    assert rig.panel.pattern is not None and rig.panel.pattern.name == "tool"
    await rig.advance(30.0, step_seconds=1.0)  # past idle_end: the silence is the tool working
    assert rig.phase == "thinking" and "close" not in rig.room.calls
    await rig.post(ToolFinished(Tool.CALL_STAFF))
    assert rig.panel.pattern is not None and rig.panel.pattern.name == "thinking"
    await rig.advance(19.5, step_seconds=0.5)
    assert rig.phase == "thinking"
    await rig.advance(1.0)  # the agent then said nothing: idle_end, counted from the tool's end
    assert rig.phase == "idle" and rig.room.calls[-1] == "close"


async def test_take_message_records_after_the_answer_with_the_note(make_rig: MakeRig) -> None:
    from kiosk.events import MessageRequested
    from kiosk.personal import PersonalText

    rig = await make_rig(agent=True)
    await rig.press()
    await rig.post(VoiceStarted(), VoiceStopped())
    await rig.release()
    await rig.advance(1.0)  # the scripted agent speaks for 3 s
    assert rig.phase == "speaking"
    await rig.post(MessageRequested(PersonalText("Call back about the order")))
    assert rig.phase == "speaking"  # the agent finishes first
    await rig.advance(3.0)
    assert rig.phase == "recording_message" and rig.room.calls[-1] == "close"
    assert rig.audio.cues[-1] == "recording_tone" and rgb(rig) == RED
    await rig.post(VoiceStarted())
    await rig.advance(2.0)
    await rig.post(VoiceStopped())
    assert rig.audio.cues[-1] == "message_stored" and rig.phase == "idle"
    note = rig.store.notes[0]
    assert note is not None and note.text == "Call back about the order"
    assert rig.store.messages[0].duration_seconds == pytest.approx(2.0)


async def test_end_conversation_after_the_goodbye(make_rig: MakeRig) -> None:
    from kiosk.events import EndRequested

    rig = await make_rig(agent=True)
    await rig.press()
    await rig.post(VoiceStarted(), VoiceStopped())
    await rig.release()
    await rig.advance(1.0)
    await rig.post(EndRequested())
    await rig.advance(2.75)
    assert rig.phase == "speaking"
    await rig.advance(0.5)
    assert rig.phase == "idle" and rig.room.calls[-1] == "close" and rig.audio.cues[-1] == "session_end"


async def test_staff_called_shows_violet_for_a_while(make_rig: MakeRig) -> None:
    from kiosk.events import StaffCalled

    rig = await make_rig()
    await rig.post(StaffCalled())
    assert rig.panel.pattern is not None and rig.panel.pattern.name == "staff_called"
    await rig.advance(29.0, step_seconds=1.0)
    assert rig.panel.pattern.name == "staff_called"
    await rig.advance(1.5)
    assert rig.panel.pattern.name == "idle"
