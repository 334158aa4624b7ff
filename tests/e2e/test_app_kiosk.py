"""End to end through ``kiosk.app.Kiosk``: the real LiveKit stack, private PulseAudio devices, the virtual room
and the virtual panel, all wired by the composition root the service runs.

Each test drives the kiosk only from outside (button pins, speech into the virtual room or the headset
microphone, the network namespace's link, the stand-in API's failure switch) and checks what the visitor and
the operator would see: states, cues, what came out of the speaker (the engine's far-end reference is the
exact audio rendered), the stand-in agent's report, the spool and the message endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kiosk.app import Kiosk
from kiosk.audio.engine import PLAYBACK_END_HANGOVER_SECONDS
from kiosk.effects import ClearPlayback, Cue, InterruptAgent, OfflineReason, PlayCue, ShowPattern, StartPublishing
from kiosk.events import (
    AgentState,
    AgentStateChanged,
    ApiRefused,
    CueFinished,
    Event,
    LinkLost,
    LinkUp,
    PlaybackFinished,
    PlaybackStarted,
    RecordingStored,
    RefusalReason,
    Route,
    RouteChanged,
    SessionClosed,
    SessionOpened,
    VoiceStarted,
)
from kiosk.fallback.offline import PROBE_COVERS
from kiosk.link.backoff import Backoff
from kiosk.settings import Settings
from kiosk.state import KioskState, MessageStep, Phase, Transition
from kiosk_dev.agent import DEFAULT_ANSWER
from kiosk_dev.demo import demo_settings, operator_key
from kiosk_dev.pulse import HEADSET_DEVICE, HEADSET_MIC_SINK, PulseServer
from kiosk_dev.speech import espeak, normalise
from kiosk_dev.stack import LocalStack
from kiosk_dev.terminal import VirtualPanel
from kiosk_dev.virtual_room import VirtualRoom

pytestmark = [pytest.mark.livekit, pytest.mark.pulse, pytest.mark.slow, pytest.mark.timeout(180)]

QUESTION = "Hello, where can I find the registration desk?"
SECOND_QUESTION = "What time does the keynote begin?"
MESSAGE = "Please ask the sales team to call me back about the order."
# A rendered frame whose peak is above this is sound (agent speech or a cue); decoded silence stays at +-16.
RENDERED_PEAK = 64
# How late after the barge-in press the playout may run dry: the press reaches the loop late on a loaded machine
# (0.31 s once), and the engine waits out PLAYBACK_END_HANGOVER_SECONDS before it calls the buffer dry.
STOP_MARGIN_SECONDS = 0.5
ENDPOINT_PORT = 8097


def speech(text: str) -> np.ndarray:
    """The visitor's words at a talking level (16 kHz float)."""
    return normalise(espeak(text, "en-us"), -26.0)


@dataclass
class Entry:
    """One stepped event with the state it led to."""

    at: float
    event: Event
    old: KioskState
    new: KioskState


