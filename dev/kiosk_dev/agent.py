"""A stand-in voice agent on the plain rtc SDK (no model): hears the visitor, answers with espeak-ng speech.

It joins a session's room as a participant of kind AGENT and behaves as a LiveKit voice agent looks to a
client: ``lk.agent.state`` goes initializing -> listening -> thinking -> speaking -> listening; captions go
out as text streams on ``lk.transcription`` (the visitor's "transcript" as a stand-in description of what was
heard, the answer as one stream per segment); webrtcvad finds the end of the visitor's turn. It registers
the RPC method ``kiosk.interrupt`` (the kiosk's barge-in: stop speaking at once and listen) and also stops
when it hears the visitor speak over it.

Manual turns (``manual_turns``, on by default) work as a LiveKit voice agent with ``turn_detection="manual"``:
it registers ``start_turn`` (stop speaking, listen to the caller), ``end_turn`` (the turn is over: answer what
was heard) and ``cancel_turn`` (drop it). While a manual turn is open its own end-of-turn detection does not
end the turn, however long the visitor pauses. With ``manual_turns=False`` it registers none of them, like an
agent that always detects turns itself.

Tools: ``call_tool`` calls one of the kiosk's tools over RPC (``kiosk.<tool>``) and ``plan_tool`` makes the next
answer call one in its middle: half the answer, the state goes ``thinking``, the call, then the tool's spoken
result (or its refusal) and the rest of the answer. What it heard and did (turns, turn RPCs with their times,
tool calls with their results) is kept in ``AgentReport`` for the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
TURN_METHODS = ("start_turn", "end_turn", "cancel_turn")
TOOL_PREFIX = "kiosk."
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
    manual: bool = False  # ended by the kiosk's end_turn (else by the agent's own end-of-turn detection)


@dataclass
class TurnRpc:
    """A turn RPC the kiosk made (loop time: CLOCK_MONOTONIC, comparable across processes on one machine)."""

    method: str
    at: float
    caller: str


@dataclass
class ToolCall:
    """One kiosk tool the agent called, and what came back."""

    tool: str
    at: float
    mid_answer: bool
    ok: bool
    result: dict[str, Any] | None = None  # the kiosk's JSON answer
    error_code: int | None = None  # the RpcError's code, message and data on a refusal
    error_message: str = ""
    error_data: dict[str, Any] | None = None
    seconds: float = 0.0

    @property
    def say(self) -> str:
        """What the agent speaks: the result's sentence, or the refusal's."""
        if self.result is not None:
            return str(self.result.get("say", ""))
        return self.error_message


@dataclass
class _ManualTurn:
    """What the agent hears from the caller of start_turn until end_turn (30 ms VAD chunks)."""

    caller: str
    chunks: int = 0
    first_voiced: int | None = None
    last_voiced: int = -1
    energy: float = 0.0
    track_sid: str = ""


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
    turn_rpcs: list[TurnRpc] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)


class StandInAgent:
    """One agent in one room; ``run()`` until the room ends or the visitor leaves for good."""

    def __init__(self, url: str, token: str, room_name: str, *, answer: str = DEFAULT_ANSWER,
                 end_of_turn_ms: int = 500, min_speech_ms: int = 240, vad_mode: int = 2,
                 linger_seconds: float = 20.0, manual_turns: bool = True, stop_lag_ms: int = 0) -> None:
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
        self._manual_turns = manual_turns
        # How long the agent goes on speaking after it answered an interrupt RPC (an agent whose speech pipeline
        # stops late, or audio still on its way to the kiosk).
        self._stop_lag_seconds = stop_lag_ms / 1000
        self._manual: _ManualTurn | None = None  # the open manual turn
        self._plans: list[tuple[str, str]] = []  # (tool, payload) the next answers call in their middle
        self._onset_noted = False  # the current answer's first loud frame was noted

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
                self._listeners[who.identity] = self._spawn(self._listen(track, pub.sid, who.identity))

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
        if self._manual_turns:
            for method in TURN_METHODS:
                room.local_participant.register_rpc_method(method, self._on_turn_rpc)
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
        if not self._answering():
            return "idle"
        self.report.interrupts_by_rpc += 1
        if self._stop_lag_seconds:
            asyncio.get_running_loop().call_later(self._stop_lag_seconds, self._interrupt)
        else:
            self._interrupt()
        return "interrupted"

    async def _on_turn_rpc(self, data: rtc.RpcInvocationData) -> str:
        loop = asyncio.get_running_loop()
        self.report.turn_rpcs.append(TurnRpc(data.method, loop.time(), data.caller_identity))
        if data.method == "start_turn":
            # As a LiveKit agent's start_user_turn: stop talking, listen to the caller only, until end_turn.
            if self._state == "speaking" and self._interrupt():
                self.report.interrupts_by_rpc += 1
            self._manual = _ManualTurn(data.caller_identity)
            return ""
        turn, self._manual = self._manual, None
        if data.method == "end_turn" and turn is not None and turn.first_voiced is not None:
            voiced = turn.last_voiced - turn.first_voiced + 1
            if voiced >= self._min_speech_frames:
                rms = np.sqrt(turn.energy / voiced) / 32768.0
                heard = Turn(voiced * 0.03, float(20 * np.log10(max(rms, 1e-9))), manual=True)
                self.report.turns.append(heard)
                self._spawn(self._answer_turn(heard, turn.track_sid, turn.caller))
        return ""

    def plan_tool(self, tool: str, payload: str = "") -> None:
        """Make the next answer call ``tool`` (with the JSON ``payload``) in its middle."""
        self._plans.append((tool, payload))

    def _kiosk_identity(self) -> str:
        """The kiosk's participant identity (the stand-in API names kiosks kiosk-...)."""
        identities = sorted(self._room.remote_participants)
        return next((i for i in identities if i.startswith("kiosk")), identities[0] if identities else "")

    async def call_tool(self, tool: str, payload: str = "", *, destination: str | None = None,
                        mid_answer: bool = False) -> ToolCall:
        """Call the kiosk's tool ``tool`` over RPC (``kiosk.<tool>``); the call and its outcome are reported."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        record = ToolCall(tool, started, mid_answer, ok=False)
        try:
            reply = await self._room.local_participant.perform_rpc(
                destination_identity=destination or self._kiosk_identity(), method=TOOL_PREFIX + tool,
                payload=payload, response_timeout=8.0)
            record.ok = True
            record.result = json.loads(reply) if reply else {}
        except rtc.RpcError as error:
            record.error_code = int(error.code)
            record.error_message = error.message
            with contextlib.suppress(ValueError, TypeError):
                record.error_data = json.loads(error.data or "")
        record.seconds = loop.time() - started
        self.report.tool_calls.append(record)
        return record

    def _answering(self) -> bool:
        """An answer is being spoken and nobody has cut it yet."""
        task = self._speaking
        # An interrupt RPC and a start_turn sent together by one press must count as one interruption: the
        # first cancels the answer, the second finds it already cancelling.
        return task is not None and not task.done() and not task.cancelling()

    def _interrupt(self) -> bool:
        task = self._speaking
        if task is None or not self._answering():
            return False
        task.cancel()
        # Drop what is queued in the source so the visitor hears the stop at once.
        self._source.clear_queue()
        if self.report.turns:
            self.report.turns[-1].interrupted = True
        return True

    async def _listen(self, track: rtc.Track, track_sid: str, identity: str) -> None:
        stream = rtc.AudioStream(track, sample_rate=IN_RATE_HZ, num_channels=1, frame_size_ms=10)
        # One detector per track: webrtcvad keeps state (hangover, noise estimate), and another participant's
        # audio interleaved through a shared one would keep the visitor's turn from ever ending.
        vad = webrtcvad.Vad(self._vad_mode)
        pending = np.zeros(0, dtype=np.int16)
        voiced_run = 0
        silent_run = 0
        in_speech = False
        in_manual_turn = False  # the current speech segment overlapped a manual turn: not a turn of its own
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
                    manual = self._manual if self._manual is not None and self._manual.caller == identity else None
                    if manual is not None:
                        # A manual turn: everything the caller says until end_turn is one turn.
                        manual.track_sid = track_sid
                        if voiced:
                            manual.first_voiced = manual.chunks if manual.first_voiced is None else manual.first_voiced
                            manual.last_voiced = manual.chunks
                        if manual.first_voiced is not None:
                            manual.energy += float(np.mean(chunk.astype(np.float64) ** 2))
                        manual.chunks += 1
                    if voiced:
                        voiced_run += 1
                        silent_run = 0
                    else:
                        silent_run += 1
                        voiced_run = 0
                    in_manual_turn = in_manual_turn or manual is not None
                    if not in_speech and voiced_run >= 3:
                        in_speech = True
                        in_manual_turn = manual is not None
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
                            if voiced_frames >= self._min_speech_frames and not in_manual_turn:
                                # Its own end-of-turn detection, unless the kiosk held the turn (end_turn or
                                # cancel_turn decided about this speech already).
                                rms = np.sqrt(energy / max(1, speech_frames)) / 32768.0
                                turn = Turn(voiced_frames * 0.03, float(20 * np.log10(max(rms, 1e-9))))
                                self.report.turns.append(turn)
                                self._spawn(self._answer_turn(turn, track_sid, identity))
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

    async def _answer_turn(self, turn: Turn, visitor_track_sid: str, visitor: str) -> None:
        if self._speaking is not None and not self._speaking.done():
            return
        await self._set_state("thinking")
        heard = f"(visitor spoke for {turn.speech_seconds:.1f} seconds)"
        with contextlib.suppress(Exception):
            await self._caption(heard, visitor_track_sid, f"visitor-{uuid.uuid4().hex[:8]}", delta=False)
        pcm = await _synthesise(self._answer)
        plan = self._plans.pop(0) if self._plans else None
        self._speaking = self._spawn(self._speak(pcm, turn, plan, visitor))
        own_sid = next(iter(self._room.local_participant.track_publications), "")
        with contextlib.suppress(Exception):
            await self._caption(self._answer, own_sid, f"agent-{uuid.uuid4().hex[:8]}", delta=True)

    async def _speak(self, pcm: np.ndarray[Any, np.dtype[np.int16]], turn: Turn,
                     plan: tuple[str, str] | None = None, visitor: str = "") -> None:
        """Speak the answer; with a planned tool: its first half, the tool call, the spoken result, the rest."""
        await self._set_state("speaking")
        turn.answered_seconds = 0.0  # counted as it is sent, so an answer cut short says how much went out
        self._onset_noted = False
        try:
            if plan is None:
                await self._play(pcm, turn)
            else:
                half = (pcm.size // 2) // (OUT_RATE_HZ // 100) * (OUT_RATE_HZ // 100)
                await self._play(pcm[:half], turn)
                await self._source.wait_for_playout()
                await self._set_state("thinking")  # as a LiveKit agent shows a function call
                record = await self.call_tool(plan[0], plan[1], destination=visitor or None, mid_answer=True)
                said = await _synthesise(record.say) if record.say else np.zeros(0, dtype=np.int16)
                await self._set_state("speaking")
                await self._play(said, turn)
                await self._play(pcm[half:], turn)
            await self._source.wait_for_playout()
        finally:
            self._spawn(self._set_state("listening"))

    async def _play(self, pcm: np.ndarray[Any, np.dtype[np.int16]], turn: Turn) -> None:
        """Send ``pcm`` (24 kHz) frame by frame, counted in ``turn.answered_seconds``; the first loud frame is noted."""
        frame_samples = OUT_RATE_HZ // 100
        loop = asyncio.get_running_loop()
        for start in range(0, pcm.size - frame_samples + 1, frame_samples):
            chunk = pcm[start:start + frame_samples]
            if not self._onset_noted and int(np.abs(chunk).max(initial=0)) >= ONSET_PEAK:
                self.report.answers_sent_at.append(loop.time())
                self._onset_noted = True
            await self._source.capture_frame(rtc.AudioFrame(chunk.tobytes(), OUT_RATE_HZ, 1, frame_samples))
            turn.answered_seconds += frame_samples / OUT_RATE_HZ


async def _synthesise(text: str) -> np.ndarray[Any, np.dtype[np.int16]]:
    """``text`` spoken by espeak-ng at the agent's rate (24 kHz int16)."""
    # espeak-ng runs as a subprocess for a few hundred ms: off the loop, so frames keep flowing meanwhile.
    audio = await asyncio.to_thread(espeak, text, "en-us", 175)
    return (np.clip(to_rate(audio, IN_RATE_HZ, OUT_RATE_HZ), -1, 1) * 32767).astype(np.int16)


class AgentPool:
    """Dispatches one ``StandInAgent`` per new room (the stand-in session API's dispatcher)."""

    def __init__(self, **agent_options: Any) -> None:
        self._options = agent_options
        self.overrides: dict[str, Any] = {}  # options for agents dispatched from now on (tests set and clear them)
        self.agents: dict[str, StandInAgent] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def dispatch(self, url: str, room: str, token: str) -> None:
        """Start an agent in ``room`` (returns at once; the agent runs in its own task)."""
        agent = StandInAgent(url, token, room, **{**self._options, **self.overrides})
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

    async def call_tool(self, room: str, tool: str, payload: str = "") -> dict[str, Any]:
        """Make ``room``'s agent call a kiosk tool now; the call as plain data (``KeyError`` for an unknown room)."""
        return asdict(await self.agents[room].call_tool(tool, payload))

    def plan_tool(self, room: str, tool: str, payload: str = "") -> None:
        """Make ``room``'s agent call a kiosk tool in the middle of its next answer."""
        self.agents[room].plan_tool(tool, payload)

    async def aclose(self) -> None:
        """Stop every agent and wait for them to leave."""
        for agent in self.agents.values():
            agent.stop()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
