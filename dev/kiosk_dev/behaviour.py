"""A behaviour rig: the controller on virtual time with the real GPIO panel on gpiozero's MockFactory.

The audio engine, room link and message store here are in-memory stand-ins (the audio and network
edges); they record what the controller asked of them and post the events a real adapter would. A
scripted agent answers when the visitor stops publishing, so ``kiosk panel`` can be tried alone.
Used by the pytest plugin ``fixtures.panel`` and by ``kiosk panel``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from kiosk.clock import VirtualClock
from kiosk.controller import Controller
from kiosk.errors import KioskError
from kiosk.events import (
    AgentState,
    AgentStateChanged,
    ApiRefused,
    Button,
    Event,
    PlaybackFinished,
    PlaybackStarted,
    RefusalReason,
    Route,
    SessionClosed,
    SessionOpened,
    Started,
    VoiceStarted,
    VoiceStopped,
)
from kiosk.panel.gpio import GpioPanel
from kiosk.personal import PersonalText
from kiosk.ports import Cancellable, Clock, EventSink, Pcm, Recording
from kiosk.settings import ButtonSpec, InteractionMode, InteractionSettings, PanelSettings
from kiosk.state import Policy

RATE_HZ = 16000


class SimulatedAudio:
    """An ``AudioControl`` stand-in: records gate, cue and recording calls; posts voice events on request."""

    def __init__(self, sink: EventSink, clock: Clock, *, voice_follows_gate: bool = False,
                 cue_seconds: float = 0.0) -> None:
        self._sink = sink
        self._clock = clock
        self.voice_follows_gate = voice_follows_gate
        self.cue_seconds = cue_seconds
        self.gate = False
        self.voice_after_release = False  # what wait_gate_closed says: voice in frames processed after the close
        self.cues: list[str] = []
        self.calls: list[str] = []
        self.recording = False
        self._recording_since = 0.0
        self.failing_cues: set[str] = set()

    def set_gate(self, streaming: bool, *, preroll: bool = True) -> None:
        """Open or close the gate; with ``voice_follows_gate`` the visitor speaks while it is open."""
        self.calls.append(f"gate:{'on' if streaming else 'off'}" + ("" if preroll else ":no-preroll"))
        if self.voice_follows_gate and streaming != self.gate:
            self._sink(VoiceStarted(self._clock.now()) if streaming else VoiceStopped(self._clock.now()))
        self.gate = streaming

    async def wait_gate_closed(self) -> bool:
        """Nothing is captured here: a closed gate is closed at once; ``voice_after_release`` is the answer."""
        return self.voice_after_release

    def clear_playback(self) -> None:
        """Drop queued agent audio."""
        self.calls.append("clear_playback")

    async def play_cue(self, name: str) -> None:
        """Record the cue (and take ``cue_seconds`` of real time, for the interactive panel)."""
        self.cues.append(name)
        self.calls.append(f"cue:{name}")
        if name in self.failing_cues:
            raise KioskError("cue_missing", f"cue {name} cannot play")
        if self.cue_seconds > 0:
            await asyncio.sleep(self.cue_seconds)

    def start_recording(self) -> None:
        """Start a message."""
        self.calls.append("record:start")
        self.recording = True
        self._recording_since = self._clock.now()

    def stop_recording(self) -> Recording:
        """Stop and hand over silence as long as the recording lasted."""
        self.calls.append("record:stop")
        self.recording = False
        duration_seconds = max(0.0, self._clock.now() - self._recording_since)
        return Recording(np.zeros(int(duration_seconds * RATE_HZ), dtype=np.int16), duration_seconds)

    def speak(self, on: bool) -> None:
        """The simulated visitor starts or stops speaking (as the VAD would report it)."""
        self._sink(VoiceStarted(self._clock.now()) if on else VoiceStopped(self._clock.now()))


class SimulatedRoom:
    """A ``RoomLink`` stand-in: sessions open (or are refused) at once; an optional scripted agent answers.

    The scripted agent answers when the visitor's turn ends: at ``end_turn`` with manual turns, else when the
    microphone is muted after speech (as an agent detecting turns itself would).
    """

    def __init__(self, sink: EventSink, clock: Clock, *, auto_open: bool = True, agent: bool = False,
                 think_seconds: float = 0.8, speak_seconds: float = 3.0, manual_turns: bool = False) -> None:
        self._sink = sink
        self._clock = clock
        self.auto_open = auto_open
        self.agent = agent
        self.manual_turns = manual_turns
        self.think_seconds = think_seconds
        self.speak_seconds = speak_seconds
        self.refuse: RefusalReason | None = None
        self.calls: list[str] = []
        self.turns: list[str] = []  # turn RPCs (start_turn, end_turn, cancel_turn), in order
        self.publishing = False
        self.connected = False
        self._ids = itertools.count(1)
        self._agent_timers: list[Cancellable] = []

    async def open(self) -> None:
        """Open a session: SessionOpened, or ApiRefused when told to refuse."""
        self.calls.append("open")
        if self.refuse is not None:
            self._sink(ApiRefused(self.refuse, "simulated refusal"))
        elif self.auto_open:
            self.connected = True
            self._sink(SessionOpened(f"sim-{next(self._ids)}"))

    async def close(self) -> None:
        """Leave the room."""
        self.calls.append("close")
        self._stop_agent()
        self.connected = False
        self._sink(SessionClosed("closed by the kiosk"))

    async def interrupt_agent(self) -> None:
        """Stop the scripted agent."""
        self.calls.append("interrupt")
        self._stop_agent()
        self._sink(AgentStateChanged(AgentState.LISTENING))

    def set_publishing(self, on: bool) -> None:
        """Mute or unmute; with the scripted agent, un-publishing after speech starts an answer."""
        self.calls.append(f"publish:{'on' if on else 'off'}")
        was = self.publishing
        self.publishing = on
        if self.agent and was and not on and self.connected and not self.manual_turns:
            self._answer()

    async def begin_turn(self) -> None:
        """Manual turns: the visitor's turn starts."""
        self.turns.append("start_turn")

    async def end_turn(self, commit: bool) -> None:
        """Manual turns: the turn ends; committed, the scripted agent answers."""
        self.turns.append("end_turn" if commit else "cancel_turn")
        if self.agent and commit and self.connected:
            self._answer()

    def _answer(self) -> None:
        self._stop_agent()
        post = self._sink
        t = self._clock
        script: list[tuple[float, list[Event]]] = [
            (0.0, [AgentStateChanged(AgentState.THINKING)]),
            (self.think_seconds, [AgentStateChanged(AgentState.SPEAKING), PlaybackStarted()]),
            (self.think_seconds + self.speak_seconds, [PlaybackFinished(), AgentStateChanged(AgentState.LISTENING)]),
        ]
        for delay, events in script:
            self._agent_timers.append(t.call_later(delay, _poster(post, events)))

    def _stop_agent(self) -> None:
        for timer in self._agent_timers:
            timer.cancel()
        self._agent_timers.clear()