@dataclass
class App:
    """A running kiosk and the handles a test drives it with."""

    kiosk: Kiosk
    panel: VirtualPanel
    room: VirtualRoom
    pulse: PulseServer
    stack: LocalStack
    entries: list[Entry] = field(default_factory=list)
    rendered: list[tuple[float, int]] = field(default_factory=list)  # (loop time, peak) per reference frame
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    # ------------------------------------------------------------------ observing
    def listener(self, old: KioskState, event: Event, transition: Transition) -> None:
        """Controller listener: keep every step."""
        self.entries.append(Entry(asyncio.get_running_loop().time(), event, old, transition.state))
        self.changed.set()

    def frame(self, out: Any, mic: Any, ref: Any, now: float) -> None:
        """Engine frame listener: the far-end reference is exactly what the speaker rendered."""
        self.rendered.append((now, int(np.abs(ref).max(initial=0))))

    @property
    def now(self) -> float:
        """Loop time."""
        return asyncio.get_running_loop().time()

    @property
    def state(self) -> KioskState:
        """The controller's state."""
        assert self.kiosk.controller is not None
        return self.kiosk.controller.state

    def events(self, kind: type[Event], since: float = 0.0) -> list[Event]:
        """Stepped events of one kind after loop time ``since``."""
        return [e.event for e in self.entries if e.at >= since and isinstance(e.event, kind)]

    def cues(self, since: float) -> list[str]:
        """Cues the controller asked for after ``since``, in order."""
        assert self.kiosk.controller is not None
        return [effect.name.value for at, effect in self.kiosk.controller.executed
                if at >= since and isinstance(effect, PlayCue)]

    def effects(self, kind: type[Any], since: float) -> list[Any]:
        """Effects of one kind carried out after ``since``."""
        assert self.kiosk.controller is not None
        return [effect for at, effect in self.kiosk.controller.executed if at >= since and isinstance(effect, kind)]

    def voiced_seconds(self, start: float, end: float = float("inf")) -> float:
        """Seconds of sound rendered by the speaker between two loop times."""
        return sum(1 for at, peak in self.rendered if start <= at < end and peak > RENDERED_PEAK) * 0.01

    async def wait(self, predicate: Callable[[Entry], bool], timeout_seconds: float, since: float = 0.0) -> Entry:
        """The first stepped entry after ``since`` that matches; fails naming what was seen."""
        deadline = self.now + timeout_seconds
        while True:
            for entry in self.entries:
                if entry.at >= since and predicate(entry):
                    return entry
            remaining = deadline - self.now
            if remaining <= 0:
                seen = ", ".join(f"{type(e.event).__name__}->{e.new.phase.value}" for e in self.entries
                                 if e.at >= since)
                raise AssertionError(f"not seen within {timeout_seconds} s; seen: {seen}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))

    async def wait_event(self, kind: type[Event], timeout_seconds: float, since: float = 0.0,
                         match: Callable[[Any], bool] = lambda _: True) -> Entry:
        """The first event of ``kind`` (and ``match``) after ``since``."""
        return await self.wait(lambda e: isinstance(e.event, kind) and match(e.event), timeout_seconds, since)

    async def wait_phase(self, phase: Phase, timeout_seconds: float, since: float = 0.0) -> Entry:
        """The first step into ``phase`` after ``since`` (or now, if already there)."""
        if self.state.phase is phase and not any(e.at >= since for e in self.entries):
            return self.entries[-1]
        return await self.wait(lambda e: e.new.phase is phase, timeout_seconds, since)

    async def until(self, condition: Callable[[], bool], timeout_seconds: float) -> bool:
        """Wait until ``condition()`` holds (False when the time is up)."""
        deadline = self.now + timeout_seconds
        while not condition() and self.now < deadline:  # noqa: ASYNC110 - polls figures that have no event
            await asyncio.sleep(0.05)
        return condition()

    async def wait_cue_finished(self, cue: Cue, timeout_seconds: float, since: float) -> Entry:
        """The cue played to its end after ``since``."""
        return await self.wait_event(CueFinished, timeout_seconds, since, lambda e: e.cue == cue.value)

    # ------------------------------------------------------------------ driving
    async def tap(self, hold_seconds: float = 0.2) -> float:
        """Press and release the talk button; returns the loop time of the press."""
        pressed = self.now
        self.panel.press()
        await asyncio.sleep(hold_seconds)
        self.panel.release()
        return pressed

    async def ask(self, text: str) -> float:
        """Push-to-talk: hold the button, say ``text`` into the room, release; returns the release time."""
        self.panel.press()
        await asyncio.sleep(0.4)
        words = speech(text)
        self.room.say(words, name=text)
        await asyncio.sleep(len(words) / 16000 + 0.5)
        self.panel.release()
        return self.now


OpenApp = Callable[..., Awaitable[App]]


@pytest.fixture
async def open_app(stack: LocalStack, pulse_devices: PulseServer, tmp_path: Path) -> AsyncIterator[OpenApp]:
    """A factory: ``await open_app(**settings_sections)`` starts a kiosk on the demo's settings, idle."""
    opened: list[App] = []
    rooms: list[VirtualRoom] = []
    pulse_devices.unplug("headset")  # the visitor talks into the room; a test plugs the headset in

    async def start(**sections: dict[str, Any]) -> App:
        api = stack.session_settings(request_timeout_seconds=2.0, retry_attempts=2, retry_base_seconds=0.05)
        cfg = demo_settings(Settings(), api=api, spool_dir=tmp_path / "spool", real_devices=False)
        # The whole stack (server, agents, PulseAudio, the room, the kiosk) shares 2 cores here: a capture stall
        # of over a second was seen once mid-answer (DeviceLost ended the session), so these tests, which are
        # not about device loss, allow a longer one.
        audio = {"route_poll_seconds": 0.2, "device_timeout_ms": 2500}
        updates: dict[str, Any] = {"audio": cfg.audio.model_copy(update=audio)}
        for name, values in sections.items():
            updates[name] = getattr(cfg, name).model_copy(update=values)
        cfg = cfg.model_copy(update=updates)
        room = VirtualRoom(pulse_devices, seed=1, delay_ms=20.0, drift_ppm=50.0, noise_kind="pink",
                           noise_dbfs=-55.0)
        room.start()
        rooms.append(room)
        # The probe's backoff is short so a restored link is seen within the tests' bounds.
        kiosk = Kiosk(cfg, probe_backoff=Backoff(base_seconds=0.2, max_seconds=1.0))
        loop = asyncio.get_running_loop()
        panel = VirtualPanel(cfg.panel, cfg.interaction, kiosk.bus.post, loop=loop)
        kiosk.panel = panel
        kiosk.staff = panel  # call_staff pulses the virtual panel's mock pin
        app = App(kiosk, panel, room, pulse_devices, stack)
        kiosk.listeners.append(app.listener)
        kiosk.engine.listeners.append(app.frame)
        opened.append(app)
        await kiosk.start()
        await app.wait_phase(Phase.IDLE, 15)
        return app

    yield start
    for app in opened:
        await app.kiosk.aclose()
    for room in rooms:
        room.stop()


# ---------------------------------------------------------------------------------------------- barge-in
# On a loaded 2-core machine the interrupt's round trip, the session's open or the agent's answer can each take
# seconds (seen: sound 0.96 s after the press, no answer within 30 s): one rerun, as for the sound-server tests.
@pytest.mark.flaky(reruns=1)
async def test_barge_in_by_press_stops_playback_and_the_agent(open_app: OpenApp) -> None:
    app = await open_app()
    start = app.now
    released = await app.ask(QUESTION)
    opened = (await app.wait_event(SessionOpened, 15, start)).event
    assert isinstance(opened, SessionOpened)
    speaking = await app.wait_phase(Phase.SPEAKING, 30, released)
    # Let about a second of the answer come out of the speaker first.
    assert await app.until(lambda: app.voiced_seconds(speaking.at) >= 1.0, 10), "the agent's answer did not play"

    pressed = app.now
    app.panel.press()  # barge-in: the visitor presses while the agent speaks
    await app.wait_event(AgentStateChanged, 10, pressed, lambda e: e.state is AgentState.LISTENING)
    await asyncio.sleep(1.5)
    app.panel.release()
    # The window to check ends where the agent may answer again: the gate was open (with the pre-roll) and
    # the stand-in agent answers whatever it hears.
    again = [e.at for e in app.entries if e.at >= pressed and isinstance(e.event, AgentStateChanged)
             and e.event.state is AgentState.SPEAKING]
    after = min([app.now, *again])

    # The kiosk: playback cleared and the agent interrupted at once, back to listening with the gate open.
    assert app.effects(ClearPlayback, pressed) and app.effects(InterruptAgent, pressed)
    into_listening = [e for e in app.entries if e.at >= pressed and e.new.phase is Phase.LISTENING]
    assert into_listening and into_listening[0].old.phase is Phase.SPEAKING
    assert into_listening[0].new.publishing
    # The playout: cleared at the press (it ran dry), and nothing of the answer written to it after the press (the
    # answer being cut short is dropped until the agent stopped and went quiet, kiosk.link.livekit).
    dry_at = [round(e.at - pressed, 3) for e in app.entries
              if e.at >= pressed and isinstance(e.event, PlaybackFinished)]
    assert dry_at and dry_at[0] < STOP_MARGIN_SECONDS + PLAYBACK_END_HANGOVER_SECONDS, dry_at
    again_playing = [round(e.at - pressed, 3) for e in app.entries
                     if pressed <= e.at < after and isinstance(e.event, PlaybackStarted)]
    assert not again_playing, again_playing
    # The speaker: printed, not asserted. The far-end reference frames carry the loop time the reader took them
    # from the capture ring, not their render time: on a busy machine frames rendered before the press carried
    # times up to 1.3 s after it, with nothing written to the playout after the press.
    voiced_after = [at for at, peak in app.rendered if at >= pressed and peak > RENDERED_PEAK]
    stopped_after_ms = round(1000 * (max(voiced_after) - pressed)) if voiced_after else 0
    # The agent: interrupted by the kiosk's RPC, its answer cut short, same session.
    report = app.stack.agent_report(opened.session_id)
    [cut] = [turn for turn in report["turns"] if turn["interrupted"]]
    assert report["interrupts_by_rpc"] == 1, report
    full_seconds = espeak(DEFAULT_ANSWER, "en-us", 175).size / 16000
    assert 1.0 <= cut["answered_seconds"] < full_seconds - 1.0, report  # a second of it had played
    assert app.kiosk.link.session_id == opened.session_id
    assert not app.events(SessionClosed, start) and not app.events(LinkLost, start)
    print(f"\nbarge-in: last rendered sound {stopped_after_ms} ms after the press; the agent sent "
          f"{cut['answered_seconds']:.2f} s of a {full_seconds:.2f} s answer")


# ---------------------------------------------------------------------------------------------- headset
async def test_headset_plugged_mid_conversation_keeps_the_session(open_app: OpenApp) -> None:
    app = await open_app()
    start = app.now
    released = await app.ask(QUESTION)
    opened = (await app.wait_event(SessionOpened, 15, start)).event
    assert isinstance(opened, SessionOpened)
    speaking = await app.wait_phase(Phase.SPEAKING, 30, released)
    await app.wait_phase(Phase.LISTENING, 30, speaking.at)  # the answer played to its end
    assert app.state.route is Route.ARRAY and app.state.echo_path_verified

    # Plugged in mid-conversation: the route moves, the session stays.
    plugged = app.now
    app.pulse.plug("headset")
    await app.wait_event(RouteChanged, 10, plugged, lambda e: e.route is Route.HEADSET)
    on_headset = app.state
    assert on_headset.route is Route.HEADSET and not on_headset.echo_path_verified
    assert not on_headset.voice_barge_in  # no verified echo path: push-to-talk semantics for barge-in
    assert app.kiosk.engine.capture_device == HEADSET_DEVICE and not app.kiosk.engine.echo_cancel
    assert on_headset.phase in (Phase.LISTENING, Phase.THINKING, Phase.SPEAKING)
    assert app.kiosk.link.session_id == opened.session_id

    # The visitor asks again into the headset microphone: the same published track carries it.
    asked = app.now
    app.panel.press()
    await asyncio.sleep(0.4)
    words = (np.clip(speech(SECOND_QUESTION), -1, 1) * 32767).astype(np.int16)
    player = app.pulse.play(HEADSET_MIC_SINK, words.tobytes())
    await asyncio.to_thread(player.wait, 30)
    await asyncio.sleep(0.5)
    app.panel.release()
    second = await app.wait_phase(Phase.SPEAKING, 30, asked)
    assert await app.until(lambda: app.voiced_seconds(second.at) >= 0.5, 10), "the answer did not play on the headset"
    report = app.stack.agent_report(opened.session_id)
    # Both questions reached the agent in one session (on a loaded machine the agent's end-of-turn detector
    # may split the second one at a pause: count what it heard after the first turn).
    turns = report["turns"]
    heard = sum(t["speech_seconds"] for t in turns[1:])
    assert len(turns) >= 2 and heard >= 0.6 * len(words) / 16000, report
    await app.wait_phase(Phase.LISTENING, 30, second.at)

    # Unplugged: back to the array with echo cancellation, still the same session.
    unplugged = app.now
    app.pulse.unplug("headset")
    await app.wait_event(RouteChanged, 10, unplugged, lambda e: e.route is Route.ARRAY)
    back = app.state
    assert back.route is Route.ARRAY and back.echo_path_verified and app.kiosk.engine.echo_cancel
    assert app.kiosk.link.session_id == opened.session_id and app.kiosk.link.connected
    assert not app.events(SessionClosed, start) and not app.events(LinkLost, start)
    assert app.kiosk.route.switches == 2
    assert app.kiosk.status.route == "array"


# ---------------------------------------------------------------------------------------------- consent
async def test_the_consent_notice_plays_before_anything_reaches_the_agent(open_app: OpenApp,
                                                                          stack: LocalStack) -> None:
    """The visitor holds the button and talks at once: the AI notice plays from the speaker first (the LED shows
    it), the microphone goes live only after it, and the agent hears nothing said while it played."""
    app = await open_app(session={"consent_notice": True})
    pressed = app.now
    app.panel.press()
    await app.wait_event(SessionOpened, 15, pressed)
    await asyncio.sleep(0.3)
    app.room.say(speech(QUESTION), name="over the notice")
    shown = await app.wait(lambda e: e.new.consent_playing, 5, pressed)
    assert app.panel.gpio.pattern is not None and app.panel.gpio.pattern.name == "consent"
    notice = await app.wait_cue_finished(Cue.CONSENT_NOTICE, 20, pressed)
    assert app.voiced_seconds(shown.at, notice.at) > 2.0  # the notice came out of the speaker
    published = app.effects(StartPublishing, pressed)
    assert published == [StartPublishing(preroll=False)], published
    # Not streaming before the notice's end; live in the step that ended it (the button is still held).
    assert not any(e.new.publishing for e in app.entries if pressed <= e.at < notice.at)
    assert notice.new.publishing
    live_at = notice.at
    await asyncio.sleep(1.0)
    app.room.say(speech(QUESTION), name="after the notice")
    await asyncio.sleep(len(speech(QUESTION)) / 16000 + 0.6)
    app.panel.release()
    session = app.kiosk.link.session_id
    assert await app.until(lambda: bool(stack.agent_report(session)["onsets_at"]), 10), "the agent heard nothing"
    onsets = stack.agent_report(session)["onsets_at"]
    assert min(onsets) >= live_at, (onsets, live_at)  # the words said over the notice never reached it


# ---------------------------------------------------------------------------------------------- offline
@contextlib.contextmanager
def endpoint_across_the_link(stack: LocalStack, tmp_path: Path) -> Any:
    """The stand-in message endpoint in the server-side namespace, so delivery needs the veth link.

    It expects the demo's delivery credential and opens each message with the demo's operator key (the one
    ``demo_settings`` seals to: ``operator.key`` beside the spool).
    """
    network = stack.network
    assert network is not None
    key_file = tmp_path / "operator.key"
    operator_key(key_file)
    process = subprocess.Popen(network.server_command(
        [sys.executable, "-m", "kiosk_dev.message_endpoint", "--host", network.server_ip, "--port",
         str(ENDPOINT_PORT), "--private-key", str(key_file)]), stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], 20.0)
        assert ready, "the message endpoint did not start"
        yield process.stdout.readline().strip()
    finally:
        process.kill()
        process.wait(timeout=10)


