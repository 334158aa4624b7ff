"""A stand-in voice agent on the plain rtc SDK (no model): hears the visitor, answers with espeak-ng speech.

It joins a session's room as a participant of kind AGENT and behaves as a LiveKit voice agent looks to a
client: ``lk.agent.state`` goes initializing -> listening -> thinking -> speaking -> listening; captions go
out as text streams on ``lk.transcription`` (the visitor's "transcript" as a stand-in description of what was
heard, the answer as one stream per segment); webrtcvad finds the end of the visitor's turn. It registers
the RPC method ``kiosk.interrupt`` (the kiosk's barge-in: stop speaking at once and listen) and also stops
when it hears the visitor speak over it. What it heard and did is kept in ``AgentReport`` for the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import webrtcvad
from livekit import rtc

from kiosk_dev.speech import espeak, to_rate

_LOGGER = logging.getLogger(__name__)

INTERRUPT_METHOD = "kiosk.interrupt"
STATE_ATTRIBUTE = "lk.agent.state"
TRANSCRIPTION_TOPIC = "lk.transcription"
IN_RATE_HZ = 16000
OUT_RATE_HZ = 24000  # LiveKit agents publish 24 kHz mono
VAD_FRAME_SAMPLES = 480  # 30 ms at 16 kHz
ONSET_PEAK = 1000  # a frame this loud after quiet is an onset (about -30 dBFS peak)
ONSET_QUIET_FRAMES = 30  # 300 ms of 10 ms frames
DEFAULT_ANSWER = "Thanks for your question. The registration desk is in the main hall, left of the entrance."


@dataclass
class Turn:
    """One visitor turn as the agent heard it."""

    speech_seconds: float
    rms_dbfs: float
    answered_seconds: float = 0.0
    interrupted: bool = False


@dataclass
class AgentReport:
    """What one agent heard and did in its room."""

    room: str
    turns: list[Turn] = field(default_factory=list)
    interrupts_by_rpc: int = 0
    interrupts_by_voice: int = 0
    states: list[str] = field(default_factory=list)
    visitor_joins: int = 0
    frames_heard: int = 0
    # Loop times (CLOCK_MONOTONIC, comparable across processes on one machine) for the link benchmark:
    # visitor audio onsets (a loud frame after >= 300 ms of quiet) and the first frame of each answer sent.
    onsets_at: list[float] = field(default_factory=list)
    answers_sent_at: list[float] = field(default_factory=list)


class StandInAgent:
    """One agent in one room; ``run()`` until the room ends or the visitor leaves for good."""

    def __init__(self, url: str, token: str, room_name: str, *, answer: str = DEFAULT_ANSWER,
                 end_of_turn_ms: int = 500, min_speech_ms: int = 240, vad_mode: int = 2,
                 linger_seconds: float = 20.0) -> None:
        self._url = url
        self._token = token
        self.report = AgentReport(room_name)
        self._answer = answer
        self._end_of_turn_frames = max(1, end_of_turn_ms // 30)
        self._min_speech_frames = max(1, min_speech_ms // 30)
        self._vad_mode = vad_mode
        self._linger_seconds = linger_seconds
        self._room = rtc.Room()
        self._source = rtc.AudioSource(OUT_RATE_HZ, 1, queue_size_ms=200)
        self._speaking: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listeners: dict[str, asyncio.Task[Any]] = {}
        self._done = asyncio.Event()
        self._visitor_left: asyncio.TimerHandle | None = None
        self._state = ""

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _set_state(self, state: str) -> None:
        self._state = state
        self.report.states.append(state)
        with contextlib.suppress(Exception):  # a state update lost in a reconnect is not fatal to a stand-in
            await self._room.local_participant.set_attributes({STATE_ATTRIBUTE: state})

    async def run(self) -> AgentReport:
        """Join, serve the visitor, and return the report when done."""
        room = self._room

        # rtc SDK callbacks run on this loop and must be plain functions: they only start tasks.
        @room.on("track_subscribed")
        def _subscribed(track: rtc.Track, pub: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant) -> None:
            if track.kind == rtc.TrackKind.KIND_AUDIO:
                # A visitor's full reconnect republishes its track: listen to the new one only.
                old = self._listeners.pop(who.identity, None)
                if old is not None:
                    old.cancel()
                self._listeners[who.identity] = self._spawn(self._listen(track, pub.sid))

        @room.on("participant_connected")
        def _joined(who: rtc.RemoteParticipant) -> None:
            self.report.visitor_joins += 1
            if self._visitor_left is not None:
                self._visitor_left.cancel()
                self._visitor_left = None

        @room.on("participant_disconnected")
        def _left(who: rtc.RemoteParticipant) -> None:
            if not room.remote_participants:
                self._visitor_left = asyncio.get_running_loop().call_later(self._linger_seconds, self._done.set)

        @room.on("disconnected")
        def _disconnected(reason: Any) -> None:
            self._done.set()

        await room.connect(self._url, self._token, rtc.RoomOptions(auto_subscribe=True))
        await self._set_state("initializing")
        room.local_participant.register_rpc_method(INTERRUPT_METHOD, self._on_interrupt_rpc)
        track = rtc.LocalAudioTrack.create_audio_track("agent-voice", self._source)
        await room.local_participant.publish_track(
            track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        self.report.visitor_joins = len(room.remote_participants)
        await self._set_state("listening")
        try:
            await self._done.wait()
        finally:
            for task in list(self._tasks):
                task.cancel()
            await room.disconnect()
            await self._source.aclose()
        return self.report

    def stop(self) -> None:
        """Leave the room."""
        self._done.set()

    @property
    def done(self) -> bool:
        """Whether the agent has left (or was told to)."""
        return self._done.is_set()

    async def _on_interrupt_rpc(self, data: rtc.RpcInvocationData) -> str:
        was_speaking = self._interrupt()
        if was_speaking:
            self.report.interrupts_by_rpc += 1
        return "interrupted" if was_speaking else "idle"

    def _interrupt(self) -> bool:
        task = self._speaking
        if task is None or task.done():
            return False
        task.cancel()
        # Drop what is queued in the source so the visitor hears the stop at once.
        self._source.clear_queue()
        if self.report.turns:
            self.report.turns[-1].interrupted = True
        return True

    async def _listen(self, track: rtc.Track, track_sid: str) -> None:
        stream = rtc.AudioStream(track, sample_rate=IN_RATE_HZ, num_channels=1, frame_size_ms=10)
        # One detector per track: webrtcvad keeps state (hangover, noise estimate), and another participant's
        # audio interleaved through a shared one would keep the visitor's turn from ever ending.
        vad = webrtcvad.Vad(self._vad_mode)
        pending = np.zeros(0, dtype=np.int16)
        voiced_run = 0
        silent_run = 0
        in_speech = False
        speech_frames = 0
        energy = 0.0
        quiet_frames = 0
        loop = asyncio.get_running_loop()
        try:
            async for event in stream:
                pcm = np.frombuffer(event.frame.data, dtype=np.int16)
                self.report.frames_heard += 1
                if int(np.abs(pcm).max(initial=0)) >= ONSET_PEAK:
                    if quiet_frames >= ONSET_QUIET_FRAMES:
                        self.report.onsets_at.append(loop.time())
                    quiet_frames = 0
                else:
                    quiet_frames += 1
                pending = np.concatenate([pending, pcm])
                while pending.size >= VAD_FRAME_SAMPLES:
                    chunk, pending = pending[:VAD_FRAME_SAMPLES], pending[VAD_FRAME_SAMPLES:]
                    voiced = vad.is_speech(chunk.tobytes(), IN_RATE_HZ)
                    if voiced:
                        voiced_run += 1
                        silent_run = 0
                    else:
                        silent_run += 1
                        voiced_run = 0
                    if not in_speech and voiced_run >= 3:
                        in_speech = True
                        speech_frames = voiced_run
                        energy = 0.0
                        if self._state == "speaking" and self._interrupt():
                            self.report.interrupts_by_voice += 1
                    if in_speech:
                        speech_frames += 1
                        energy += float(np.mean(chunk.astype(np.float64) ** 2))
                        if silent_run >= self._end_of_turn_frames:
                            in_speech = False
                            voiced_frames = speech_frames - silent_run
                            if voiced_frames >= self._min_speech_frames:
                                rms = np.sqrt(energy / max(1, speech_frames)) / 32768.0
                                turn = Turn(voiced_frames * 0.03, float(20 * np.log10(max(rms, 1e-9))))
                                self.report.turns.append(turn)
                                self._spawn(self._answer_turn(turn, track_sid))
        finally:
            await stream.aclose()

    async def _caption(self, text: str, track_sid: str, segment: str, *, delta: bool) -> None:
        attributes = {"lk.segment_id": segment, "lk.transcribed_track_id": track_sid,
                      "lk.transcription_final": "true"}
        writer = await self._room.local_participant.stream_text(topic=TRANSCRIPTION_TOPIC, attributes=attributes)
        if delta:
            for word in text.split(" "):
                await writer.write(word + " ")
        else:
            await writer.write(text)
        await writer.aclose()

    async def _answer_turn(self, turn: Turn, visitor_track_sid: str) -> None:
        if self._speaking is not None and not self._speaking.done():
            return
        await self._set_state("thinking")
        heard = f"(visitor spoke for {turn.speech_seconds:.1f} seconds)"
        with contextlib.suppress(Exception):
            await self._caption(heard, visitor_track_sid, f"visitor-{uuid.uuid4().hex[:8]}", delta=False)
        # espeak-ng runs as a subprocess for a few hundred ms: off the loop, so frames keep flowing meanwhile.
        audio = await asyncio.to_thread(espeak, self._answer, "en-us", 175)
        pcm = (np.clip(to_rate(audio, IN_RATE_HZ, OUT_RATE_HZ), -1, 1) * 32767).astype(np.int16)
        self._speaking = self._spawn(self._speak(pcm, turn))
        own_sid = next(iter(self._room.local_participant.track_publications), "")
        with contextlib.suppress(Exception):
            await self._caption(self._answer, own_sid, f"agent-{uuid.uuid4().hex[:8]}", delta=True)

    async def _speak(self, pcm: np.ndarray[Any, np.dtype[np.int16]], turn: Turn) -> None:
        frame_samples = OUT_RATE_HZ // 100
        await self._set_state("speaking")
        sent = 0
        loop = asyncio.get_running_loop()
        onset_noted = False
        try:
            for start in range(0, pcm.size - frame_samples + 1, frame_samples):
                chunk = pcm[start:start + frame_samples]
                if not onset_noted and int(np.abs(chunk).max(initial=0)) >= ONSET_PEAK:
                    self.report.answers_sent_at.append(loop.time())
                    onset_noted = True
                await self._source.capture_frame(rtc.AudioFrame(chunk.tobytes(), OUT_RATE_HZ, 1, frame_samples))
                sent += frame_samples
            await self._source.wait_for_playout()
        finally:
            turn.answered_seconds = sent / OUT_RATE_HZ
            self._spawn(self._set_state("listening"))


class AgentPool:
    """Dispatches one ``StandInAgent`` per new room (the stand-in session API's dispatcher)."""

    def __init__(self, **agent_options: Any) -> None:
        self._options = agent_options
        self.agents: dict[str, StandInAgent] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def dispatch(self, url: str, room: str, token: str) -> None:
        """Start an agent in ``room`` (returns at once; the agent runs in its own task)."""
        agent = StandInAgent(url, token, room, **self._options)
        self.agents[room] = agent
        task = asyncio.ensure_future(agent.run())
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _LOGGER.error("stand-in agent failed: %r", task.exception())

    def leave_all(self) -> int:
        """Make every agent still in a room leave it (a fault for the field bench); returns how many."""
        running = [agent for agent in self.agents.values() if not agent.done]
        for agent in running:
            agent.stop()
        return len(running)

    def reports(self) -> dict[str, dict[str, Any]]:
        """Each room's report as plain data."""
        return {room: asdict(agent.report) for room, agent in self.agents.items()}

    async def aclose(self) -> None:
        """Stop every agent and wait for them to leave."""
        for agent in self.agents.values():
            agent.stop()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