def _poster(sink: EventSink, events: list[Event]) -> Callable[[], None]:
    def post() -> None:
        for event in events:
            sink(event)
    return post


class MemoryMessageStore:
    """A ``MessageStore`` stand-in keeping recordings in memory; ``fail`` makes it refuse."""

    def __init__(self) -> None:
        self.messages: list[Recording] = []
        self.notes: list[PersonalText | None] = []  # the agent's note of each message (None: none)
        self.fail = False

    async def store_recording(self, recording: Recording, note: PersonalText | None = None) -> str:
        """Keep ``recording`` (and its note); return its id."""
        if self.fail:
            raise KioskError("spool_full", "simulated storage failure")
        self.messages.append(recording)
        self.notes.append(note)
        return f"msg-{len(self.messages)}"


@dataclass
class Rig:
    """A controller on virtual time wired to the real GpioPanel on a MockFactory and in-memory edges."""

    controller: Controller
    clock: VirtualClock
    audio: SimulatedAudio
    room: SimulatedRoom
    store: MemoryMessageStore
    panel: GpioPanel
    factory: Any
    settings: PanelSettings

    def pin(self, bcm: int) -> Any:
        """The mock pin for BCM ``bcm``."""
        return self.factory.pin(bcm)

    def button_pin(self, button: Button = Button.TALK) -> Any:
        """The mock pin of ``button``."""
        spec = self.settings.talk_button if button is Button.TALK else self.settings.cancel_button
        assert spec is not None, "no cancel button configured"
        return self.pin(spec.pin)

    async def press(self, button: Button = Button.TALK) -> None:
        """Drive the button's pin to its pressed level and let the controller settle."""
        spec = self.settings.talk_button if button is Button.TALK else self.settings.cancel_button
        assert spec is not None
        pin = self.pin(spec.pin)
        pin.drive_low() if spec.pull_up else pin.drive_high()
        await self.settle()

    async def release(self, button: Button = Button.TALK) -> None:
        """Drive the button's pin to its released level and let the controller settle."""
        spec = self.settings.talk_button if button is Button.TALK else self.settings.cancel_button
        assert spec is not None
        pin = self.pin(spec.pin)
        pin.drive_high() if spec.pull_up else pin.drive_low()
        await self.settle()

    async def post(self, *events: Event) -> None:
        """Post events (as an adapter would) and settle."""
        for event in events:
            self.controller.post(event)
            await self.settle()

    async def advance(self, seconds: float, step_seconds: float = 0.25) -> None:
        """Move virtual time on in small steps, letting the controller handle what fires in each."""
        remaining = seconds
        while remaining > 1e-9:
            delta = min(step_seconds, remaining)
            self.clock.advance(delta)
            remaining -= delta
            await self.settle()

    async def settle(self) -> None:
        """Let gpiozero's hand-overs reach the loop and the controller finish."""
        for _ in range(3):
            await asyncio.sleep(0)
        await self.controller.settle()

    @property
    def phase(self) -> str:
        """The controller's phase name."""
        return self.controller.phase.value

    def effect_names(self) -> list[str]:
        """Names of the effects carried out so far."""
        return [type(e).__name__ for _, e in self.controller.executed]

    async def aclose(self) -> None:
        """Stop the controller and release the pins."""
        await self.controller.aclose()
        # Let go of the buttons first: gpiozero's hold thread of a held button waits out the whole hold
        # time before it notices the close.
        for spec in (self.settings.talk_button, self.settings.cancel_button):
            if spec is not None:
                pin = self.pin(spec.pin)
                pin.drive_high() if spec.pull_up else pin.drive_low()
        self.panel.close()