def received(url: str) -> dict[str, Any]:
    """What the endpoint stored (its ``/received`` summary)."""
    with urllib.request.urlopen(url.replace("/messages", "/received"), timeout=5) as reply:
        summary: dict[str, Any] = json.loads(reply.read())
        return summary


async def test_offline_until_the_livekit_server_answers_again(open_app: OpenApp, stack: LocalStack) -> None:
    """The session API answers but the LiveKit server is down: the kiosk stays offline (the probe checks the
    server of the latest session too) until it is back, instead of going online and making the next visitor
    wait through a connect and its retries before hearing that it is offline."""
    assert stack.server is not None
    app = await open_app(livekit={"reopen_attempts": 1})
    stack.server.kill()
    try:
        pressed = await app.tap()
        await app.wait_phase(Phase.OFFLINE, 20, pressed)
        assert app.kiosk.link.server_url is not None
        # The probe asks every 0.2-1 s here: several turns, none of which may call the kiosk online.
        await asyncio.sleep(4.0)
        assert app.kiosk._probe is not None and not app.kiosk._probe.done()
        assert not app.events(LinkUp, pressed) and app.state.phase is Phase.OFFLINE, app.cues(pressed)
        refused = app.events(ApiRefused, pressed)
        assert refused and all(e.reason is RefusalReason.UNREACHABLE for e in refused), refused  # type: ignore[attr-defined]
    finally:
        back = app.now
        await asyncio.to_thread(stack.server.start)
    await app.wait_event(LinkUp, 15, back)


