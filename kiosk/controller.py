"""The controller: the only place where effects become I/O.

It consumes events from the bus (control events first), applies ``state.step``, logs each phase change,
keeps a timeline of (time, phase) for the session report and carries out the effects through the
ports. Slow effects (opening a session, playing a cue, storing a message) run in serial lanes so the
loop keeps consuming events meanwhile: a cancel press works while a session is still opening.
Timers run on the injected clock and come back as ``TimerExpired`` events; a timer that was cancelled
or restarted after it fired is recognised by its generation and never reaches ``step``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kiosk.bus import EventBus
from kiosk.effects import (
    BeginTurn,
    CancelTimer,
    ClearPlayback,
    CloseSession,
    Cue,
    Effect,
    EndTurn,
    InterruptAgent,
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
    status_cues,
)
from kiosk.errors import KioskError
from kiosk.events import (
    CueFinished,
    ErrorOccurred,
    Event,
    RecordingFailed,
    RecordingStored,
    Route,
    TimerExpired,
)
from kiosk.personal import PersonalText
from kiosk.ports import AudioControl, Cancellable, Clock, MessageStore, Panel, Recording, RoomLink
from kiosk.state import KioskState, Phase, Policy, Transition, initial_state, pattern_key, step

_LOGGER = logging.getLogger(__name__)
# The longest the end of a turn waits for the frames captured before the release (the engine bounds it too).
_DRAIN_WAIT_SECONDS = 2.0

Listener = Callable[[KioskState, Event, Transition], None]


@dataclass(frozen=True, slots=True)
class _TimerFired(Event):
    """Internal: a controller timer ran out (checked against the current generation before use)."""

    name: Timer
    generation: int


@dataclass(frozen=True, slots=True)
class _Tick(Event):
    """Internal: the heartbeat; consuming it proves the controller loop is alive."""


_TICK = _Tick()


class _Lane:
    """Runs async operations one after another, in submission order, off the event-consuming path."""

    def __init__(self, name: str, on_error: Callable[[KioskError], None]) -> None:
        self.name = name
        self._ops: deque[tuple[str, Callable[[], Awaitable[None]]]] = deque()
        self._wake = asyncio.Event()
        self._on_error = on_error
        self._current: asyncio.Task[None] | None = None
        self._current_kind = ""

    def submit(self, kind: str, op: Callable[[], Awaitable[None]]) -> None:
        self._ops.append((kind, op))
        self._wake.set()

    def cancel(self, kind: str) -> None:
        """Drop queued operations of ``kind`` and cancel a running one."""
        self._ops = deque(item for item in self._ops if item[0] != kind)
        if self._current is not None and self._current_kind == kind:
            self._current.cancel()

    @property
    def idle(self) -> bool:
        return not self._ops and self._current is None

    async def run(self) -> None:
        while True:
            while not self._ops:
                self._wake.clear()
                await self._wake.wait()
            self._current_kind, op = self._ops.popleft()
            task: asyncio.Task[None] = asyncio.ensure_future(op())
            self._current = task
            await asyncio.wait({task})
            self._current = None
            if task.cancelled():
                continue
            error = task.exception()
            if isinstance(error, KioskError):
                self._on_error(error)
            elif error is not None:
                raise error  # a programming error: let it end the process (systemd restarts it)


class Controller:
    """Consumes events, steps the state machine and carries out its effects."""

    def __init__(
        self,
        *,
        policy: Policy,
        audio: AudioControl,
        link: RoomLink,
        clock: Clock,
        panel: Panel | None = None,
        store: MessageStore | None = None,
        bus: EventBus | None = None,
        route: Route = Route.ARRAY,
        echo_path_verified: bool = False,
        heartbeat_seconds: float = 1.0,
        timeline_limit: int = 10000,
    ) -> None:
        self._audio = audio
        self._link = link
        self._clock = clock
        self._panel = panel
        self._store = store
        self.bus = bus if bus is not None else EventBus()  # an empty bus is falsy (__len__)
        self._heartbeat_seconds = heartbeat_seconds
        self._state = initial_state(policy, route=route, echo_path_verified=echo_path_verified)
        self._alive_seconds = clock.now()
        # (time, phase) at start and at every phase change; bounded so a kiosk running for months
        # keeps only the recent history.
        self.timeline: deque[tuple[float, str]] = deque([(clock.now(), self._state.phase.value)],
                                                        maxlen=timeline_limit)
        # Every effect carried out, most recent last (for the session report and tests).
        self.executed: deque[tuple[float, Effect]] = deque(maxlen=timeline_limit)
        self._timers: dict[Timer, tuple[int, Cancellable]] = {}
        self._generation = 0
        self._listeners: list[Listener] = []
        self._link_lane = _Lane("link", self._lane_error)
        # Turn RPCs have their own lane: in order among themselves, never holding up a close or an interrupt.
        self._turn_lane = _Lane("turn", self._lane_error)
        self._cue_lane = _Lane("cue", self._lane_error)
        self._store_lane = _Lane("store", self._lane_error)
        self._busy = False
        self._heartbeat: Cancellable | None = None
        self._tick_pending = False
        self._task: asyncio.Task[None] | None = None
        if panel is not None:
            panel.show(pattern_key(self._state))

    # ------------------------------------------------------------------------------------ observing
    @property
    def state(self) -> KioskState:
        """The current state."""
        return self._state

    @property
    def phase(self) -> Phase:
        """The current phase."""
        return self._state.phase

    @property
    def alive_seconds(self) -> float:
        """Clock time at which the consumer last ran (an event or a heartbeat); the watchdog compares it."""
        return self._alive_seconds

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(old_state, event, transition)`` after every step (metrics, session report)."""
        self._listeners.append(listener)

    def report(self) -> dict[str, Any]:
        """The timeline and counters as plain data, times relative to the first entry."""
        start = self.timeline[0][0] if self.timeline else 0.0
        return {
            "timeline": [{"t_seconds": round(t - start, 3), "state": phase} for t, phase in self.timeline],
            "state": self._state.phase.value,
            "route": self._state.route.value,
            "online": self._state.online,
            "last_error": self._state.last_error,
            "events_dropped": self.bus.dropped,
        }

    # ------------------------------------------------------------------------------------ producing
    def post(self, event: Event) -> None:
        """Queue an event (loop thread); the ``EventSink`` adapters are given."""
        self.bus.post(event)

    def post_threadsafe(self, event: Event) -> None:
        """Queue an event from another thread (hands over to the loop, never blocks)."""
        self.bus.post_threadsafe(event)

    # ------------------------------------------------------------------------------------ running
    def start(self) -> asyncio.Task[None]:
        """Run the controller as a task on the running loop."""
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="kiosk-controller")
        return self._task

    async def run(self) -> None:
        """Consume events until cancelled; a programming error in a lane or a step ends it."""
        self.bus.bind(asyncio.get_running_loop())
        self._arm_heartbeat()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._link_lane.run())
            group.create_task(self._turn_lane.run())
            group.create_task(self._cue_lane.run())
            group.create_task(self._store_lane.run())
            group.create_task(self._consume())

    async def _consume(self) -> None:
        while True:
            event = await self.bus.get()
            self._busy = True
            try:
                self.handle(event)
            finally:
                self._busy = False

    async def settle(self, timeout_seconds: float = 5.0) -> None:
        """Wait until the bus is empty and every lane idle (tests; real-time bound ``timeout_seconds``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        quiet = 0
        while quiet < 3:
            await asyncio.sleep(0)
            if self._quiet():
                quiet += 1
            else:
                quiet = 0
                if loop.time() > deadline:
                    raise TimeoutError("the controller did not settle: an effect is still running")
                await asyncio.sleep(0.001)
        if self._task is not None and self._task.done():
            self._task.result()  # surface a crash of the controller in the test that caused it

    def _quiet(self) -> bool:
        return (len(self.bus) == 0 and not self._busy and self._link_lane.idle and self._turn_lane.idle
                and self._cue_lane.idle and self._store_lane.idle)

    async def aclose(self) -> None:
        """Stop consuming, cancel timers and lanes; the ports are closed by their owners."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # ------------------------------------------------------------------------------------ stepping
    def handle(self, event: Event) -> None:
        """Apply one event: step, log, record, carry out the effects (on the loop thread)."""
        self._alive_seconds = self._clock.now()
        if isinstance(event, _Tick):
            self._tick_pending = False
            return
        if isinstance(event, _TimerFired):
            current = self._timers.get(event.name)
            if current is None or current[0] != event.generation:
                return  # cancelled or restarted after it fired: stale
            del self._timers[event.name]
            event = TimerExpired(event.name)
        old = self._state
        transition = step(old, event)
        self._state = transition.state
        if transition.state.phase is not old.phase:
            self.timeline.append((self._clock.now(), transition.state.phase.value))
            _LOGGER.info("state %s -> %s on %s", old.phase.value, transition.state.phase.value, event)
        elif transition.effects:
            _LOGGER.debug("state %s on %s", old.phase.value, event)
        for effect in transition.effects:
            self._execute(effect)
        for listener in self._listeners:
            listener(old, event, transition)

    def _execute(self, effect: Effect) -> None:
        self.executed.append((self._clock.now(), effect))
        _LOGGER.debug("effect %s", effect)
        try:
            self._carry_out(effect)
        except KioskError as error:
            _LOGGER.error("%s failed: %s", type(effect).__name__, error)
            self.post(ErrorOccurred(error.code, error.message))

    def _carry_out(self, effect: Effect) -> None:
        match effect:
            case OpenSession():
                self._link_lane.submit("open", self._link.open)
            case CloseSession():
                # An open still in progress is abandoned: the visitor has gone, a session costs money. Turn
                # RPCs still queued are for the room being left.
                self._link_lane.cancel("open")
                self._turn_lane.cancel("turn")
                self._link_lane.submit("close", self._link.close)
            case BeginTurn():
                self._turn_lane.submit("turn", self._link.begin_turn)
            case EndTurn(commit=commit):
                self._turn_lane.submit("turn", functools.partial(self._end_turn, commit))
            case StartPublishing(preroll=preroll):
                self._audio.set_gate(True, preroll=preroll)
                self._link.set_publishing(True)
            case StopPublishing():
                self._audio.set_gate(False)
                self._link.set_publishing(False)
            case ClearPlayback():
                self._audio.clear_playback()
            case StopCues():
                self._cue_lane.cancel("cue")
                self._audio.clear_playback()
            case InterruptAgent():
                self._link_lane.submit("interrupt", self._link.interrupt_agent)
            case PlayCue(name=name):
                self._cue_lane.submit("cue", functools.partial(self._play_cue, name))
            case SpeakStatus():
                for cue in status_cues(effect):
                    self._cue_lane.submit("cue", functools.partial(self._play_cue, cue))
            case ShowPattern(name=name):
                if self._panel is not None:
                    self._panel.show(name)
            case StartTimer(name=name, seconds=seconds):
                self._start_timer(name, seconds)
            case CancelTimer(name=name):
                entry = self._timers.pop(name, None)
                if entry is not None:
                    entry[1].cancel()
            case StartRecording():
                self._audio.start_recording()
            case StopRecording(keep=keep, note=note):
                recording = self._audio.stop_recording()
                if keep:
                    self._store_lane.submit("store", functools.partial(self._store_recording, recording, note))
            case _:
                raise TypeError(f"no handler for effect {effect!r}")

    async def _end_turn(self, commit: bool) -> None:
        """End the turn after the visitor's last words: the frames captured before the release go out first.

        The state machine decided at the release from the voice heard by then; on a busy machine the visitor's
        words can be in frames processed after it. Voice in what went out makes the turn one to answer.
        """
        heard = False
        with contextlib.suppress(TimeoutError):
            heard = await asyncio.wait_for(self._audio.wait_gate_closed(), _DRAIN_WAIT_SECONDS)
        if heard and not commit:
            _LOGGER.info("the visitor's voice came through after the release: the turn is answered")
            commit = True
        await self._link.end_turn(commit)

    def _start_timer(self, name: Timer, seconds: float) -> None:
        entry = self._timers.pop(name, None)
        if entry is not None:
            entry[1].cancel()
        self._generation += 1
        fired = _TimerFired(name, self._generation)
        handle = self._clock.call_later(seconds, lambda: self.post(fired))
        self._timers[name] = (self._generation, handle)

    def _arm_heartbeat(self) -> None:
        def beat() -> None:
            # One tick in flight at most: a stalled consumer must show as stale, not as a full bus.
            if not self._tick_pending:
                self._tick_pending = True
                self.post(_TICK)
            self._heartbeat = self._clock.call_later(self._heartbeat_seconds, beat)

        self._heartbeat = self._clock.call_later(self._heartbeat_seconds, beat)

    async def _play_cue(self, name: Cue) -> None:
        try:
            await self._audio.play_cue(name.value)
        except KioskError as error:
            # The flow must not hang waiting for a cue that cannot play (e.g. a broken file): log it and
            # report it finished, so "leave a message" and the status still move on.
            _LOGGER.warning("cue %s could not play: %s", name.value, error)
        self.post(CueFinished(name))

    async def _store_recording(self, recording: Recording, note: PersonalText | None = None) -> None:
        if self._store is None:
            self.post(RecordingFailed("no message store is configured"))
            return
        try:
            message_id = await self._store.store_recording(recording, note)
        except KioskError as error:
            _LOGGER.error("visitor message could not be stored: %s", error)
            self.post(RecordingFailed(error.code))
            return
        self.post(RecordingStored(message_id))

    def _lane_error(self, error: KioskError) -> None:
        _LOGGER.error("%s", error)
        self.post(ErrorOccurred(error.code, error.message))
