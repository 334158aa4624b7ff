"""The room link on the LiveKit rtc SDK: one conversation session, from the session API to the agent.

``LiveKitRoomLink`` implements ``kiosk.ports.RoomLink`` and ``kiosk.ports.FrameSink``:

- ``open()`` asks the session API (``kiosk.link.session_api``) for a room, connects, publishes the cleaned
  microphone (``rtc.AudioSource`` 16 kHz mono with a small queue) muted until ``set_publishing(True)``,
  waits for the agent's audio track and posts ``SessionOpened`` (or ``ApiRefused`` / ``LinkLost``);
- ``push_frame()`` takes 10 ms frames from the audio engine into a small drop-oldest queue that a task
  hands to LiveKit; received agent audio (``rtc.AudioStream`` 16 kHz mono, 10 ms) goes to the
  ``PlayoutSink``;
- only the trusted agent counts (``is_trusted_agent``: participant kind AGENT and, where the session API names
  it, its identity): its audio is the only track subscribed (``auto_subscribe=False``) and played, its
  ``lk.agent.state`` attribute becomes ``AgentStateChanged``, its captions on ``lk.transcription`` are read
  (capped at ``MAX_CAPTION_CHARS``), and only it may subscribe to the kiosk's microphone (track subscription
  permissions); any other participant's tracks, attributes and streams are ignored;
- captions are personal data: only their lengths are logged and shown in ``Status``; the text is kept in
  memory only (``captions``, for the development demo's report), never logged or served;
- ``interrupt_agent()`` calls the RPC method the agent registers (``livekit.interrupt_rpc_method``,
  ``kiosk.interrupt``) and drops the agent's audio until it answered and its audio went quiet;
- manual turns: ``begin_turn()`` / ``end_turn(commit)`` call the agent's ``start_turn`` / ``end_turn`` /
  ``cancel_turn`` (the RPC methods LiveKit voice agents with ``turn_detection="manual"`` register); an agent
  without them keeps its own turn detection (said once in the log, and not asked again in that session);
- tools: with a ``ToolHandler``, the methods ``kiosk.<tool>`` (``kiosk.tools.TOOL_METHODS``) are registered in
  each room and every invocation goes to the handler with ``trusted`` from ``trusts(caller)``; a refusal goes
  back as an ``RpcError`` (code, a sentence the agent can speak, JSON data naming the error);
- SDK resume/reconnect posts ``LinkReconnecting`` then ``LinkUp`` (once the agent is in the room again); the
  session goes on, and the agent leaving during a reconnect does not end it. A reconnect that has not succeeded after
  ``livekit.reconnect_give_up_seconds``, or the SDK giving up, ends it with ``LinkLost``; so does a connect
  that fails (a server restarting refuses it), and an agent absent after a reconnect, or lost without leaving,
  that has not come back within ``livekit.reconnect_grace_seconds``, and at once an agent that left by
  itself. While the SDK reconnects the link asks the server (``kiosk.link.server_probe``): one seen down and
  then answering has restarted and lost the room, and unless room and agent are back
  ``livekit.restart_rejoin_seconds`` after it answered, that ends the session too. Those are ``transient``:
  the state machine opens a fresh session (a fresh agent) after a short wait, a few times
  (``livekit.reopen_attempts``), before it goes offline; a room the agent never joined is not
  (``transient=False``: offline at once).

rtc SDK event callbacks run on the kiosk's loop (the SDK hands its events over from its own threads), so
they only update state and start tasks. Latency stamps come from the injected clock (the loop's by default).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from livekit import rtc

from kiosk.events import (
    AgentState,
    AgentStateChanged,
    ApiRefused,
    LinkLost,
    LinkReconnecting,
    LinkUp,
    SessionClosed,
    SessionOpened,
    Tool,
)
from kiosk.link.replies import client_session, describe_error
from kiosk.link.server_probe import PROBE_INTERVAL_SECONDS, PROBE_TIMEOUT_SECONDS, ServerAnswer, probe, probe_url
from kiosk.link.session_api import SessionApi, SessionGrant, SessionRefused
from kiosk.metrics import Exchange, Metrics, Status, credit_burn_per_talk_minute, default_metrics
from kiosk.ports import EventSink, Pcm, PlayoutSink, ToolHandler
from kiosk.settings import Settings
from kiosk.tools import TOOL_METHODS, ToolRefused
from kiosk.transport import redact_url

_LOGGER = logging.getLogger(__name__)

RATE_HZ = 16000
FRAME_SAMPLES = 160
FRAME_SECONDS = FRAME_SAMPLES / RATE_HZ
STATE_ATTRIBUTE = "lk.agent.state"
TRANSCRIPTION_TOPIC = "lk.transcription"
# After an interrupt the agent's audio is dropped until the agent answered the interrupt RPC (or the call failed)
# and its audio has then been quiet this long. Before that it is the answer being cut short: still sent by an
# agent the RPC had not reached yet, or sent before and still on its way through the receive path (on a busy
# machine 0.5 s of it reached the playout 0.33-0.82 s after a press whose RPC the agent had answered in 20 ms).
# A new answer comes only after the visitor's new turn, so it is never this close behind the old one.
INTERRUPT_QUIET_SECONDS = 0.5
INTERRUPT_RPC_TIMEOUT_SECONDS = 2.0
# The receive stream yields concealment silence every 10 ms while the agent sends nothing; after this long
# without a non-silent frame such silence is not forwarded (it would keep the playout buffer "playing").
SILENCE_FORWARD_SECONDS = 0.5
# After the mute, how long frames captured before it may still be waited for (a busy capture path is late).
DRAIN_SECONDS = 1.5
DRAIN_QUIET_SECONDS = 0.1  # no such frame for this long: the engine has delivered them all
LATENCY_SAMPLES_KEPT = 20000
# Decoded "silence" is not all zeros (codec noise of +-1 LSB): frames whose peak stays at or below this count
# as silent (about -66 dBFS).
SILENCE_PEAK = 16
# Longest caption read from one text stream (characters); the rest of a longer stream is not read.
MAX_CAPTION_CHARS = 4096
# Caption segments remembered per exchange (their lengths, for Status); the oldest is forgotten first.
MAX_SEGMENTS = 64
CAPTIONS_KEPT = 100
# The RPC methods a LiveKit voice agent with manual turn detection registers (push-to-talk).
START_TURN_METHOD = "start_turn"
END_TURN_METHOD = "end_turn"
CANCEL_TURN_METHOD = "cancel_turn"


class _Participant(Protocol):
    @property
    def identity(self) -> str: ...

    @property
    def kind(self) -> int: ...


def is_trusted_agent(participant: _Participant, agent_identity: str | None) -> bool:
    """Whether ``participant`` is the session's agent: kind AGENT, and the identity the API named (if it did).

    Only a token the backend mints can make a participant of kind AGENT; anyone else who obtains a room token
    (kind STANDARD) is not trusted, whatever attributes they set. Event handlers and RPC handlers both
    decide with this (``LiveKitRoomLink.trusts(identity)``).
    """
    if participant.kind != rtc.ParticipantKind.PARTICIPANT_KIND_AGENT:
        return False
    return agent_identity is None or participant.identity == agent_identity


@dataclass(frozen=True)
class Caption:
    """One caption line as received."""

    at_seconds: float
    speaker: str  # "visitor" or "agent"
    text: str
    segment_id: str
    final: bool


class LiveKitRoomLink:
    """A conversation session over LiveKit (``RoomLink`` + ``FrameSink``)."""

    def __init__(
        self,
        settings: Settings,
        events: EventSink,
        playout: PlayoutSink,
        *,
        session_api: SessionApi | None = None,
        metrics: Metrics | None = None,
        status: Status | None = None,
        clock: Callable[[], float] | None = None,
        tools: ToolHandler | None = None,
    ) -> None:
        self._settings = settings
        self._tools = tools
        # Manual turns: None until the session's agent answered a turn RPC; False once it said it has none.
        self._agent_takes_turns: bool | None = None
        self._said_no_manual_turns = False
        self._lk = settings.livekit
        self._post = events
        self._playout = playout
        self._api = session_api or SessionApi.from_settings(settings)
        self.metrics = metrics or default_metrics()
        self.status = status or Status()
        self._clock = clock
        self._publishing = False
        self._stopped_at: float | None = None  # when the microphone was muted (frames captured before still go)
        self._pushed_at = 0.0  # when the last frame was taken
        self._queue: deque[tuple[Pcm, float]] = deque(maxlen=self._lk.send_queue_frames)
        self._wake = asyncio.Event()
        self._room: rtc.Room | None = None
        self._grant: SessionGrant | None = None
        self._source: rtc.AudioSource | None = None
        self._track: rtc.LocalAudioTrack | None = None
        self._mic_sid = ""
        self._agent_identity: str | None = None
        self._agent_audio = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._receiver: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._closing = False
        self._reconnecting = False
        self._awaiting_agent = False  # reconnected, the agent not back yet: no LinkUp until it is
        self._give_up: asyncio.TimerHandle | None = None
        self._agent_gone: asyncio.TimerHandle | None = None
        self._restart_watch: asyncio.Task[None] | None = None
        self._opened_at = 0.0
        self._visitor_stopped_at: float | None = None
        # The answer being cut short (interrupt_agent): dropping; when the agent answered (None: not yet); its last
        # voiced frame since.
        self._cutting = False
        self._cut_replied_at: float | None = None
        self._cut_voiced_at = 0.0
        self._last_voiced_at = -1e9
        self._press_at: float | None = None
        self._session_streamed_s = 0.0
        self._session_agent_s = 0.0
        self._segments: dict[str, int] = {}  # characters of the visitor segments of the current exchange
        self._agent_segments: dict[str, int] = {}  # characters of the agent segments of the current exchange
        # Figures for benchmarks and the session report (bounded).
        self.capture_latencies_s: deque[float] = deque(maxlen=LATENCY_SAMPLES_KEPT)
        self.playout_latencies_s: deque[float] = deque(maxlen=LATENCY_SAMPLES_KEPT)
        self.press_to_live_s: list[float] = []
        self.connect_seconds: float | None = None
        # Caption text, in memory only (the development demo's report); never logged, never in Status.
        self.captions: deque[Caption] = deque(maxlen=CAPTIONS_KEPT)
        self.timeline: list[tuple[float, str]] = []

    # ------------------------------------------------------------------ helpers
    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _mark(self, what: str) -> None:
        self.timeline.append((self._now(), what))

    @property
    def connected(self) -> bool:
        """A session is open (connected, or reconnecting)."""
        return self._room is not None

    @property
    def session_id(self) -> str:
        """The open session's id ('' when none)."""
        return self._grant.session_id if self._grant is not None and self._room is not None else ""

    @property
    def server_url(self) -> str | None:
        """The LiveKit server of the latest session the API granted (kept after it ended; None before one)."""
        return self._grant.livekit_url if self._grant is not None else None

    @property
    def room(self) -> rtc.Room | None:
        """The rtc room (tests use it for ``simulate_scenario``)."""
        return self._room

    def trusts(self, identity: str) -> bool:
        """Whether the remote participant ``identity`` is the open session's trusted agent.

        For handlers that only get an identity (RPC invocations, text streams): refuse or ignore the rest.
        """
        room, grant = self._room, self._grant
        if room is None or grant is None:
            return False
        participant = room.remote_participants.get(identity)
        return participant is not None and is_trusted_agent(participant, grant.agent_identity)

    def _trusted(self, participant: rtc.Participant) -> bool:
        grant = self._grant
        return (isinstance(participant, rtc.RemoteParticipant) and grant is not None
                and is_trusted_agent(participant, grant.agent_identity))

    # ------------------------------------------------------------------ RoomLink
    async def open(self) -> None:
        """Get a session and connect; posts SessionOpened, ApiRefused or LinkLost (never raises for those)."""
        if self._room is not None:
            return
        started = self._now()
        self._closing = False
        self._agent_audio.clear()
        self._mark("session requested")
        try:
            grant = await self._api.open_session()
        except SessionRefused as error:
            _LOGGER.warning("session refused (%s): %s", error.reason.value, error.message)
            self.metrics.api_refusals.labels(reason=error.reason.value).inc()
            self.status.last_refusal = error.reason.value
            self._mark(f"api refused: {error.reason.value}")
            self._post(ApiRefused(error.reason, error.message))
            return
        self._grant = grant
        self._mark("session granted")
        room = rtc.Room()
        self._wire(room)
        self._room = room
        try:
            # Nothing is subscribed by itself: only the trusted agent's audio is (see _adopt).
            await room.connect(grant.livekit_url, grant.token.get_secret_value(),
                               rtc.RoomOptions(auto_subscribe=False))
        except rtc.ConnectError as error:
            self._room = None
            self.metrics.links_lost.inc()
            self._mark("connect failed")
            # The SDK's message may carry the connect URL with the room token in its query: redacted.
            self._post(LinkLost(f"cannot connect to {redact_url(grant.livekit_url)}: {describe_error(error)}"))
            return
        self._mark("connected")
        self._agent_takes_turns = None
        if self._tools is not None:
            self._register_tools(room)
        try:
            # Before the microphone is published: nobody but the agent may subscribe to it.
            self._restrict_subscribers(room)
        except Exception as error:  # the SDK raises plain exceptions; without the restriction nothing is published
            await self._teardown()
            self.metrics.links_lost.inc()
            self._post(LinkLost(f"cannot restrict who may hear the microphone in {grant.session_id}: "
                                f"{describe_error(error)}"))
            return
        for participant in list(room.remote_participants.values()):
            self._adopt(participant)
        self._source = rtc.AudioSource(RATE_HZ, 1, queue_size_ms=self._lk.publish_queue_ms)
        self._track = rtc.LocalAudioTrack.create_audio_track("kiosk-mic", self._source)
        if not self._publishing:
            self._track.mute()
        try:
            publication = await room.local_participant.publish_track(
                self._track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
        except Exception as error:  # the SDK raises its own plain exception types when publishing fails
            await self._teardown()
            self.metrics.links_lost.inc()
            self._post(LinkLost(f"cannot publish the microphone in {grant.session_id}: {describe_error(error)}"))
            return
        self._mic_sid = publication.sid
        self._sender = self._spawn(self._send_loop(self._source))
        try:
            await asyncio.wait_for(self._agent_audio.wait(), self._lk.agent_wait_seconds)
        except TimeoutError:
            await self._teardown()
            self.metrics.links_lost.inc()
            self._mark("agent missing")
            # Not transient: a fresh session would keep the visitor waiting as long again for an agent.
            self._post(LinkLost(f"no agent joined room {grant.session_id} within {self._lk.agent_wait_seconds} s; "
                                "check the agent deployment", transient=False))
            return
        if self._room is not room:  # lost while waiting; already reported
            return
        self._opened_at = self._now()
        self.connect_seconds = self._opened_at - started
        self.metrics.connect_seconds.observe(self.connect_seconds)
        self.metrics.sessions.inc()
        self.status.session_id = grant.session_id
        self.status.connected = True
        self._session_streamed_s = self._session_agent_s = 0.0
        self._mark("session opened")
        _LOGGER.info("session %s open in %.0f ms", grant.session_id, self.connect_seconds * 1000)
        self._post(SessionOpened(grant.session_id))

    async def close(self) -> None:
        """Leave the room; posts SessionClosed."""
        if self._room is None:
            return
        await self._teardown()
        self._post(SessionClosed("closed"))

    async def aclose(self) -> None:
        """Close any session and the HTTP client."""
        await self.close()
        await self._api.aclose()

    async def interrupt_agent(self) -> None:
        """Barge-in: ask the agent to stop (its ``kiosk.interrupt`` RPC) and drop its audio until it has.

        What counts as the answer being cut short: INTERRUPT_QUIET_SECONDS. A fixed 300 ms from the press let the
        rest of it play (`tests/e2e/test_link_conversation.py::test_the_answer_stays_cut_while_the_agent_stops_late`).
        """
        self._cutting, self._cut_replied_at, self._cut_voiced_at = True, None, self._now()
        self._playout.clear()
        room, agent = self._room, self._agent_identity
        self._mark("interrupt")
        try:
            if room is None or agent is None:
                return
            reply = await room.local_participant.perform_rpc(
                destination_identity=agent, method=self._lk.interrupt_rpc_method, payload="",
                response_timeout=INTERRUPT_RPC_TIMEOUT_SECONDS)
            _LOGGER.info("agent interrupted: %s", reply)
        except rtc.RpcError as error:
            _LOGGER.warning("interrupt RPC %s failed (%s): the agent may not register it",
                            self._lk.interrupt_rpc_method, error.message)
        finally:
            self._cut_replied_at = self._now()

    async def begin_turn(self) -> None:
        """Manual turns: the visitor's turn starts (``start_turn``); an agent without it keeps its own detection."""
        await self._turn_rpc(START_TURN_METHOD)

    async def end_turn(self, commit: bool) -> None:
        """Manual turns: the turn ends and is answered (``end_turn``), or dropped without speech (``cancel_turn``).

        Sent after the visitor's last frames have gone to LiveKit, so the agent answers all that was said.
        """
        await self._sent()
        await self._turn_rpc(END_TURN_METHOD if commit else CANCEL_TURN_METHOD)

    async def _turn_rpc(self, method: str) -> None:
        room, agent = self._room, self._agent_identity
        if room is None or agent is None or not self.trusts(agent) or self._agent_takes_turns is False:
            # No session, no trusted agent, or an agent that detects turns itself: nothing to tell.
            return
        self._mark(method)
        try:
            await room.local_participant.perform_rpc(
                destination_identity=agent, method=method, payload="",
                response_timeout=self._lk.turn_rpc_timeout_seconds,
                max_round_trip_latency=self._lk.turn_rpc_timeout_seconds)
        except rtc.RpcError as error:
            if error.code == rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD:
                # Harmless: the agent ends turns by its own voice detection. Not asked again this session.
                self._agent_takes_turns = False
                self.metrics.turn_rpcs.labels(method=method, outcome="unsupported").inc()
                level = logging.DEBUG if self._said_no_manual_turns else logging.WARNING
                self._said_no_manual_turns = True
                _LOGGER.log(level, "the agent has no %s RPC method: it detects the end of the visitor's turn itself "
                            "(livekit.turns = \"agent\" says so without asking)", method)
                return
            self.metrics.turn_rpcs.labels(method=method, outcome="failed").inc()
            _LOGGER.warning("turn RPC %s failed (%s %s); the agent may end the turn by itself", method, error.code,
                            describe_error(error))
            return
        self._agent_takes_turns = True
        self.metrics.turn_rpcs.labels(method=method, outcome="ok").inc()

    # ------------------------------------------------------------------ tools
    def _register_tools(self, room: rtc.Room) -> None:
        """Answer the tools' RPC methods in this room (the allowlist of methods: ``TOOL_METHODS``)."""
        for method, tool in TOOL_METHODS.items():
            room.local_participant.register_rpc_method(method, functools.partial(self._on_tool_call, tool))

    async def _on_tool_call(self, tool: Tool, data: rtc.RpcInvocationData) -> str:
        assert self._tools is not None
        try:
            return await self._tools.call(tool, data.payload, trusted=self.trusts(data.caller_identity),
                                          session_id=self.session_id, response_timeout_seconds=data.response_timeout)
        except ToolRefused as refused:
            raise rtc.RpcError(refused.rpc_code, refused.say, refused.data()) from None

    def set_publishing(self, on: bool) -> None:
        """Unmute or mute the published microphone track.

        Muting keeps what was captured before it: frames stamped earlier (a busy capture path delivers them late)
        are still taken and sent, and the track is muted once they have gone (``end_turn`` waits for that). Later
        frames are dropped, so stale audio cannot open the next turn.
        """
        self._publishing = on
        self._stopped_at = None if on else self._now()
        if on:
            self._press_at = self._now()
            if self._track is not None:
                self._track.unmute()
        else:
            self._spawn(self._mute_when_sent())
        self._mark("publishing on" if on else "publishing off")

    async def _mute_when_sent(self) -> None:
        await self._sent()
        if not self._publishing and self._track is not None:
            self._track.mute()

    async def _sent(self) -> None:
        """Wait (at most ``DRAIN_SECONDS``) until the frames queued before the mute have gone to LiveKit."""
        deadline = self._now() + DRAIN_SECONDS
        while (self._queue or self._now() - self._pushed_at < DRAIN_QUIET_SECONDS) and self._now() < deadline:  # noqa: ASYNC110 - polls the send queue and a time stamp
            await asyncio.sleep(0.01)
        if not self._publishing:
            self._queue.clear()

    def note_visitor_stopped(self, at_seconds: float | None = None) -> None:
        """The visitor stopped speaking (VoiceStopped): start the time-to-first-agent-audio measurement."""
        self._visitor_stopped_at = at_seconds if at_seconds is not None else self._now()

    # ------------------------------------------------------------------ FrameSink
    def push_frame(self, pcm: Pcm, captured_at: float | None = None) -> None:
        """Take one 10 ms frame (``captured_at``: the capture time on the same clock, if the engine knows it)."""
        before_mute = self._stopped_at is not None and captured_at is not None and captured_at < self._stopped_at
        if (not self._publishing and not before_mute) or self._source is None:
            # Muted or no session: nothing may be streamed (streamed audio is billed), so the frame is dropped.
            return
        if len(self._queue) == self._queue.maxlen:
            # Drop-oldest: LiveKit is behind; fresh audio matters more than old audio.
            self.metrics.mic_frames_dropped.inc()
        self._pushed_at = self._now()
        self._queue.append((pcm, captured_at if captured_at is not None else self._pushed_at))
        self._wake.set()

    async def _send_loop(self, source: rtc.AudioSource) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                pcm, stamped = self._queue.popleft()
                frame = rtc.AudioFrame(pcm.tobytes(), RATE_HZ, 1, pcm.size)
                try:
                    await source.capture_frame(frame)
                except Exception as error:  # the SDK raises a bare Exception when the source is gone
                    _LOGGER.debug("capture_frame failed (%s); frame dropped", error)
                    continue
                now = self._now()
                latency = now - stamped
                self.capture_latencies_s.append(latency)
                self.metrics.capture_path_seconds.observe(latency)
                seconds = pcm.size / RATE_HZ
                self.metrics.streamed_audio_seconds.inc(seconds)
                self._session_streamed_s += seconds
                if self._press_at is not None:
                    self.press_to_live_s.append(now - self._press_at)
                    self._press_at = None

    # ------------------------------------------------------------------ receive
    async def _receive_loop(self, track: rtc.Track) -> None:
        stream = rtc.AudioStream(track, sample_rate=RATE_HZ, num_channels=1, frame_size_ms=10,
                                 capacity=self._lk.receive_capacity_frames)
        try:
            async for event in stream:
                received = self._now()
                pcm = np.frombuffer(event.frame.data, dtype=np.int16).copy()
                voiced = int(np.abs(pcm).max(initial=0)) > SILENCE_PEAK
                if self._cutting and self._still_cut(received, voiced):
                    continue
                if voiced:
                    self._last_voiced_at = received
                    if self._visitor_stopped_at is not None:
                        self.metrics.first_agent_audio_seconds.observe(received - self._visitor_stopped_at)
                        self._mark("first agent audio")
                        self._visitor_stopped_at = None
                elif received - self._last_voiced_at > SILENCE_FORWARD_SECONDS:
                    continue  # concealment silence while the agent sends nothing: not forwarded
                await self._playout.write(pcm)
                latency = self._now() - received
                self.playout_latencies_s.append(latency)
                self.metrics.playout_path_seconds.observe(latency)
                self.metrics.agent_audio_seconds.inc(FRAME_SECONDS)
                self._session_agent_s += pcm.size / RATE_HZ
        finally:
            await stream.aclose()

    def _still_cut(self, received: float, voiced: bool) -> bool:
        """After an interrupt: whether a frame received now is still the answer cut short (INTERRUPT_QUIET_SECONDS)."""
        replied = self._cut_replied_at
        if replied is not None and received - max(replied, self._cut_voiced_at) >= INTERRUPT_QUIET_SECONDS:
            self._cutting = False
            return False
        if voiced:
            self._cut_voiced_at = received
        return True

    # ------------------------------------------------------------------ room events
    def _restrict_subscribers(self, room: rtc.Room) -> None:
        """Allow only the trusted agent (named, or present) to subscribe to the kiosk's tracks."""
        allowed = {p.identity for p in room.remote_participants.values() if self._trusted(p)}
        if self._grant is not None and self._grant.agent_identity is not None:
            allowed.add(self._grant.agent_identity)
        room.local_participant.set_track_subscription_permissions(
            allow_all_participants=False,
            participant_permissions=[rtc.ParticipantTrackPermission(participant_identity=identity, allow_all=True)
                                     for identity in sorted(allowed)])

    def _adopt(self, participant: rtc.RemoteParticipant) -> None:
        """A trusted agent is present: remember it, let it hear the microphone, subscribe to its audio."""
        if not self._trusted(participant):
            return
        room = self._room
        known = participant.identity == self._agent_identity
        self._agent_identity = participant.identity
        if self._agent_gone is not None:
            self._agent_gone.cancel()
            self._agent_gone = None
        if self._awaiting_agent:
            self._awaiting_agent = False
            self.status.reconnecting = False
            self._post(LinkUp())
        if room is not None and not known and (self._grant is None or self._grant.agent_identity is None):
            try:
                self._restrict_subscribers(room)
            except Exception as error:  # the SDK raises plain exceptions; the agent then cannot hear the visitor
                _LOGGER.warning("cannot let the agent subscribe to the microphone: %s", error)
        for publication in participant.track_publications.values():
            self._subscribe(publication, participant)

    def _subscribe(self, publication: rtc.RemoteTrackPublication, participant: rtc.RemoteParticipant) -> None:
        if publication.kind == rtc.TrackKind.KIND_AUDIO and not publication.subscribed and self._trusted(participant):
            publication.set_subscribed(True)

    def _agent_state(self, value: str) -> None:
        try:
            state = AgentState(value)
        except ValueError:
            _LOGGER.warning("unknown %s value %r ignored", STATE_ATTRIBUTE, value[:40])
            return
        self.status.agent_state = state.value
        self._mark(f"agent {state.value}")
        self._post(AgentStateChanged(state))

    def _wire(self, room: rtc.Room) -> None:
        # These callbacks run on the loop and are plain functions (the SDK's rule): they start tasks only.
        @room.on("track_published")
        def _published(pub: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant) -> None:
            self._subscribe(pub, who)

        @room.on("track_subscribed")
        def _subscribed(track: rtc.Track, pub: rtc.RemoteTrackPublication, who: rtc.RemoteParticipant) -> None:
            if track.kind != rtc.TrackKind.KIND_AUDIO or not self._trusted(who):
                # Never asked for (auto_subscribe is off); whatever it is, it is not played.
                pub.set_subscribed(False)
                return
            self._agent_identity = who.identity
            if self._receiver is not None:
                self._receiver.cancel()
            self._receiver = self._spawn(self._receive_loop(track))
            self._agent_audio.set()

        @room.on("participant_connected")
        def _joined(who: rtc.RemoteParticipant) -> None:
            self._adopt(who)

        @room.on("participant_disconnected")
        def _left(who: rtc.RemoteParticipant) -> None:
            if who.identity != self._agent_identity or self._closing:
                return
            if self._reconnecting:
                # A full reconnect removes and re-adds every participant: not the end of the session.
                return
            if who.disconnect_reason == rtc.DisconnectReason.CLIENT_INITIATED:
                # It left by itself (its job ended or failed; an agent ends a conversation with the kiosk's
                # end_conversation tool, not by leaving): it will not come back, so no wait for it.
                self._spawn(self._lost("the agent left the room"))
                return
            self._start_agent_grace()

        @room.on("participant_attributes_changed")
        def _attributes(changed: dict[str, str], who: rtc.Participant) -> None:
            if STATE_ATTRIBUTE in changed and self._trusted(who):
                self._agent_state(changed[STATE_ATTRIBUTE])

        @room.on("reconnecting")
        def _reconnecting() -> None:
            self._reconnecting = True
            self.status.reconnecting = True
            self.metrics.reconnects.inc()
            self._mark("reconnecting")
            loop = asyncio.get_running_loop()
            if self._give_up is None:
                self._give_up = loop.call_later(self._lk.reconnect_give_up_seconds, self._on_give_up)
            if self._restart_watch is None or self._restart_watch.done():
                self._restart_watch = self._spawn(self._watch_for_restart(room))
            self._post(LinkReconnecting())

        @room.on("reconnected")
        def _reconnected() -> None:
            self._reconnecting = False  # the status stays "reconnecting" until the agent is back (_adopt)
            if self._give_up is not None:
                self._give_up.cancel()
                self._give_up = None
            self._mark("reconnected")
            try:
                # A full reconnect is a new participant session for the server: restrict its subscribers again.
                self._restrict_subscribers(room)
            except Exception as error:  # the SDK raises plain exceptions
                self._spawn(self._lost(f"cannot restrict who may hear the microphone after a reconnect: "
                                      f"{describe_error(error)}"))
                return
            # The session is up again once the agent is in the room (LinkUp from _adopt), perhaps at once; until
            # then nothing says it is up (the status, the field bench's "usable"), and it is lost if the agent has
            # not come back when the grace ends.
            self._awaiting_agent = True
            for participant in list(room.remote_participants.values()):
                self._adopt(participant)
            if self._awaiting_agent:
                self._start_agent_grace()

        @room.on("disconnected")
        def _disconnected(reason: Any) -> None:
            if self._closing or self._room is not room:
                return
            self._spawn(self._lost(f"disconnected by the SDK (reason {reason})"))

        room.register_text_stream_handler(TRANSCRIPTION_TOPIC, self._on_caption)

    async def _watch_for_restart(self, room: rtc.Room) -> None:
        """While the SDK reconnects (and then waits for the agent), ask the server whether it restarted.

        Seen down and then answering, it restarted and lost the room: if the room and its agent are not back
        ``livekit.restart_rejoin_seconds`` after it answered, the room counts as lost (transient) and a fresh
        session opens, instead of waiting out the SDK's reconnect backoff and then ``reconnect_grace_seconds``.
        """
        grant = self._grant
        if grant is None:
            return
        url = probe_url(grant.livekit_url)
        seen_down = False
        back_at: float | None = None
        async with client_session(PROBE_TIMEOUT_SECONDS) as http:
            while self._room is room and (self._reconnecting or self._awaiting_agent):
                answer = await probe(http, url)
                if self._room is not room or not (self._reconnecting or self._awaiting_agent):
                    return
                if answer is ServerAnswer.DOWN:
                    if not seen_down:
                        self._mark("server down")
                    seen_down, back_at = True, None
                elif answer is ServerAnswer.UP and seen_down:
                    if back_at is None:
                        back_at = self._now()
                        self._mark("server back")
                    if self._now() - back_at >= self._lk.restart_rejoin_seconds:
                        self.metrics.server_restarts.inc()
                        await self._lost(f"the LiveKit server restarted and the room was not back "
                                         f"{self._lk.restart_rejoin_seconds:g} s after it answered")
                        return
                await asyncio.sleep(PROBE_INTERVAL_SECONDS)

    def _start_agent_grace(self) -> None:
        if self._agent_gone is None:
            self._agent_gone = asyncio.get_running_loop().call_later(self._lk.reconnect_grace_seconds,
                                                                     self._on_agent_gone)

    def _on_agent_gone(self) -> None:
        self._agent_gone = None
        if self._room is None or any(self._trusted(p) for p in self._room.remote_participants.values()):
            return
        # Lost, not gone on purpose: a restarted server lost the room and the agent's job with it, or the agent
        # crashed. A fresh session brings a fresh agent (transient: the state machine reopens while a visitor
        # is there), where ending the session would leave the visitor to start over after a long silence.
        self._spawn(self._lost(f"the agent did not come back within {self._lk.reconnect_grace_seconds} s"))

    def _on_give_up(self) -> None:
        self._give_up = None
        if self._reconnecting:
            self._spawn(self._lost(f"reconnect did not succeed within {self._lk.reconnect_give_up_seconds} s"))

    async def _lost(self, reason: str) -> None:
        if self._room is None:
            return
        _LOGGER.warning("link lost: %s", reason)
        self._mark("link lost")
        await self._teardown()
        self.metrics.links_lost.inc()
        self._post(LinkLost(reason))

    def _on_caption(self, reader: rtc.TextStreamReader, participant_identity: str) -> None:
        if not self.trusts(participant_identity):
            # Anyone in the room can send on the topic: only the agent's captions are read.
            reader.close()
            _LOGGER.debug("caption stream from a participant that is not the agent ignored")
            return
        self._spawn(self._read_caption(reader))

    async def _read_caption(self, reader: rtc.TextStreamReader) -> None:
        parts: list[str] = []
        size = 0
        try:
            async for chunk in reader:
                parts.append(chunk[: MAX_CAPTION_CHARS - size])
                size += len(parts[-1])
                if size >= MAX_CAPTION_CHARS:
                    reader.close()  # the rest is not read: a caption is a line, not a document
                    break
        except rtc.StreamError as error:
            _LOGGER.debug("caption stream ended early: %s", error)
            return
        text = "".join(parts).strip()
        attributes = reader.info.attributes or {}
        segment = attributes.get("lk.segment_id", reader.info.stream_id)[:128]
        speaker = "visitor" if attributes.get("lk.transcribed_track_id") == self._mic_sid else "agent"
        final = attributes.get("lk.transcription_final", "true") == "true"
        self.captions.append(Caption(self._now(), speaker, text, segment, final))
        # Personal data: the words stay out of the journal and /status; their length is enough to follow along.
        _LOGGER.debug("caption from the %s: %d characters", speaker, len(text))
        if speaker == "visitor":
            if segment not in self._segments:
                # A new visitor segment starts a new exchange (the visitor's stream repeats the full text).
                self._segments.clear()
                self._agent_segments.clear()
                self.status.last_exchange = Exchange()
            _remember(self._segments, segment, len(text))
            self.status.last_exchange.visitor_chars = len(text)
        else:
            _remember(self._agent_segments, segment, len(text))
            self.status.last_exchange.agent_chars = sum(
                n for s, n in self._agent_segments.items() if s not in self._segments)

    # ------------------------------------------------------------------ teardown
    async def _teardown(self) -> None:
        room, self._room = self._room, None
        self._closing = True
        for handle in (self._give_up, self._agent_gone):
            if handle is not None:
                handle.cancel()
        self._give_up = self._agent_gone = None
        self._reconnecting = self._awaiting_agent = False
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        self._receiver = self._sender = self._restart_watch = None
        self._queue.clear()
        if self._opened_at:
            duration = self._now() - self._opened_at
            self.metrics.session_duration_seconds.observe(duration)
            self.metrics.session_seconds.inc(duration)
            self.metrics.credit_burn_per_talk_minute.set(credit_burn_per_talk_minute(
                self._session_streamed_s, self._session_agent_s, duration, self._settings.metrics))
            self._opened_at = 0.0
        if room is not None:
            with contextlib.suppress(Exception):  # leaving a room that is already gone is fine
                await room.disconnect()
        if self._source is not None:
            await self._source.aclose()
        self._source = self._track = None
        self._agent_identity = None
        self.status.connected = False
        self.status.reconnecting = False
        self.status.session_id = ""
        self.status.agent_state = ""
        self._mark("session ended")


def _remember(segments: dict[str, int], segment: str, chars: int) -> None:
    """Keep a segment's length; the oldest segment goes once ``MAX_SEGMENTS`` are kept."""
    segments.pop(segment, None)
    segments[segment] = chars
    while len(segments) > MAX_SEGMENTS:
        segments.pop(next(iter(segments)))