async def test_a_dead_livekit_server_keeps_the_kiosk_offline_only_so_long(open_app: OpenApp,
                                                                         stack: LocalStack) -> None:
    """The next grant may name another LiveKit server: past ``session.livekit_check_max_seconds`` the session API
    answering is enough, even with the last session's server still dead."""
    assert stack.server is not None
    app = await open_app(livekit={"reopen_attempts": 1}, session={"livekit_check_max_seconds": 5.0})
    stack.server.kill()
    try:
        pressed = await app.tap()
        offline = (await app.wait_phase(Phase.OFFLINE, 20, pressed)).at
        await asyncio.sleep(2.0)
        assert not app.events(LinkUp, pressed)  # within the limit: still offline, as above
        up = await app.wait_event(LinkUp, 15, pressed)
        assert up.at - offline >= 5.0, (up.at, offline)  # not before the limit
        assert not await asyncio.to_thread(stack.server.healthy)  # the old server is still dead
    finally:
        await asyncio.to_thread(stack.server.start)


# One rerun: on a loaded machine the rig's microphone path can lag (it ran below real time until its sound server's
# clients asked for 30 ms of buffering: docs/field.md, second run, item 9); the message's words then reach the
# kiosk late and a short noise after the tone ends the recording first.
@pytest.mark.flaky(reruns=1)
async def test_offline_message_is_stored_then_delivered_once(open_app: OpenApp, stack: LocalStack,
                                                             tmp_path: Path) -> None:
    import time

    from kiosk.fallback.sealing import parse_key
    from kiosk.fallback.spool import Spool

    assert stack.network is not None
    with endpoint_across_the_link(stack, tmp_path) as url:
        # A message left 40 days ago (past the default 30-day limit) and never collected: the service's
        # retention timer deletes it when it starts, before anyone stores anything.
        with Spool(tmp_path / "spool", recipient_public_key=parse_key(operator_key(tmp_path / "operator.key")),
                   wall_clock=lambda: time.time() - 40 * 86400) as old_spool:
            expired = old_spool.store(np.zeros(1600, dtype=np.int16))
        app = await open_app(delivery={"url": url, "retry_base_seconds": 0.2, "retry_max_seconds": 1.0,
                                       "request_timeout_seconds": 2.0})
        assert await app.until(lambda: not app.kiosk.spool.messages(), 5), app.kiosk.spool.messages()
        assert app.kiosk.spool.dropped_total == 1 and expired not in received(url)["stored"]
        stack.network.set_link(False)  # the outage, while idle
        pressed = await app.tap()
        refused = (await app.wait_event(ApiRefused, 10, pressed)).event
        assert isinstance(refused, ApiRefused)
        assert refused.reason in (RefusalReason.UNREACHABLE, RefusalReason.TIMEOUT), refused
        offline = await app.wait_phase(Phase.OFFLINE, 5, pressed)
        assert offline.new.offline_reason is OfflineReason.OFFLINE
        assert ShowPattern("offline") in app.effects(ShowPattern, pressed)
        await app.wait_cue_finished(Cue.LEAVE_MESSAGE, 30, pressed)
        assert app.cues(pressed) == ["offline", "leave_message"]
        assert app.state.phase is Phase.OFFLINE and app.state.message is MessageStep.OFFERED

        # Leave a message: press, the tone, speak into the room, silence ends it.
        record_press = await app.tap()
        tone = await app.wait_cue_finished(Cue.RECORDING_TONE, 10, record_press)
        await asyncio.sleep(0.3)
        words = speech(MESSAGE)
        app.room.say(words, name="message")
        stored_entry = await app.wait_event(RecordingStored, 30, tone.at)
        stored = stored_entry.event
        assert isinstance(stored, RecordingStored)
        await app.wait_cue_finished(Cue.MESSAGE_STORED, 15, stored_entry.at)
        assert app.cues(record_press) == ["recording_tone", "message_stored"]
        assert app.state.phase is Phase.OFFLINE
        [message] = app.kiosk.spool.messages()  # durably stored, not delivered while the link is down
        assert message.id == stored.message_id and message.state == "stored" and message.sealed
        words_seconds = len(words) / 16000
        voice = [(round(e.at - tone.at, 2), type(e.event).__name__) for e in app.entries
                 if e.at >= record_press and type(e.event).__name__.startswith(("Voice", "CueFinished"))]
        print(f"\nvoice events after the record press (s after the tone ended): {voice}")
        assert 0.8 * words_seconds <= message.duration_seconds <= words_seconds + 2.5, (
            message.as_dict(), voice, app.kiosk.engine.stats())
        sha256 = message.sha256

        # The link comes back: the probe posts LinkUp, the kiosk is idle again and delivers the message.
        restored = app.now
        changes = app.kiosk.netwatch.changes
        stack.network.set_link(True)
        link_up = await app.wait_event(LinkUp, 20, restored)
        # The kernel's news of the link coming up woke the probe (instead of its backoff's next turn).
        assert app.kiosk.netwatch.changes > changes
        print(f"\nLinkUp {link_up.at - restored:.2f} s after the link came back")
        await app.wait_phase(Phase.IDLE, 5, restored)
        assert await app.until(lambda: not app.kiosk.spool.messages(), 20), app.kiosk.spool.messages()
        summary = await asyncio.to_thread(received, url)
    assert summary["stored"] == {stored.message_id: sha256}
    assert summary["store_count"] == {stored.message_id: 1}
    # The endpoint opened it with the operator's key: the recording arrived whole.
    assert summary["opened"][stored.message_id]["seconds"] == pytest.approx(message.duration_seconds, abs=1e-3)
    print(f"\noffline: message of {message.duration_seconds:.2f} s stored, delivered after the link came back "
          f"in {summary['posts'][stored.message_id]} upload(s), stored once")