async def build_rig(
    *,
    mode: InteractionMode = InteractionMode.PUSH_TO_TALK,
    echo_path_verified: bool = False,
    interaction: InteractionSettings | None = None,
    panel: PanelSettings | None = None,
    factory: Any = None,
    agent: bool = False,
    voice_follows_gate: bool = False,
    started: bool = True,
    consent_notice: bool = False,
    policy: Policy | None = None,
) -> Rig:
    """Build and start a rig on the running loop (call ``aclose`` when done).

    ``policy`` replaces the one made from ``interaction`` and ``consent_notice`` (turns, tools' timers).
    """
    from gpiozero.pins.mock import MockFactory, MockPWMPin

    interaction = interaction or InteractionSettings(mode=mode, open_mic_acknowledged=True)
    if interaction.mode is not mode and mode is not InteractionMode.PUSH_TO_TALK:
        interaction = interaction.model_copy(update={"mode": mode})
    panel = panel or PanelSettings(cancel_button=ButtonSpec(pin=27))
    factory = factory or MockFactory(pin_class=MockPWMPin)
    clock = VirtualClock()
    loop = asyncio.get_running_loop()
    holder: list[Controller] = []

    def sink(event: Event) -> None:
        holder[0].post(event)

    policy = policy or Policy.from_settings(interaction, consent_notice=consent_notice)
    audio = SimulatedAudio(sink, clock, voice_follows_gate=voice_follows_gate)
    room = SimulatedRoom(sink, clock, agent=agent, manual_turns=policy.manual_turns)
    store = MemoryMessageStore()
    gpio = GpioPanel(panel, interaction, sink, loop=loop, pin_factory=factory)
    controller = Controller(policy=policy, audio=audio, link=room, clock=clock,
                            panel=gpio, store=store, route=Route.ARRAY, echo_path_verified=echo_path_verified)
    holder.append(controller)
    controller.start()
    rig = Rig(controller, clock, audio, room, store, gpio, factory, panel)
    if started:
        await rig.post(Started())
    return rig


class EventRecorder:
    """An ``EventSink`` and ``FrameSink`` that remember what they got (tests of the audio engine and route)."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.frames: list[Pcm] = []
        self._changed = asyncio.Event()

    def __call__(self, event: Event) -> None:
        """Keep the event (this object is the EventSink)."""
        self.events.append(event)
        self._changed.set()

    def push_frame(self, pcm: Pcm, captured_at: float | None = None) -> None:
        """Keep the frame."""
        self.frames.append(pcm)

    def of(self, kind: type[Event]) -> list[Event]:
        """The events of one kind, in order."""
        return [e for e in self.events if isinstance(e, kind)]

    async def wait_for(self, kind: type[Event], timeout_seconds: float, count: int = 1) -> Event:
        """The ``count``-th event of ``kind``, waiting up to ``timeout_seconds`` for it."""
        async def wait() -> Event:
            while len(self.of(kind)) < count:
                self._changed.clear()
                await self._changed.wait()
            return self.of(kind)[count - 1]
        return await asyncio.wait_for(wait(), timeout_seconds)
