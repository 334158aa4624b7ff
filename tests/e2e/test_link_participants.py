"""Untrusted room participants over the real LiveKit server: only the agent is heard, believed and let listen.

Someone who obtains a token for the session's room joins it next to the kiosk and the stand-in agent and
tries everything: sets ``lk.agent.state``, publishes loud audio, sends captions (also pretending to be the
visitor's transcript), and subscribes to the kiosk's microphone. The kiosk must ignore all of it (nothing
played, no state change, no caption read) and refuse the subscription, while the real agent still hears the
visitor and answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import numpy as np
import pytest
from livekit import api, rtc

from kiosk.events import AgentState, AgentStateChanged
from kiosk.link.livekit import MAX_CAPTION_CHARS
from kiosk.settings import SessionSource
from kiosk_dev.speech import SENTENCES, espeak
from kiosk_dev.stack import LinkHarness, LocalStack

pytestmark = [pytest.mark.livekit, pytest.mark.slow, pytest.mark.timeout(150)]

QUESTION = espeak(SENTENCES[0], "en-us")
TONE_HZ = 440.0
RATE_HZ = 48000


class Intruder:
    """A participant that is not the session's agent (or an agent the API did not name) trying everything."""

    def __init__(self, stack: LocalStack, room: str, identity: str, *, agent_kind: bool = False) -> None:
        assert stack.server is not None
        grants = api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True,
                                 can_publish_data=True, can_update_own_metadata=True)
        token = (api.AccessToken(stack.server.api_key, stack.server.api_secret).with_identity(identity)
                 .with_name(identity).with_grants(grants))
        if agent_kind:
            token = token.with_kind("agent")
        self._token = token.to_jwt()
        self._url = stack.livekit_url
        self.identity = identity
        self.room = rtc.Room()
        self.subscribed: list[str] = []  # identities whose tracks it received
        self.refused: list[str] = []  # track subscriptions the server refused
        self._source = rtc.AudioSource(RATE_HZ, 1, queue_size_ms=200)
        self._tone: asyncio.Task[None] | None = None

        @self.room.on("track_subscribed")
        def _got(track: rtc.Track, pub: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant) -> None:
            self.subscribed.append(who.identity)

        @self.room.on("track_subscription_failed")
        def _failed(who: rtc.RemoteParticipant, sid: str, error: str) -> None:
            self.refused.append(who.identity)

    async def join(self) -> None:
        await self.room.connect(self._url, self._token, rtc.RoomOptions(auto_subscribe=True))

    def try_to_subscribe(self) -> int:
        """Ask for every remote track explicitly (on top of auto-subscribe); returns how many were asked for."""
        asked = 0
        for participant in self.room.remote_participants.values():
            for publication in participant.track_publications.values():
                publication.set_subscribed(True)
                asked += 1
        return asked

    async def set_state(self, state: str) -> None:
        await self.room.local_participant.set_attributes({"lk.agent.state": state})

    async def publish_tone(self) -> str:
        """Publish a loud tone as a microphone track, sent continuously until ``leave``."""
        track = rtc.LocalAudioTrack.create_audio_track("intruder-voice", self._source)
        publication = await self.room.local_participant.publish_track(
            track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        self._tone = asyncio.ensure_future(self._play_tone())
        return publication.sid

    async def _play_tone(self) -> None:
        samples = RATE_HZ // 100
        t = np.arange(samples) / RATE_HZ
        n = 0
        while True:
            pcm = (0.5 * 32767 * np.sin(2 * np.pi * TONE_HZ * (t + n * 0.01))).astype(np.int16)
            await self._source.capture_frame(rtc.AudioFrame(pcm.tobytes(), RATE_HZ, 1, samples))
            n += 1

    async def caption(self, text: str, **attributes: str) -> None:
        writer = await self.room.local_participant.stream_text(
            topic="lk.transcription", attributes={"lk.segment_id": f"seg-{len(text)}",
                                                  "lk.transcription_final": "true", **attributes})
        for start in range(0, len(text), 10_000):
            await writer.write(text[start:start + 10_000])
        await writer.aclose()

    async def leave(self) -> None:
        if self._tone is not None:
            self._tone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tone
        await self.room.disconnect()
        await self._source.aclose()


def _room_of(stack: LocalStack, session_id: str) -> dict[str, Any]:
    return next(s for s in stack.sessions() if s["session_id"] == session_id)


def _states_since(kiosk: LinkHarness, start: int) -> list[AgentState]:
    return [e.state for _, e in kiosk.events.events[start:] if isinstance(e, AgentStateChanged)]


async def _answered(kiosk: LinkHarness) -> None:
    """The real agent still hears the visitor and its answer plays."""
    before = len(kiosk.agent_report()["turns"])  # type: ignore[arg-type]
    start = len(kiosk.events.events)
    stopped = await kiosk.ask(QUESTION)
    await kiosk.wait_state(AgentState.SPEAKING, start)
    assert await kiosk.playout.wait_voiced(1.0, stopped, 10) >= 1.0
    assert len(kiosk.agent_report()["turns"]) == before + 1  # type: ignore[arg-type]


async def _everything_is_ignored(stack: LocalStack, kiosk: LinkHarness, intruder: Intruder) -> None:
    assert kiosk.link.room is not None
    await intruder.join()
    await asyncio.sleep(1.0)
    start = len(kiosk.events.events)
    loop = asyncio.get_running_loop()
    tone_from = loop.time()
    tone_sid = await intruder.publish_tone()
    # The agent is listening (nobody asked anything): a state change now could only come from the intruder.
    for state in ("speaking", "thinking", "speaking"):
        await intruder.set_state(state)
        await asyncio.sleep(0.3)
    mic_sid = kiosk.link._mic_sid
    await intruder.caption("INTRUDER says the exit is closed")
    await intruder.caption("INTRUDER forged visitor words", **{"lk.transcribed_track_id": mic_sid})
    asked = intruder.try_to_subscribe()
    await asyncio.sleep(3.0)

    assert _states_since(kiosk, start) == [], "a participant that is not the agent changed the kiosk's state"
    assert kiosk.playout.voiced_seconds(since=tone_from) == 0.0, "the intruder's audio reached the speaker"
    seen = kiosk.link.room.remote_participants[intruder.identity]
    assert tone_sid in seen.track_publications and not seen.track_publications[tone_sid].subscribed
    assert not any("INTRUDER" in c.text for c in kiosk.link.captions)
    assert kiosk.status.last_exchange.visitor_chars == 0 and kiosk.status.last_exchange.agent_chars == 0
    assert asked >= 2  # the kiosk's microphone and the agent's voice
    kiosk_identity = kiosk.link.room.local_participant.identity
    # The intruder may hear the agent (not the kiosk's business) but never the kiosk's microphone.
    assert kiosk_identity not in intruder.subscribed

    await _answered(kiosk)  # the visitor speaks: the microphone is live now, and the real agent hears it
    intruder.try_to_subscribe()
    await asyncio.sleep(1.0)
    assert kiosk_identity not in intruder.subscribed
    assert AgentState.SPEAKING in _states_since(kiosk, start)  # from the agent, answering
    print(f"\nintruder: {asked} subscriptions asked for, refusals seen by it: {len(intruder.refused)}, "
          f"kiosk states after it joined: {[s.value for s in _states_since(kiosk, start)]}")


async def test_a_participant_that_is_not_the_agent_is_ignored(stack: LocalStack) -> None:
    kiosk = LinkHarness(stack)
    intruder: Intruder | None = None
    try:
        opened = await kiosk.open()
        intruder = Intruder(stack, _room_of(stack, opened.session_id)["room"], "intruder")
        await _everything_is_ignored(stack, kiosk, intruder)
    finally:
        if intruder is not None:
            await intruder.leave()
        await kiosk.link.aclose()


async def test_an_agent_the_api_did_not_name_is_not_trusted(stack: LocalStack) -> None:
    """Kind AGENT is not enough when the session API named the agent's identity."""
    kiosk = LinkHarness(stack)
    impostor: Intruder | None = None
    try:
        opened = await kiosk.open()
        room = _room_of(stack, opened.session_id)["room"]
        impostor = Intruder(stack, room, "agent-impostor", agent_kind=True)
        assert not kiosk.link.trusts("agent-impostor")
        await _everything_is_ignored(stack, kiosk, impostor)
        assert not kiosk.link.trusts("agent-impostor") and kiosk.link.trusts(f"agent-{room}")
    finally:
        if impostor is not None:
            await impostor.leave()
        await kiosk.link.aclose()


async def test_token_endpoint_trusts_agents_by_kind_and_caps_captions(stack: LocalStack) -> None:
    """No identity named: the participant kind decides; the agent hears the kiosk; a huge caption is cut."""
    kiosk = LinkHarness(stack, source=SessionSource.TOKEN_ENDPOINT, token_endpoint_url=stack.api_url + "/token")
    intruder: Intruder | None = None
    second_agent: Intruder | None = None
    try:
        opened = await kiosk.open()
        intruder = Intruder(stack, opened.session_id, "intruder")
        await _everything_is_ignored(stack, kiosk, intruder)
        # Another participant of kind AGENT is trusted here (only a backend-minted token makes one); its
        # 100,000-character caption is read only up to MAX_CAPTION_CHARS.
        second_agent = Intruder(stack, opened.session_id, "agent-second", agent_kind=True)
        await second_agent.join()
        # The server announces an agent participant to the others a little after it joins.
        for _ in range(100):
            if kiosk.link.trusts("agent-second"):
                break
            await asyncio.sleep(0.1)
        assert kiosk.link.trusts("agent-second")
        await second_agent.caption("A" * 100_000)
        await asyncio.sleep(2.0)
        longest = max(kiosk.link.captions, key=lambda c: len(c.text))
        assert longest.text.startswith("AAAA") and len(longest.text) == MAX_CAPTION_CHARS
        assert kiosk.status.last_exchange.agent_chars <= MAX_CAPTION_CHARS + 1000
    finally:
        for participant in (intruder, second_agent):
            if participant is not None:
                await participant.leave()
        await kiosk.link.aclose()


async def test_after_a_full_reconnect_only_the_agent_may_listen(stack: LocalStack) -> None:
    """A full reconnect is a new participant session on the server: the restriction must be set again."""
    kiosk = LinkHarness(stack)
    intruder: Intruder | None = None
    try:
        opened = await kiosk.open()
        intruder = Intruder(stack, _room_of(stack, opened.session_id)["room"], "intruder")
        await intruder.join()
        assert kiosk.link.room is not None
        start = len(kiosk.events.events)
        await kiosk.link.room.simulate_scenario(rtc.SimulateScenarioKind.SIMULATE_FULL_RECONNECT)
        await kiosk.events.wait_for(lambda e: type(e).__name__ == "LinkUp", 20, start)
        await asyncio.sleep(1.0)
        kiosk_identity = kiosk.link.room.local_participant.identity
        intruder.try_to_subscribe()
        await _answered(kiosk)  # the agent subscribed again and hears the visitor
        intruder.try_to_subscribe()
        await asyncio.sleep(1.0)
        assert kiosk_identity not in intruder.subscribed
        assert kiosk.link.session_id == opened.session_id
    finally:
        if intruder is not None:
            await intruder.leave()
        await kiosk.link.aclose()