# ---------------------------------------------------------------------------------------------- API failures
FAILURES: list[tuple[str, RefusalReason, OfflineReason]] = [
    ("unauthorised", RefusalReason.UNAUTHORISED, OfflineReason.OFFLINE),
    ("forbidden", RefusalReason.UNAUTHORISED, OfflineReason.OFFLINE),
    ("credits_exhausted", RefusalReason.CREDITS_EXHAUSTED, OfflineReason.CREDITS_EXHAUSTED),
    ("rate_limited", RefusalReason.RATE_LIMITED, OfflineReason.OFFLINE),
    ("server_error", RefusalReason.SERVER_ERROR, OfflineReason.OFFLINE),
    ("timeout", RefusalReason.TIMEOUT, OfflineReason.OFFLINE),
    ("malformed", RefusalReason.MALFORMED_REPLY, OfflineReason.OFFLINE),
    ("not_json", RefusalReason.MALFORMED_REPLY, OfflineReason.OFFLINE),
    ("maintenance", RefusalReason.MAINTENANCE, OfflineReason.MAINTENANCE),
]


async def test_the_network_back_takes_a_standing_offer_back_once(open_app: OpenApp, stack: LocalStack) -> None:
    """A visitor offered a message during an outage is told when the service is back, and the next press is a
    conversation; a network that drops again before any session opened keeps the next offer (no flip-flop)."""
    assert stack.network is not None
    app = await open_app(interaction={"idle_end_seconds": 10.0})  # how long an offer stands
    try:
        stack.network.set_link(False)
        pressed = await app.tap()
        await app.wait_cue_finished(Cue.LEAVE_MESSAGE, 30, pressed)
        assert app.state.phase is Phase.OFFLINE and app.state.message is MessageStep.OFFERED
        restored = app.now
        stack.network.set_link(True)
        back = await app.wait_event(LinkUp, 20, restored)
        assert isinstance(back.event, LinkUp) and back.event.proven, back.event
        assert back.new.phase is Phase.IDLE and back.new.message is MessageStep.NONE
        assert app.cues(pressed) == ["offline", "leave_message", "status_online"]

        # Down again before anyone talked: this time the offer stands when the network returns (and runs out as
        # any offer does: test_state's test_an_offer_the_service_came_back_during_ends_idle).
        stack.network.set_link(False)
        pressed = await app.tap()
        await app.wait_cue_finished(Cue.LEAVE_MESSAGE, 30, pressed)
        restored = app.now
        stack.network.set_link(True)
        again = await app.wait_event(LinkUp, 20, restored)
        assert isinstance(again.event, LinkUp) and not again.event.proven, again.event
        assert again.new.phase is Phase.OFFLINE and again.new.message is MessageStep.OFFERED
        assert app.cues(pressed) == ["offline", "leave_message"]
    finally:
        stack.network.set_link(True)


async def test_every_api_failure_ends_in_the_right_state_and_cue(open_app: OpenApp, stack: LocalStack) -> None:
    # The message offer stands for idle_end_seconds when the probe cannot tell the refusal is over: keep it short.
    app = await open_app(interaction={"idle_end_seconds": 3.0})
    start = app.now
    wrong: dict[str, str] = {}
    taken_back = False  # an offer was taken back and no session opened since: later offers stand (no flip-flop)
    for mode, refusal, reason in FAILURES:
        if mode == "maintenance":
            stack.fail("none")
            stack.set_model_status("gpt-realtime", "maintenance")
        else:
            # Retry-After: longer than the client waits out (2 s), short enough not to block the next mode.
            stack.fail(mode, retry_after_seconds=3.0)
        pressed = await app.tap()
        entry = await app.wait_event(ApiRefused, 15, pressed)
        assert isinstance(entry.event, ApiRefused)
        got = (entry.event.reason, entry.new.phase, entry.new.offline_reason, app.cues(pressed)[:2],
               entry.new.last_error)
        want = (refusal, Phase.OFFLINE, reason, [reason.value, "leave_message"], f"api_{refusal.value}")
        if got != want:
            wrong[mode] = f"got {got}, want {want}"
        if ShowPattern(reason.value) not in app.effects(ShowPattern, pressed):
            wrong[mode + " pattern"] = str(app.effects(ShowPattern, pressed))
        # Service restored: the probe sees it and the kiosk is idle again, ready for the next visitor. Where
        # the probe's check answers for the refusal, the offer is taken back and the visitor told at once (the
        # first time: no session opens in between here); elsewhere the offer stands until it runs out (a
        # refusal of the session request may come again).
        stack.fail("none")
        stack.set_model_status("gpt-realtime", "available")
        await app.wait_phase(Phase.IDLE, 25, entry.at)
        told = Cue.STATUS_ONLINE.value in app.cues(pressed)
        if told != (refusal in PROBE_COVERS and not taken_back):
            wrong[mode + " online"] = f"told the service is back: {told}, cues {app.cues(pressed)}"
        taken_back |= told
    assert not wrong, wrong
    assert not app.events(SessionOpened)  # no failure mode opened a session by accident
    # The cues play one after another, in the order asked for (the first ones have finished by now; a cue
    # stopped when the offer was taken back never finishes).
    await app.wait_cue_finished(Cue.LEAVE_MESSAGE, 30, start)
    finished = [e.cue for e in app.events(CueFinished, start)]  # type: ignore[attr-defined]
    asked = iter(app.cues(start))
    assert len(finished) >= 2 and all(cue in asked for cue in finished), (finished, app.cues(start))
    # The kiosk works again after all of them.
    start = app.now
    await app.ask(QUESTION)
    await app.wait_event(SessionOpened, 15, start)


async def test_credits_exhausted_keeps_the_message_offer(open_app: OpenApp, stack: LocalStack) -> None:
    app = await open_app()
    stack.fail("credits_exhausted")
    pressed = await app.tap()
    await app.wait_event(ApiRefused, 15, pressed)
    offered = await app.wait_cue_finished(Cue.LEAVE_MESSAGE, 30, pressed)
    assert offered.new.phase is Phase.OFFLINE and offered.new.message is MessageStep.OFFERED, offered.new
    # The catalog answers during a 402 (the credits are the account's, not the service's), so the probe's first
    # ask posts LinkUp while the offer stands: the offer stays for the visitor, and nothing asks again meanwhile
    # (before: about once a second while it stood, every ask a request to the API).
    await asyncio.sleep(4.0)
    assert len(app.events(LinkUp, pressed)) == 1, app.events(LinkUp, pressed)
    assert app.state.phase is Phase.OFFLINE and app.state.message is MessageStep.OFFERED and app.state.online


async def test_a_message_left_while_the_network_is_up_is_delivered_at_once(open_app: OpenApp,
                                                                          stack: LocalStack,
                                                                          tmp_path: Path) -> None:
    """Offline for maintenance while the network is up: the probe keeps the kiosk offline (no LinkUp), so only
    the store itself can wake delivery (the spool is the controller's message store); the idle pass is 600 s."""
    with endpoint_across_the_link(stack, tmp_path) as url:
        app = await open_app(delivery={"url": url, "retry_base_seconds": 0.2, "retry_max_seconds": 1.0,
                                       "request_timeout_seconds": 2.0})
        stack.set_model_status("gpt-realtime", "maintenance")
        pressed = await app.tap()
        await app.wait_event(ApiRefused, 15, pressed)
        await app.wait_cue_finished(Cue.LEAVE_MESSAGE, 30, pressed)
        record_press = await app.tap()
        tone = await app.wait_cue_finished(Cue.RECORDING_TONE, 10, record_press)
        await asyncio.sleep(0.3)
        app.room.say(speech(MESSAGE), name="message")
        stored = (await app.wait_event(RecordingStored, 30, tone.at)).event
        assert isinstance(stored, RecordingStored)
        stored_at = app.now
        assert await app.until(lambda: not app.kiosk.spool.messages(), 10), app.kiosk.spool.messages()
        delivered_after = app.now - stored_at
        assert app.state.phase is Phase.OFFLINE
        assert not [e for e in app.entries if e.at >= pressed and isinstance(e.event, LinkUp)]
        summary = await asyncio.to_thread(received, url)
    assert summary["store_count"] == {stored.message_id: 1} and list(summary["opened"]) == [stored.message_id]
    print(f"\nstored while the network was up: delivered {delivered_after:.2f} s after it was stored")


async def test_the_operators_cue_replaces_the_shipped_one(open_app: OpenApp, stack: LocalStack,
                                                          tmp_path: Path) -> None:
    import wave

    cues = tmp_path / "cues"
    (cues / "en").mkdir(parents=True)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(4800) / 16000) * 32767).astype(np.int16)  # 0.3 s
    with wave.open(str(cues / "en" / "offline.wav"), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(16000)
        wav.writeframes(tone.tobytes())
    app = await open_app(spool={"cues_directory": cues})
    stack.fail("unauthorised")
    pressed = await app.tap()
    played = await app.wait_cue_finished(Cue.OFFLINE, 20, pressed)
    # The operator's 0.3 s tone, not the shipped spoken message (over a second).
    assert app.voiced_seconds(pressed, played.at) <= 1.0, app.voiced_seconds(pressed, played.at)


# ---------------------------------------------------------------------------------------------- the agent's tools
async def _open_a_session(app: App) -> str:
    """A short press opens a push-to-talk session (nothing said); the session's id once it is open."""
    from kiosk.events import SessionOpened as Opened

    pressed = await app.tap()
    await app.wait_event(Opened, 15, pressed)
    await app.wait_phase(Phase.LISTENING, 10, pressed)
    return app.kiosk.link.session_id


async def _ask_until_heard(app: App, text: str) -> float:
    """``App.ask``, but the visitor lets go only once the kiosk's VAD has heard them (on a loaded machine the
    capture path can lag by a second, and a release before any voice is a turn without speech: cancel_turn)."""
    pressed = app.now
    app.panel.press()
    await asyncio.sleep(0.4)
    words = speech(text)
    app.room.say(words, name=text)
    await asyncio.sleep(len(words) / 16000 + 0.5)
    await app.wait_event(VoiceStarted, 10, pressed)
    app.panel.release()
    return app.now


async def test_the_agent_uses_tools_mid_answer_and_takes_a_message(open_app: OpenApp, tmp_path: Path) -> None:
    """kiosk_status in the middle of an answer keeps the session (LEDs: tool); take_message then hands the
    visitor to the recorder once the agent has finished, and the message is stored with the agent's note, both
    sealed to the operator's key."""
    from kiosk.effects import StartRecording
    from kiosk.events import MessageRequested, ToolFinished, ToolStarted
    from kiosk.fallback.sealing import read_private_key, unseal

    note = "Wants the sales team to call back about the order"
    # Not about the status hold or the no-speech timer: a capture path lagging by seconds on a loaded machine must
    # not turn a long question into a status request, nor end the message before its first word is heard.
    app = await open_app(interaction={"status_hold_seconds": 30.0, "no_speech_timeout_seconds": 30.0})
    session_id = await _open_a_session(app)
    # The session's agent calls kiosk_status in the middle of its answer to the question.
    await asyncio.to_thread(app.stack.agent_plan_tool, session_id, "kiosk_status")
    released = await _ask_until_heard(app, QUESTION)
    tool_done = await app.wait_event(ToolFinished, 30, released)
    done = await app.wait_event(AgentStateChanged, 40, tool_done.at, lambda e: e.state is AgentState.LISTENING)
    answered = await app.wait_phase(Phase.LISTENING, 15, done.at) if app.state.phase is not Phase.LISTENING \
        else done
    assert ShowPattern("tool") in app.effects(ShowPattern, released)
    assert not any(e.new.phase is Phase.IDLE for e in app.entries if e.at >= released), "the session ended"
    report = app.stack.agent_report(session_id)
    assert [(c["tool"], c["ok"], c["mid_answer"]) for c in report["tool_calls"]] == [("kiosk_status", True, True)]
    first = next(e for e in app.entries if e.at >= released and isinstance(e.event, ToolStarted))
    timeline = [(round(e.at - released, 2), type(e.event).__name__, e.new.phase.value) for e in app.entries
                if e.at >= released]
    # The first half of the answer was heard before the tool.
    assert app.voiced_seconds(released, first.at) > 0.5, (timeline, app.voiced_seconds(released))

    await asyncio.to_thread(app.stack.agent_plan_tool, session_id, "take_message", json.dumps({"summary": note}))
    released = await _ask_until_heard(app, SECOND_QUESTION)
    assert app.kiosk.link.session_id == session_id  # the same conversation
    requested = (await app.wait_event(MessageRequested, 40, released)).event
    assert isinstance(requested, MessageRequested) and note not in repr(requested)
    handed = await app.wait_phase(Phase.RECORDING_MESSAGE, 40, released)
    assert handed.old.phase in (Phase.SPEAKING, Phase.LISTENING) and app.state.online
    assert app.voiced_seconds(released, handed.at) > 2.0  # the agent's answer and its "after the tone" played
    tone = await app.wait_cue_finished(Cue.RECORDING_TONE, 10, handed.at)
    assert app.effects(StartRecording, handed.at)
    await asyncio.sleep(0.3)
    words = speech(MESSAGE)
    app.room.say(words, name="message")
    stored = (await app.wait_event(RecordingStored, 30, tone.at)).event
    assert isinstance(stored, RecordingStored)
    await app.wait_cue_finished(Cue.MESSAGE_STORED, 15, tone.at)
    await app.wait_phase(Phase.IDLE, 10, tone.at)
    message = app.kiosk.spool.get(stored.message_id)
    sealed_note = app.kiosk.spool.read_note(message)
    assert sealed_note is not None and note.encode() not in sealed_note
    key = read_private_key(tmp_path / "operator.key")
    assert unseal(sealed_note, key).decode() == note
    # The visitor's words were recorded (how well VAD end-pointing cuts a message: the offline message test).
    assert message.duration_seconds >= 1.0, message.as_dict()
    assert answered.at < handed.at


# ---------------------------------------------------------------------------------------------- memory restart
async def test_a_memory_restart_waits_until_nobody_uses_the_kiosk(open_app: OpenApp, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Over its memory budget the kiosk asks systemd for a restart, but only after a quiet spell (kiosk.recycle)."""
    import socket

    import kiosk.app

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))  # as under systemd: someone starts it again
    monkeypatch.setattr(kiosk.app, "RECYCLE_CHECK_SECONDS", 0.2)
    # Resident memory as the SDK leaves it after some hundred sessions: 100 MiB at the start, 400 MiB from then on
    # (the default budget is 192 MiB). Real readings depend on what earlier tests left to the allocator to reuse.
    readings = iter([100.0])
    monkeypatch.setattr(kiosk.app, "resident_mib", lambda: next(readings, 400.0))
    quiet_seconds = 8.0
    app = await open_app(livekit={"recycle_idle_seconds": quiet_seconds}, interaction={"idle_end_seconds": 4.0})
    released = await app.ask(QUESTION)
    await app.wait_event(SessionOpened, 30)
    closed = await app.wait_event(SessionClosed, 90, since=released)
    assert not app.kiosk.restart_requested.is_set()  # a whole conversation over the budget, and no restart in it
    # The quiet spell starts with the step into idle (the session's end timer), a little before SessionClosed.
    idle = [e for e in app.entries if e.at <= closed.at and e.new.phase is Phase.IDLE and e.old.phase is not
            Phase.IDLE][-1]
    recycle = app.kiosk.recycle
    assert await app.until(app.kiosk.restart_requested.is_set, 60), (app.state, recycle)
    asked_at = app.now
    assert app.state.phase is Phase.IDLE
    assert asked_at - idle.at >= quiet_seconds - 0.05  # the listener hears of a step just after the kiosk noted it
    assert all(e.at < idle.at or e.new.phase is Phase.IDLE for e in app.entries)
    assert recycle.baseline_mib == 100.0  # the first reading, at the start
    said = b""
    with contextlib.suppress(BlockingIOError):
        while True:
            said += notify.recv(4096) + b"\n"
    notify.close()
    assert b"READY=1" in said and b"STATUS=restarting to hand back memory" in said
