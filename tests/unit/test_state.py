"""The state machine: invariants over every reachable state x every event, plus scenarios per mode."""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import pickle
import shutil
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from multiprocessing.pool import AsyncResult
from pathlib import Path

import pytest

from fixtures.early import idle_priority
from kiosk.effects import (
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
    HeadsetPlugged,
    HeadsetUnplugged,
    LinkLost,
    LinkReconnecting,
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
    Tool,
    ToolFinished,
    ToolStarted,
    VoiceStarted,
    VoiceStopped,
)
from kiosk.panel.patterns import PATTERNS
from kiosk.personal import PersonalText
from kiosk.settings import InteractionMode, TurnDetection
from kiosk.state import (
    SESSION_PHASES,
    Handover,
    KioskState,
    MessageStep,
    Phase,
    Policy,
    Transition,
    initial_state,
    pattern_key,
    step,
)

MODES = list(InteractionMode)
NOTE = PersonalText("Wants a call back about the order")

EVENTS: list[Event] = [
    Started(),
    *(cls(b) for cls in (ButtonPressed, ButtonReleased, ButtonHeld) for b in Button),
    VoiceStarted(), VoiceStopped(),
    SessionOpened("s"), SessionClosed("gone"),
    *(ApiRefused(r) for r in RefusalReason),
    *(AgentStateChanged(a) for a in AgentState),
    PlaybackStarted(), PlaybackFinished(),
    *(CueFinished(c) for c in (Cue.LEAVE_MESSAGE, Cue.RECORDING_TONE, Cue.OFFLINE, Cue.SESSION_START,
                               Cue.CONSENT_NOTICE)),
    LinkUp(), LinkUp(proven=True), LinkLost("down"), LinkLost("no agent", transient=False), LinkReconnecting(),
    DeviceLost("array"), DeviceFound("array"), HeadsetPlugged(), HeadsetUnplugged(),
    *(RouteChanged(r, v) for r in Route for v in (True, False)),
    *(TimerExpired(t) for t in Timer),
    RecordingStored("m1"), RecordingFailed("disk"),
    ErrorOccurred("boom", "it broke"),
    # The machine treats every tool alike (test_every_tool_steps_alike): one stands for all.
    ToolStarted(Tool.CALL_STAFF), ToolFinished(Tool.CALL_STAFF, "ok"),
    MessageRequested(NOTE), EndRequested(), StaffCalled(),
]
# Every event class in kiosk.events must be in the table.
EVENT_CLASSES = {type(e) for e in EVENTS}


def _canonical(state: KioskState) -> KioskState:
    """Fold fields that only change what is said or shown (not what happens next) to keep the search small.

    Also folded, and put back where they matter: ``staff_called`` (only what is shown: checked by
    test_the_staff_pattern_changes_nothing_else), ``agent_busy`` without a pending handover (it matters for
    nothing else: test_agent_busy_matters_only_for_a_handover) and
    ``tool_running`` (it only holds transitions back, so a state with a tool running is a reachable state plus
    the flag: ``_variants`` checks every session state with it).
    """
    return state.with_(
        last_error=None if state.last_error is None else "e",
        route=Route.NONE if state.route is Route.NONE else Route.ARRAY,
        offline_reason=OfflineReason.OFFLINE if state.offline_reason is OfflineReason.OFFLINE
        else OfflineReason.MAINTENANCE,
        staff_called=False,
        agent_busy=state.agent_busy and state.handover is not Handover.NONE,
        tool_running=False,
    )


def _variants(state: KioskState) -> list[KioskState]:
    """``state``, and in a session also with a tool running (the flag ``_canonical`` folds)."""
    return [state, state.with_(tool_running=True)] if state.phase in SESSION_PHASES else [state]


@dataclass
class _Search:
    """The states a search reached, and what the checks said of every step they took (the first failures)."""

    states: list[KioskState]
    steps_checked: int
    failures: list[str]
    staff_failures: list[str] = field(default_factory=list)
    busy_failures: list[str] = field(default_factory=list)


def _reachable(policy: Policy, check: Callable[[KioskState, Event, Transition, int], None] | None = None,
               limit: int = 20000) -> _Search:
    """Every state reachable from start-up by any sequence of the events above (breadth first, canonical).

    Each step the search takes is checked on the way with ``check`` (by default the invariants, ``_check``):
    stepping every state with every event once more for them would double the time. The first failures are
    kept for the test to report.
    """
    check = check or _check
    start = initial_state(policy)
    seen = {start}
    queue = deque([start])
    failures: list[str] = []
    checked = 0
    while queue:
        state = queue.popleft()
        for event in EVENTS:
            t = step(state, event)
            checked += 1
            if len(failures) < 5:
                try:
                    check(state, event, t, checked)
                except AssertionError as error:
                    failures.append(str(error) or _w(state, event, t))
            nxt = _canonical(t.state)
            if nxt not in seen:
                seen.add(nxt)
                queue.append(nxt)
                assert len(seen) < limit, "state space exploded: a field grows without bound"
    return _Search(list(seen), checked, failures)


def _kept(failures: list[str], check: Callable[[KioskState, Event, Transition], None], state: KioskState,
          event: Event, plain: Transition, keep: int = 5) -> None:
    """Run ``check`` on one step unless ``keep`` failures are in; keep the message of one that fails."""
    if len(failures) < keep:
        try:
            check(state, event, plain)
        except AssertionError as error:
            failures.append(str(error))


def _searched_and_checked(policy: Policy) -> _Search:
    """The search with the invariants, and every check that steps each reachable state with every event.

    The checks that step a state flagged with a field ``_canonical`` folds compare with the step the search took
    (stepping every state with every event once more would double their time). They run in the worker that
    searched (``_searches``), so the policies' passes share the machine's cores.
    """
    staff: list[str] = []
    busy: list[str] = []

    def check(state: KioskState, event: Event, t: Transition, checked: int) -> None:
        if not policy.consent_notice:
            _kept(staff, _check_staff_pattern, state, event, t)
            _kept(busy, _check_agent_busy, state, event, t)
        _check(state, event, t, checked)

    search = _reachable(policy, check)
    search.staff_failures, search.busy_failures = staff, busy

    def check_variant(state: KioskState, event: Event, t: Transition) -> None:
        search.steps_checked += 1
        _check(state, event, t, search.steps_checked)

    # The same states with a tool running (the flag ``_canonical`` folds): checked, not searched from.
    variant: list[str] = []
    for state in (v for base in search.states for v in _variants(base)[1:]):
        for event in EVENTS:
            _kept(variant, check_variant, state, event, step(state, event))
    search.failures += variant
    return search


def _nothing_recorded(state: KioskState, event: Event, t: Transition, checked: int) -> None:
    assert StartRecording() not in t.effects and PlayCue(Cue.LEAVE_MESSAGE) not in t.effects, _w(state, event, t)


def _searched_without_a_key(policy: Policy) -> _Search:
    return _reachable(policy, _nothing_recorded)


# One fresh session after a lost room, then offline: both branches of the rule, with a third fewer states than
# the default's five (whose doubling schedule the reopen tests below step through one by one).
SEARCH_REOPEN_ATTEMPTS = 1
_SEARCHES = [Policy(mode=m, consent_notice=c, reopen_attempts=SEARCH_REOPEN_ATTEMPTS)
             for c in (False, True) for m in MODES]
_KEYLESS = [Policy(mode=m, messages=False, reopen_attempts=SEARCH_REOPEN_ATTEMPTS) for m in MODES]


class _Early:
    """Every search of this module (the slowest part of the suite), started once in one process per core.

    A worker leaves its result in a file, read when a test asks for it: unpickling one in this process takes
    about 0.1 s of the interpreter, which would stall the e2e tests' kiosks (they run in this process) if it
    happened when a search finished.
    """

    pool: multiprocessing.pool.Pool | None = None
    directory: Path | None = None
    files: dict[Policy, AsyncResult[Path]] = {}
    loaded: dict[Policy, _Search] = {}


def start_early(items: list[pytest.Function]) -> Callable[[], None] | None:
    """Start the searches if ``items`` (this module's tests in the run) use them (``fixtures.early``: when
    collection ends, so they run while the tests before this module leave the CPU idle); what it returns stops
    them."""
    if not any("_searches" in item.fixturenames for item in items):
        return None
    _start_searches()
    return _stop_early


def _to_file(search: Callable[[Policy], _Search], policy: Policy, path: Path) -> Path:
    """Run ``search`` in a worker; its result goes to ``path``."""
    path.write_bytes(pickle.dumps(search(policy)))
    return path


def _start_searches() -> None:
    """Every search at idle priority, one process per core (once)."""
    if _Early.pool is not None:
        return
    _Early.directory = Path(tempfile.mkdtemp(prefix="kiosk-state-search-"))
    _Early.pool = multiprocessing.get_context("spawn").Pool(os.cpu_count(), initializer=idle_priority)
    work = [(_searched_and_checked, policy) for policy in _SEARCHES]
    work += [(_searched_without_a_key, policy) for policy in _KEYLESS]
    _Early.files = {policy: _Early.pool.apply_async(_to_file, (search, policy, _Early.directory / f"{i}.pickle"))
                    for i, (search, policy) in enumerate(work)}
    _Early.loaded = {}


def _stop_early() -> None:
    if _Early.pool is not None:
        _Early.pool.terminate()
        _Early.pool.join()
        _Early.pool = None
    if _Early.directory is not None:
        shutil.rmtree(_Early.directory, ignore_errors=True)
        _Early.directory = None


def _result(policy: Policy) -> _Search:
    """The search of ``policy`` (waits for it)."""
    if policy not in _Early.loaded:
        _Early.loaded[policy] = pickle.loads(_Early.files[policy].get().read_bytes())
    return _Early.loaded[policy]


@pytest.fixture(scope="module")
def _searches() -> Iterator[Callable[[Policy], _Search]]:
    """The searches' results (started by ``fixtures.early`` when collection ended, else here)."""
    _start_searches()
    yield _result
    _stop_early()


@pytest.fixture(scope="module", params=[(m, c) for m in MODES for c in (False, True)],
                ids=lambda p: p[0].value + ("+consent" if p[1] else ""))
def search(request: pytest.FixtureRequest, _searches: Callable[[Policy], _Search]) -> _Search:
    mode, consent = request.param
    return _searches(Policy(mode=mode, consent_notice=consent, reopen_attempts=SEARCH_REOPEN_ATTEMPTS))


@pytest.fixture(scope="module", params=MODES, ids=lambda m: m.value)
def searched_per_mode(request: pytest.FixtureRequest, _searches: Callable[[Policy], _Search]) -> _Search:
    """The search of each mode without the AI notice (for checks the notice has no part in)."""
    return _searches(Policy(mode=request.param, reopen_attempts=SEARCH_REOPEN_ATTEMPTS))


@pytest.fixture(scope="module")
def reachable_per_mode(searched_per_mode: _Search) -> list[KioskState]:
    return searched_per_mode.states


def test_with_is_dataclasses_replace(reachable_per_mode: list[KioskState]) -> None:
    states = reachable_per_mode[::97]
    for state, other in zip(states, reversed(states), strict=True):
        for f in fields(KioskState):
            change = {f.name: getattr(other, f.name)}
            assert state.with_(**change) == replace(state, **change), f.name
        everything = {f.name: getattr(other, f.name) for f in fields(KioskState)}
        assert state.with_(**everything) == other
    with pytest.raises(TypeError, match="no field 'phaze'"):
        states[0].with_(phaze=Phase.IDLE)


def test_every_event_class_is_tabled() -> None:
    import kiosk.events as events

    defined = {obj for obj in vars(events).values()
               if isinstance(obj, type) and issubclass(obj, Event) and obj is not Event}
    assert defined == EVENT_CLASSES


def test_every_phase_is_reachable(search: _Search) -> None:
    assert {s.phase for s in search.states} == set(Phase)


def _w(state: KioskState, event: Event, t: object) -> str:
    """The failure message (built only when an assertion fails)."""
    return f"{state} + {event} -> {t}"


def _kinds(effects: tuple[Effect, ...]) -> Counter[type[Effect]]:
    """How many effects of each class (no effect class subclasses another: what ``isinstance`` would count)."""
    return Counter(map(type, effects))


_SILENCE_TIMERS = (Timer.NO_SPEECH, Timer.IDLE_END)
_FAILURES = (DeviceLost, ErrorOccurred, LinkLost, ApiRefused)


def test_invariants_over_reachable_states_and_all_events(search: _Search) -> None:
    """Every step from every reachable state: those the search took (checked on its way), and the same states
    with a tool running (the flag ``_canonical`` folds; checked in the search's worker)."""
    assert not search.failures, "\n\n".join(search.failures)
    assert search.steps_checked > len(search.states) * len(EVENTS)  # the variants were checked too


def _check(state: KioskState, event: Event, t: Transition, checked: int) -> None:
    """The invariants of one step (``checked`` counts the steps: some checks run on every 97th only)."""
    new, fx = t.state, t.effects
    kinds = _kinds(fx)
    if checked % 97 == 0:
        assert step(state, event) == t, _w(state, event, t)  # pure: same input, same output
        # The agent's note is personal: no repr (what the controller logs) ever shows it.
        assert NOTE.text not in repr(new) + repr(fx) + repr(event), _w(state, event, t)
    _check_turns(state, event, new, fx)
    _check_tools(state, event, new, fx)
    # The microphone streams only inside a session, and the gate effects match the flag.
    assert not new.publishing or new.phase in (Phase.LISTENING, Phase.SPEAKING), _w(state, event, t)
    # The AI notice plays before anything streams: never the gate while it plays, and a session
    # with the notice never streams on its opening.
    assert not (new.consent_playing and new.publishing), _w(state, event, t)
    assert not new.consent_playing or new.phase is Phase.LISTENING, _w(state, event, t)
    if state.policy.consent_notice and isinstance(event, SessionOpened):
        assert kinds[StartPublishing] == 0, _w(state, event, t)
        if state.phase is Phase.CONNECTING and not state.reopen_wait:
            assert PlayCue(Cue.CONSENT_NOTICE) in fx and new.consent_playing, _w(state, event, t)
    if PlayCue(Cue.CONSENT_NOTICE) in fx:
        assert state.policy.consent_notice, _w(state, event, t)
    assert kinds[StartPublishing] - kinds[StopPublishing] == int(new.publishing) - int(
        state.publishing), _w(state, event, t)
    # Leaving a session always closes it; entering one always opens it.
    if state.phase in SESSION_PHASES and new.phase not in SESSION_PHASES:
        assert kinds[CloseSession] == 1 and kinds[ClearPlayback] == 1, _w(state, event, t)
        assert {e.name for e in fx if isinstance(e, CancelTimer)} >= {Timer.MAX_SESSION, Timer.IDLE_END}
    if new.phase is Phase.CONNECTING and state.phase is not Phase.CONNECTING and not new.reopen_wait:
        assert OpenSession() in fx and StartTimer(Timer.MAX_SESSION, state.policy.max_session_seconds) in fx
    # A fresh session after a room failure: only from a session, after its timer, a bounded number of times.
    assert new.reopens <= state.policy.reopen_attempts, _w(state, event, t)
    assert not new.reopen_wait or new.phase is Phase.CONNECTING, _w(state, event, t)
    if new.reopen_wait and not state.reopen_wait:
        assert isinstance(event, LinkLost) and event.transient and state.phase in SESSION_PHASES
        assert CloseSession() in fx and OpenSession() not in fx, _w(state, event, t)
        assert StartTimer(Timer.REOPEN, state.policy.reopen_delay(state.reopens)) in fx, _w(state, event, t)
        assert new.reopens == state.reopens + 1 and not new.publishing, _w(state, event, t)
    if state.reopen_wait and not new.reopen_wait and new.phase is Phase.CONNECTING:
        assert event == TimerExpired(Timer.REOPEN) and OpenSession() in fx, _w(state, event, t)
    if state.reopen_wait and new.phase is not Phase.CONNECTING:
        assert CancelTimer(Timer.REOPEN) in fx, _w(state, event, t)
    if kinds[OpenSession]:
        assert new.phase is Phase.CONNECTING, _w(state, event, t)
    # Hands-free, a tap does not end the fresh session that brings a lost conversation back.
    if state.phase is Phase.CONNECTING and state.reopens and event == ButtonPressed(Button.TALK):
        assert new.phase is Phase.CONNECTING and CloseSession() not in fx, _w(state, event, t)
    # One pattern effect exactly when the pattern changes, naming a known pattern.
    shown = [e for e in fx if isinstance(e, ShowPattern)]
    if pattern_key(new) != pattern_key(state):
        assert shown == [ShowPattern(pattern_key(new))], _w(state, event, t)
        assert shown[0].name in PATTERNS
    else:
        assert shown == [], _w(state, event, t)
    # Failures: every state handles them.
    if isinstance(event, DeviceLost) or (isinstance(event, RouteChanged) and event.route is Route.NONE):
        assert new.phase is Phase.ERROR and not new.device_ok, _w(state, event, t)
    if isinstance(event, ErrorOccurred):
        assert new.phase is Phase.ERROR and new.last_error == "boom", _w(state, event, t)
    if isinstance(event, LinkLost) and not new.reopen_wait:
        assert not new.online and new.phase not in SESSION_PHASES, _w(state, event, t)
        assert not (event.transient and state.phase in SESSION_PHASES
                    and state.reopens < state.policy.reopen_attempts), _w(state, event, t)
    if isinstance(event, ApiRefused):
        assert not new.online and new.phase not in SESSION_PHASES, _w(state, event, t)
    # Recording starts only after the tone, stops whenever a recording phase is left.
    if kinds[StartRecording]:
        assert isinstance(event, CueFinished) and event.cue == Cue.RECORDING_TONE, _w(state, event, t)
        assert new.message is MessageStep.RECORDING
    was_recording = state.phase is Phase.RECORDING_MESSAGE and state.message is MessageStep.RECORDING
    now_recording = new.phase is Phase.RECORDING_MESSAGE and new.message is MessageStep.RECORDING
    assert kinds[StopRecording] == int(was_recording and not now_recording), _w(state, event, t)
    # The confirmation plays only once the message is stored.
    if PlayCue(Cue.MESSAGE_STORED) in fx:
        assert isinstance(event, RecordingStored), _w(state, event, t)
    # The agent is interrupted only while it speaks, and voice interrupts only on a verified path.
    if kinds[InterruptAgent]:
        assert state.phase is Phase.SPEAKING, _w(state, event, t)
        if isinstance(event, VoiceStarted):
            assert state.echo_path_verified and state.policy.hands_free and state.policy.barge_in
    # Status is spoken only for a hold (in a conversation: timed from when the microphone went live).
    if kinds[SpeakStatus]:
        assert isinstance(event, ButtonHeld) or event == TimerExpired(Timer.STATUS_HOLD), _w(state, event, t)


def _check_turns(state: KioskState, event: Event, new: KioskState, fx: tuple[Effect, ...]) -> None:
    """Manual turns follow the gate: begun just before it opens, ended just after it closes, never otherwise."""
    manual = state.policy.manual_turns
    assert new.turn_open == (new.publishing and manual), _w(state, event, fx)
    begins = [i for i, e in enumerate(fx) if isinstance(e, BeginTurn)]
    ends = [(i, e) for i, e in enumerate(fx) if isinstance(e, EndTurn)]
    if not manual:
        assert not begins and not ends, _w(state, event, fx)
        return
    # A session lost to the room and about to be opened afresh is left too.
    left = (state.phase in SESSION_PHASES and new.phase not in SESSION_PHASES) or (
        new.reopen_wait and not state.reopen_wait)
    assert len(begins) == int(new.turn_open and not state.turn_open), _w(state, event, fx)
    # Leaving the session ends the turn with it: no end_turn RPC into a room being left.
    assert len(ends) == int(state.turn_open and not new.turn_open and not left), _w(state, event, fx)
    if begins:
        assert begins[0] < fx.index(next(e for e in fx if isinstance(e, StartPublishing))), _w(state, event, fx)
    for i, end in ends:
        assert i > fx.index(StopPublishing()), _w(state, event, fx)
        assert end.commit == new.heard_voice, _w(state, event, fx)  # answered only if the visitor spoke


def _check_tools(state: KioskState, event: Event, new: KioskState, fx: tuple[Effect, ...]) -> None:
    """A running tool holds the session open; handovers happen only when asked and when the agent is done."""
    if state.tool_running and isinstance(event, TimerExpired) and event.name in _SILENCE_TIMERS:
        assert new.phase is state.phase and CloseSession() not in fx, _w(state, event, fx)
    if (isinstance(event, ToolFinished) and state.phase in (Phase.LISTENING, Phase.THINKING)
            and not state.publishing and not state.consent_playing):
        # The silence timers waited for the tool: the wait for the next exchange starts again.
        assert StartTimer(Timer.IDLE_END, state.policy.idle_end_seconds) in fx, _w(state, event, fx)
    assert not new.tool_running or state.tool_running or isinstance(event, ToolStarted), _w(state, event, fx)
    if state.phase in SESSION_PHASES and new.phase not in SESSION_PHASES:
        assert not new.tool_running and new.handover is Handover.NONE and not new.agent_busy, _w(state, event, fx)
    # Only a session whose agent asked for it (take_message) hands the visitor to the message recorder.
    if state.phase in SESSION_PHASES and new.phase is Phase.RECORDING_MESSAGE:
        assert state.handover is Handover.MESSAGE and state.policy.messages, _w(state, event, fx)
        assert CloseSession() in fx and PlayCue(Cue.RECORDING_TONE) in fx, _w(state, event, fx)
        assert new.message is MessageStep.TONE and new.message_note == state.message_note, _w(state, event, fx)
    # A handover waits for the agent to finish (its state, the speaker) and never cuts off a talking visitor.
    handed_over = (state.handover is not Handover.NONE and state.phase in SESSION_PHASES
                   and new.phase not in SESSION_PHASES and not isinstance(event, _FAILURES)
                   and not isinstance(event, (ButtonPressed, ButtonHeld, TimerExpired, RouteChanged, SessionClosed)))
    if handed_over:
        assert not (new.agent_busy or new.playing or state.publishing), _w(state, event, fx)
    if isinstance(event, TimerExpired) and event.name is Timer.HANDOVER and new.phase is not state.phase:
        assert state.handover is not Handover.NONE and not state.playing and not state.publishing
    # The note lives only between the request and the recording it goes with.
    if new.message_note is not None:
        assert new.handover is Handover.MESSAGE or (
            new.phase is Phase.RECORDING_MESSAGE and new.message in (MessageStep.TONE, MessageStep.RECORDING)), \
            _w(state, event, fx)
    for effect in fx:
        if isinstance(effect, StopRecording):
            assert effect.note == (state.message_note if effect.keep else None), _w(state, event, fx)
    if isinstance(event, MessageRequested) and not state.policy.messages:
        assert new.handover is state.handover and fx == (), _w(state, event, fx)
    # The tool and staff patterns never hide a live microphone.
    if pattern_key(new) in ("tool", "staff_called"):
        assert not new.publishing and (new.tool_running or new.staff_called), _w(state, event, fx)


def test_the_staff_pattern_changes_nothing_else(searched_per_mode: _Search) -> None:
    """staff_called (folded in the search) changes only the pattern shown, never what happens."""
    assert not searched_per_mode.staff_failures, "\n\n".join(searched_per_mode.staff_failures)


def _check_staff_pattern(state: KioskState, event: Event, plain: Transition) -> None:
    if isinstance(event, StaffCalled) or event == TimerExpired(Timer.STAFF_CALLED):
        return
    flagged = state.with_(staff_called=True)
    shown = step(flagged, event)
    assert shown.state.with_(staff_called=False) == plain.state, _w(flagged, event, shown)
    assert [e for e in shown.effects if not isinstance(e, ShowPattern)] == [
        e for e in plain.effects if not isinstance(e, ShowPattern)], _w(flagged, event, shown)


def test_agent_busy_matters_only_for_a_handover(searched_per_mode: _Search) -> None:
    """agent_busy (folded without a handover in the search) changes nothing while no handover is pending."""
    assert not searched_per_mode.busy_failures, "\n\n".join(searched_per_mode.busy_failures)


def _check_agent_busy(state: KioskState, event: Event, plain: Transition) -> None:
    if state.handover is not Handover.NONE or state.phase not in SESSION_PHASES:
        return
    if isinstance(event, (MessageRequested, EndRequested)):
        return  # a handover becomes pending: from here on the flag counts (the search covers it)
    busy = state.with_(agent_busy=True)
    other = step(busy, event)
    assert other.state.with_(agent_busy=plain.state.agent_busy) == plain.state, _w(busy, event, other)
    assert other.effects == plain.effects, _w(busy, event, other)


def test_every_tool_steps_alike(reachable_per_mode: list[KioskState]) -> None:
    """The machine does not tell tools apart (the search uses one for all)."""
    for state in reachable_per_mode[::7]:
        for variant in _variants(state):
            started = {step(variant, ToolStarted(tool)) for tool in Tool}
            finished = {step(variant, ToolFinished(tool, outcome)) for tool in Tool for outcome in ("ok", "timeout")}
            assert len(started) == 1 and len(finished) == 1, variant


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("event", [DeviceLost("array"), LinkLost("x"), ErrorOccurred("e", "m")],
                         ids=["DeviceLost", "LinkLost", "ErrorOccurred"])
def test_every_phase_handles_failures(phase: Phase, event: Event) -> None:
    # With the fresh sessions used up (a transient LinkLost in a session tries one first: test_reopen_*).
    state = KioskState(phase=phase, publishing=phase in (Phase.LISTENING, Phase.SPEAKING),
                       message=MessageStep.RECORDING if phase is Phase.RECORDING_MESSAGE else MessageStep.NONE,
                       reopens=Policy().reopen_attempts)
    t = step(state, event)
    if isinstance(event, LinkLost):
        assert not t.state.online
        expected = {Phase.IDLE: Phase.OFFLINE, **{p: Phase.OFFLINE for p in SESSION_PHASES}}.get(phase, phase)
        assert t.state.phase is expected
    else:
        assert t.state.phase is Phase.ERROR
        assert ShowPattern("error") in t.effects or phase is Phase.ERROR
    if phase in SESSION_PHASES:
        assert CloseSession() in t.effects and not t.state.publishing
    if phase is Phase.RECORDING_MESSAGE and not isinstance(event, LinkLost):
        assert StopRecording(keep=True) in t.effects  # what was said so far is kept


# ------------------------------------------------------------------------------------ scenarios
def run(state: KioskState, *events: Event) -> tuple[KioskState, list[Effect]]:
    effects: list[Effect] = []
    for event in events:
        t = step(state, event)
        state = t.state
        effects += t.effects
    return state, effects


def idle(mode: InteractionMode = InteractionMode.PUSH_TO_TALK, verified: bool = False, **kw: object) -> KioskState:
    state, _ = run(initial_state(Policy(mode=mode, **kw), echo_path_verified=verified), Started())  # type: ignore[arg-type]
    assert state.phase is Phase.IDLE
    return state


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_the_consent_notice_plays_before_the_microphone_first_streams(mode: InteractionMode) -> None:
    """Session opened with a visitor already talking: the notice plays (LED: consent), nothing streams
    while it does, and the microphone goes live only once it has played."""
    s = idle(mode, consent_notice=True)
    opener: Event = VoiceStarted() if mode is InteractionMode.OPEN_MIC else ButtonPressed()
    s, fx = run(s, opener, *([] if mode is InteractionMode.OPEN_MIC else [VoiceStarted()]))
    assert s.phase is Phase.CONNECTING and OpenSession() in fx
    s, fx = run(s, SessionOpened("s"))
    assert fx == [PlayCue(Cue.CONSENT_NOTICE), ShowPattern("consent")]
    assert s.consent_playing and not s.publishing and pattern_key(s) == "consent"
    # Talking over the notice, the notice's own playback, a press: still nothing streams.
    s, fx = run(s, VoiceStopped(), VoiceStarted(), PlaybackStarted(), PlaybackFinished())
    assert StartPublishing() not in fx and s.phase is Phase.LISTENING
    s, fx = run(s, CueFinished(Cue.CONSENT_NOTICE))
    assert fx[0] == PlayCue(Cue.SESSION_START) and StartPublishing(preroll=False) in fx
    assert ShowPattern("listening") in fx
    assert s.publishing and not s.consent_playing


def test_without_the_notice_nothing_changes() -> None:
    s, fx = run(idle(), ButtonPressed(), SessionOpened("s"))
    assert PlayCue(Cue.CONSENT_NOTICE) not in fx and StartPublishing() in fx


def test_a_visitor_who_let_go_during_the_notice_is_not_streamed_after_it() -> None:
    s, _ = run(idle(consent_notice=True), ButtonPressed(), SessionOpened("s"), ButtonReleased())
    s, fx = run(s, CueFinished(Cue.CONSENT_NOTICE))
    assert StartPublishing() not in fx and StartTimer(Timer.IDLE_END, s.policy.idle_end_seconds) in fx
    s, fx = run(s, ButtonPressed())
    assert StartPublishing() in fx and PlayCue(Cue.CONSENT_NOTICE) not in fx  # once per session
    s, fx = run(s, ButtonReleased(), TimerExpired(Timer.IDLE_END), ButtonPressed(), SessionOpened("s2"))
    assert PlayCue(Cue.CONSENT_NOTICE) in fx  # a new session hears it again


def test_holding_through_the_notice_is_not_a_status_request() -> None:
    s, _ = run(idle(consent_notice=True), ButtonPressed(), SessionOpened("s"))
    s, fx = run(s, ButtonHeld())
    assert s.phase is Phase.LISTENING and s.consent_playing and not any(isinstance(e, SpeakStatus) for e in fx)
    s, fx = run(s, CueFinished(Cue.CONSENT_NOTICE))
    assert StartPublishing(preroll=False) in fx


def test_cancel_during_the_notice_ends_the_session() -> None:
    s, _ = run(idle(consent_notice=True), ButtonPressed(), SessionOpened("s"))
    s, fx = run(s, ButtonPressed(Button.CANCEL))
    assert s.phase is Phase.IDLE and CloseSession() in fx and not s.consent_playing


def test_push_to_talk_streams_only_while_held() -> None:
    s, fx = run(idle(), ButtonPressed())
    assert s.phase is Phase.CONNECTING and OpenSession() in fx and StartPublishing() not in fx
    s, fx = run(s, SessionOpened("s"))
    # Push-to-talk takes manual turns by default: the agent's turn opens just before the microphone goes live.
    assert s.phase is Phase.LISTENING and fx[:3] == [PlayCue(Cue.SESSION_START), BeginTurn(), StartPublishing()]
    s, fx = run(s, VoiceStarted(), VoiceStopped(), ButtonReleased())
    assert s.phase is Phase.THINKING and StopPublishing() in fx and not s.publishing
    assert fx[fx.index(StopPublishing()) + 1] == EndTurn(commit=True)
    s, fx = run(s, AgentStateChanged(AgentState.SPEAKING), PlaybackStarted())
    assert s.phase is Phase.SPEAKING
    s, fx = run(s, PlaybackFinished())
    assert s.phase is Phase.LISTENING and StartTimer(Timer.IDLE_END, 20.0) in fx
    s, fx = run(s, TimerExpired(Timer.IDLE_END))
    assert s.phase is Phase.IDLE and CloseSession() in fx and PlayCue(Cue.SESSION_END) in fx


def test_push_to_talk_release_before_connected_keeps_mic_closed() -> None:
    s, _ = run(idle(), ButtonPressed(), ButtonReleased())
    s, fx = run(s, SessionOpened("s"))
    assert s.phase is Phase.LISTENING and StartPublishing() not in fx and StartTimer(Timer.IDLE_END, 20.0) in fx


def test_push_to_talk_voice_never_interrupts_even_on_verified_route() -> None:
    s, _ = run(idle(verified=True), ButtonPressed(), SessionOpened("s"), VoiceStarted(), ButtonReleased(),
               AgentStateChanged(AgentState.SPEAKING))
    assert s.phase is Phase.SPEAKING
    s, fx = run(s, VoiceStarted())
    assert s.phase is Phase.SPEAKING and fx == []
    s, fx = run(s, ButtonPressed())
    assert s.phase is Phase.LISTENING and fx[:4] == [ClearPlayback(), InterruptAgent(), BeginTurn(), StartPublishing()]


@pytest.mark.parametrize("mode", [InteractionMode.TAP_TO_TALK, InteractionMode.OPEN_MIC])
@pytest.mark.parametrize("verified", [True, False])
def test_hands_free_barge_in_by_voice_only_on_verified_route(mode: InteractionMode, verified: bool) -> None:
    s, _ = run(idle(mode, verified), ButtonPressed(), ButtonReleased(), SessionOpened("s"), VoiceStarted(),
               VoiceStopped(), AgentStateChanged(AgentState.SPEAKING))
    assert s.phase is Phase.SPEAKING and not s.publishing
    s, fx = run(s, VoiceStarted())
    if verified:
        assert s.phase is Phase.LISTENING and fx[:3] == [ClearPlayback(), InterruptAgent(), StartPublishing()]
    else:  # push-to-talk semantics: the voice may be the agent's own echo
        assert s.phase is Phase.SPEAKING and fx == []
        s, fx = run(s, ButtonPressed())
        assert s.phase is Phase.LISTENING and fx[:2] == [ClearPlayback(), InterruptAgent()]


def test_barge_in_setting_off_disables_voice_barge_in() -> None:
    s, _ = run(idle(InteractionMode.TAP_TO_TALK, True, barge_in=False), ButtonPressed(), SessionOpened("s"),
               AgentStateChanged(AgentState.SPEAKING))
    s, fx = run(s, VoiceStarted())
    assert s.phase is Phase.SPEAKING and fx == []


def test_tap_to_talk_session_ends_after_no_speech_or_next_tap() -> None:
    s, fx = run(idle(InteractionMode.TAP_TO_TALK), ButtonPressed(), ButtonReleased(), SessionOpened("s"))
    assert s.phase is Phase.LISTENING and StartTimer(Timer.NO_SPEECH, 8.0) in fx and not s.publishing
    s, fx = run(s, TimerExpired(Timer.NO_SPEECH))
    assert s.phase is Phase.IDLE and CloseSession() in fx
    s, _ = run(s, ButtonPressed(), ButtonReleased(), SessionOpened("s"), VoiceStarted())
    assert s.publishing and CancelTimer(Timer.NO_SPEECH) in _
    s, fx = run(s, VoiceStopped())
    assert s.phase is Phase.THINKING and not s.publishing
    s, fx = run(s, ButtonPressed())
    assert s.phase is Phase.IDLE and CloseSession() in fx


def test_open_mic_speech_opens_the_session_and_streams_at_once() -> None:
    s, fx = run(idle(InteractionMode.OPEN_MIC), VoiceStarted())
    assert s.phase is Phase.CONNECTING and OpenSession() in fx
    s, fx = run(s, SessionOpened("s"))
    assert s.publishing and PlayCue(Cue.SESSION_START) not in fx  # no tone over the visitor's words
    s, _ = run(idle(InteractionMode.TAP_TO_TALK), VoiceStarted())
    assert s.phase is Phase.IDLE  # tap-to-talk ignores passers-by


def test_max_session_caps_every_session_phase() -> None:
    for extra in ([], [SessionOpened("s")], [SessionOpened("s"), VoiceStarted(), ButtonReleased()],
                  [SessionOpened("s"), AgentStateChanged(AgentState.SPEAKING)]):
        s, _ = run(idle(), ButtonPressed(), *extra)
        assert s.phase in SESSION_PHASES
        s, fx = run(s, TimerExpired(Timer.MAX_SESSION))
        assert s.phase is Phase.IDLE and CloseSession() in fx and PlayCue(Cue.SESSION_END) in fx


def test_idle_end_waits_while_the_agent_speaks() -> None:
    s, _ = run(idle(), ButtonPressed(), SessionOpened("s"), ButtonReleased(), AgentStateChanged(AgentState.SPEAKING))
    s, fx = run(s, TimerExpired(Timer.IDLE_END))
    assert s.phase is Phase.SPEAKING and fx == []


def test_cancel_during_connecting_closes_and_late_session_is_closed() -> None:
    s, _ = run(idle(), ButtonPressed())
    s, fx = run(s, ButtonPressed(Button.CANCEL))
    assert s.phase is Phase.IDLE and CloseSession() in fx
    s, fx = run(s, SessionOpened("late"))
    assert s.phase is Phase.IDLE and fx == [CloseSession()]


def test_status_hold_without_speech_and_not_while_talking() -> None:
    s, _ = run(idle(), ButtonPressed(), SessionOpened("s"), CueFinished(Cue.SESSION_START))
    s, fx = run(s, ButtonHeld(), TimerExpired(Timer.STATUS_HOLD))  # in a conversation, timed from going live
    assert s.phase is Phase.IDLE and CloseSession() in fx
    assert SpeakStatus(online=True, offline_reason=None, route="array", last_error=None) in fx
    s, _ = run(idle(), ButtonPressed(), SessionOpened("s"), VoiceStarted())
    s, fx = run(s, ButtonHeld())
    assert s.phase is Phase.LISTENING and fx == []  # a visitor talking for long is not asking for status


@pytest.mark.parametrize(("reason", "cue", "pattern"), [
    (RefusalReason.UNREACHABLE, Cue.OFFLINE, "offline"),
    (RefusalReason.SERVER_ERROR, Cue.OFFLINE, "offline"),
    (RefusalReason.UNAUTHORISED, Cue.OFFLINE, "offline"),
    (RefusalReason.MAINTENANCE, Cue.MAINTENANCE, "maintenance"),
    (RefusalReason.CREDITS_EXHAUSTED, Cue.CREDITS_EXHAUSTED, "credits_exhausted"),
    (RefusalReason.BUDGET_CAP, Cue.BUDGET_CAP, "budget_cap"),
])
def test_refusal_says_why_then_a_press_records_a_message(reason: RefusalReason, cue: Cue, pattern: str) -> None:
    s, fx = run(idle(), ButtonPressed(), ButtonReleased(), ApiRefused(reason))
    assert s.phase is Phase.OFFLINE and s.last_error == f"api_{reason.value}"
    assert fx[-3:] == [PlayCue(cue), PlayCue(Cue.LEAVE_MESSAGE), ShowPattern(pattern)]
    s, fx = run(s, ButtonPressed())
    assert s.phase is Phase.OFFLINE and fx == []  # a press while the message plays does nothing
    s, _ = run(s, ButtonReleased(), CueFinished(cue), CueFinished(Cue.LEAVE_MESSAGE))
    assert s.message is MessageStep.OFFERED
    s, fx = run(s, ButtonPressed(), ButtonReleased())
    assert s.phase is Phase.RECORDING_MESSAGE and PlayCue(Cue.RECORDING_TONE) in fx and StartRecording() not in fx
    s, fx = run(s, CueFinished(Cue.RECORDING_TONE))
    assert StartRecording() in fx and StartTimer(Timer.MAX_MESSAGE, 60.0) in fx
    s, fx = run(s, VoiceStarted(), VoiceStopped())
    assert StopRecording(keep=True) in fx and s.message is MessageStep.SAVING
    assert not any(isinstance(e, PlayCue) for e in fx)  # no confirmation before it is stored
    s, fx = run(s, RecordingStored("m1"))
    assert PlayCue(Cue.MESSAGE_STORED) in fx and s.phase is Phase.OFFLINE and s.message is MessageStep.NONE


def test_message_ends_at_max_length_and_failure_is_said() -> None:
    s, _ = run(idle(), LinkLost("down"))
    assert s.phase is Phase.OFFLINE
    s, fx = run(s, ButtonPressed())
    assert fx == [PlayCue(Cue.OFFLINE), PlayCue(Cue.LEAVE_MESSAGE)]
    s, _ = run(s, CueFinished(Cue.LEAVE_MESSAGE), ButtonPressed(), CueFinished(Cue.RECORDING_TONE),
               VoiceStarted())
    s, fx = run(s, TimerExpired(Timer.MAX_MESSAGE))
    assert StopRecording(keep=True) in fx
    s, fx = run(s, RecordingFailed("disk full"))
    assert PlayCue(Cue.MESSAGE_FAILED) in fx and s.last_error == "recording_failed"


def test_silent_message_is_discarded_and_offer_expires() -> None:
    s, _ = run(idle(), LinkLost(), ButtonPressed(), CueFinished(Cue.LEAVE_MESSAGE), ButtonPressed(),
               CueFinished(Cue.RECORDING_TONE))
    s, fx = run(s, TimerExpired(Timer.NO_SPEECH))
    assert StopRecording(keep=False) in fx and s.phase is Phase.OFFLINE
    s, _ = run(s, ButtonPressed(), CueFinished(Cue.LEAVE_MESSAGE))
    s, _ = run(s, TimerExpired(Timer.MESSAGE_OFFER))
    assert s.message is MessageStep.NONE and s.phase is Phase.OFFLINE


def test_an_offer_the_service_came_back_during_ends_idle() -> None:
    """The offer stands for the visitor who heard it; when it runs out with the service back, the kiosk is idle
    (not offline until some later LinkUp: the app asks no more once one came)."""
    offered, _ = run(idle(), LinkLost(), ButtonPressed(), CueFinished(Cue.LEAVE_MESSAGE))
    s, fx = run(offered, LinkUp())
    assert s.phase is Phase.OFFLINE and s.message is MessageStep.OFFERED and s.online and fx == []
    s, fx = run(s, TimerExpired(Timer.MESSAGE_OFFER))
    assert s.phase is Phase.IDLE and s.message is MessageStep.NONE and fx == [ShowPattern("idle")]
    s, _ = run(offered, LinkUp(), ButtonPressed())  # the visitor takes the offer all the same
    assert s.phase is Phase.RECORDING_MESSAGE


def test_a_proven_link_up_takes_the_offer_back_and_says_the_service_is_online() -> None:
    """The probe saw the very thing that took the kiosk offline come back: the visitor who hears or holds the offer
    is told, and the next press is a conversation. Once recording has begun, the message is theirs to finish."""
    playing, _ = run(idle(), LinkLost(), ButtonPressed())
    assert playing.message is MessageStep.OFFER_PLAYING
    s, fx = run(playing, LinkUp(proven=True))
    assert s.phase is Phase.IDLE and s.message is MessageStep.NONE and s.online
    assert fx == [StopCues(), PlayCue(Cue.STATUS_ONLINE), ShowPattern("idle")]
    offered, _ = run(playing, CueFinished(Cue.LEAVE_MESSAGE))
    s, fx = run(offered, LinkUp(proven=True))
    assert s.phase is Phase.IDLE and CancelTimer(Timer.MESSAGE_OFFER) in fx and PlayCue(Cue.STATUS_ONLINE) in fx
    s, _ = run(s, ButtonPressed())
    assert s.phase is Phase.CONNECTING
    for step_ in (MessageStep.TONE, MessageStep.RECORDING):
        s, _ = run(offered, ButtonPressed()) if step_ is MessageStep.TONE else run(
            offered, ButtonPressed(), CueFinished(Cue.RECORDING_TONE))
        assert s.message is step_
        s, fx = run(s, LinkUp(proven=True))
        assert s.phase is Phase.RECORDING_MESSAGE and s.message is step_ and fx == [], step_


def test_link_up_returns_to_idle_and_recording_survives_it() -> None:
    s, _ = run(idle(), LinkLost(), ButtonPressed(), CueFinished(Cue.LEAVE_MESSAGE), ButtonPressed(),
               CueFinished(Cue.RECORDING_TONE), VoiceStarted())
    s, fx = run(s, LinkUp())
    assert s.phase is Phase.RECORDING_MESSAGE and s.online and fx == []
    s, _ = run(s, VoiceStopped(), RecordingStored("m"))
    assert s.phase is Phase.IDLE


def test_reopen_a_session_lost_to_the_room_then_go_on_as_after_a_press() -> None:
    """A room failure (a server restarting) in a conversation: a fresh session shortly, not the offline path."""
    s, _ = run(idle(), ButtonPressed(), SessionOpened("s"), VoiceStarted())
    assert s.publishing
    s, fx = run(s, LinkLost("disconnected by the SDK"))
    assert s.phase is Phase.CONNECTING and s.online and s.reopen_wait and not s.publishing
    assert fx[:3] == [StopPublishing(), ClearPlayback(), CloseSession()]
    assert StartTimer(Timer.REOPEN, 0.5) in fx and ShowPattern("connecting") in fx
    assert not any(isinstance(e, (PlayCue, OpenSession, EndTurn)) for e in fx)  # nothing said, nothing sent
    s, fx = run(s, SessionClosed("closed"))  # the lost session's close: still waiting
    assert s.phase is Phase.CONNECTING and s.reopen_wait and fx == []
    s, fx = run(s, TimerExpired(Timer.REOPEN))
    assert fx == [OpenSession(), StartTimer(Timer.MAX_SESSION, 300.0)] and not s.reopen_wait
    # The visitor still holds the button: the fresh session goes live at once, as after a press.
    s, fx = run(s, SessionOpened("s2"))
    assert s.phase is Phase.LISTENING and s.publishing and BeginTurn() in fx


def test_reopen_backs_off_and_goes_offline_when_the_attempts_are_used_up() -> None:
    policy = Policy(reopen_attempts=3, reopen_delay_seconds=1.0, reopen_max_delay_seconds=3.0)
    s, _ = run(KioskState(policy=policy, phase=Phase.IDLE), ButtonPressed(), ButtonReleased())
    delays = []
    for _ in range(3):
        s, fx = run(s, LinkLost("cannot connect"))
        delays += [e.seconds for e in fx if isinstance(e, StartTimer) and e.name is Timer.REOPEN]
        s, _ = run(s, TimerExpired(Timer.REOPEN))
    assert delays == [1.0, 2.0, 3.0]
    s, fx = run(s, LinkLost("cannot connect"))
    assert s.phase is Phase.OFFLINE and not s.online and s.reopens == 0
    assert PlayCue(Cue.OFFLINE) in fx and PlayCue(Cue.LEAVE_MESSAGE) in fx
    # The next visitor's session has the whole budget again.
    s, _ = run(s, ButtonPressed(Button.CANCEL), LinkUp(), ButtonPressed(), LinkLost("x"))
    assert s.phase is Phase.CONNECTING and s.reopens == 1


def test_no_reopen_for_a_refusal_a_missing_agent_or_an_idle_kiosk() -> None:
    connecting, _ = run(idle(), ButtonPressed())
    for event in (ApiRefused(RefusalReason.UNREACHABLE), LinkLost("no agent", transient=False)):
        s, fx = run(connecting, event)
        assert s.phase is Phase.OFFLINE and not any(isinstance(e, StartTimer) for e in fx), event
    s, _ = run(idle(), LinkLost("x"))
    assert s.phase is Phase.OFFLINE
    s, _ = run(KioskState(policy=Policy(reopen_attempts=0), phase=Phase.IDLE), ButtonPressed(), LinkLost("x"))
    assert s.phase is Phase.OFFLINE


def test_cancel_or_a_refusal_while_waiting_to_reopen_stops_it() -> None:
    waiting, _ = run(idle(), ButtonPressed(), SessionOpened("s"), LinkLost("x"))
    s, fx = run(waiting, ButtonPressed(Button.CANCEL))
    assert s.phase is Phase.IDLE and CancelTimer(Timer.REOPEN) in fx and s.reopens == 0 and not s.reopen_wait
    s, fx = run(waiting, TimerExpired(Timer.REOPEN), ApiRefused(RefusalReason.MAINTENANCE))
    assert s.phase is Phase.OFFLINE and s.offline_reason is OfflineReason.MAINTENANCE
    # A late session while waiting is not ours: closed, and the fresh one still follows.
    s, fx = run(waiting, SessionOpened("late"))
    assert fx == [CloseSession()] and s.phase is Phase.CONNECTING and s.reopen_wait


@pytest.mark.parametrize("mode", [InteractionMode.TAP_TO_TALK, InteractionMode.OPEN_MIC])
def test_a_tap_while_a_lost_conversation_comes_back_does_not_end_it(mode: InteractionMode) -> None:
    """Hands-free, a tap ends a session the visitor opened, even while it connects; not the fresh session that
    brings a lost one back (the visitor taps because the answer stopped: "I am still here")."""
    s, fx = run(idle(mode), ButtonPressed(), ButtonReleased(), ButtonPressed())
    assert s.phase is Phase.IDLE and CloseSession() in fx  # the visitor's own connect: the tap ends it
    waiting, _ = run(idle(mode), ButtonPressed(), ButtonReleased(), SessionOpened("s"), LinkLost("x"))
    s, fx = run(waiting, ButtonPressed(), ButtonReleased())
    assert s.phase is Phase.CONNECTING and s.reopen_wait and fx == []
    s, fx = run(s, TimerExpired(Timer.REOPEN), ButtonPressed(), ButtonReleased())
    assert s.phase is Phase.CONNECTING and fx == [OpenSession(), StartTimer(Timer.MAX_SESSION, 300.0)]
    s, fx = run(s, SessionOpened("s2"), ButtonPressed())
    assert s.phase is Phase.IDLE and CloseSession() in fx  # once it is open, a tap ends it as ever
    s, fx = run(waiting, ButtonPressed(Button.CANCEL))
    assert s.phase is Phase.IDLE and CancelTimer(Timer.REOPEN) in fx  # the cancel button still ends it


def test_route_change_keeps_the_session_and_sets_barge_in_policy() -> None:
    s, _ = run(idle(InteractionMode.TAP_TO_TALK, verified=True), ButtonPressed(), SessionOpened("s"))
    s, fx = run(s, RouteChanged(Route.HEADSET, echo_path_verified=False))
    assert s.phase is Phase.LISTENING and fx == [] and not s.voice_barge_in
    s, fx = run(s, RouteChanged(Route.NONE, echo_path_verified=False))
    assert s.phase is Phase.ERROR and CloseSession() in fx
    s, fx = run(s, TimerExpired(Timer.ERROR_CLEAR))
    assert s.phase is Phase.ERROR  # still no audio route
    s, fx = run(s, RouteChanged(Route.ARRAY, echo_path_verified=True))
    assert s.phase is Phase.IDLE and s.voice_barge_in


def test_error_clears_after_its_timer_to_offline_when_link_is_down() -> None:
    s, fx = run(idle(), ErrorOccurred("cue_failed", "x"))
    assert StartTimer(Timer.ERROR_CLEAR, 10.0) in fx
    s, _ = run(s, LinkLost())
    s, fx = run(s, TimerExpired(Timer.ERROR_CLEAR))
    assert s.phase is Phase.OFFLINE


# ------------------------------------------------------------------------------------ manual turns
def test_push_to_talk_gives_the_agent_its_turns() -> None:
    """The gate is the turn: start_turn as the microphone goes live, end_turn after speech, cancel_turn without."""
    s, fx = run(idle(), ButtonPressed(), SessionOpened("s"))
    assert fx.index(BeginTurn()) < fx.index(StartPublishing()) and s.turn_open
    s, fx = run(s, ButtonReleased())  # nothing said: the turn is dropped, no answer is asked for
    assert fx[:2] == [StopPublishing(), EndTurn(commit=False)] and not s.turn_open and s.phase is Phase.LISTENING
    s, fx = run(s, ButtonPressed(), VoiceStarted())
    assert BeginTurn() in fx and s.turn_open
    s, fx = run(s, VoiceStopped())  # a pause while the button is held: the turn stays open
    assert fx == [] and s.turn_open
    s, fx = run(s, ButtonReleased())
    assert fx[:2] == [StopPublishing(), EndTurn(commit=True)] and s.phase is Phase.THINKING


def test_leaving_the_session_while_talking_sends_no_end_turn() -> None:
    s, _ = run(idle(), ButtonPressed(), SessionOpened("s"), VoiceStarted())
    s, fx = run(s, ButtonPressed(Button.CANCEL))
    assert CloseSession() in fx and not any(isinstance(e, EndTurn) for e in fx) and not s.turn_open


@pytest.mark.parametrize("mode", [InteractionMode.TAP_TO_TALK, InteractionMode.OPEN_MIC])
def test_hands_free_keeps_the_agents_own_turns_unless_told(mode: InteractionMode) -> None:
    s, fx = run(idle(mode), ButtonPressed(), ButtonReleased(), SessionOpened("s"), VoiceStarted(), VoiceStopped())
    assert not any(isinstance(e, BeginTurn | EndTurn) for e in fx)
    s, fx = run(idle(mode, turns=TurnDetection.MANUAL), ButtonPressed(), ButtonReleased(), SessionOpened("s"),
                VoiceStarted())
    assert fx.index(BeginTurn()) < fx.index(StartPublishing())
    s, fx = run(s, VoiceStopped())
    assert EndTurn(commit=True) in fx and s.phase is Phase.THINKING


def test_turns_agent_never_sends_turns() -> None:
    s, fx = run(idle(turns=TurnDetection.AGENT), ButtonPressed(), SessionOpened("s"), VoiceStarted(),
                ButtonReleased())
    assert s.phase is Phase.THINKING and not any(isinstance(e, BeginTurn | EndTurn) for e in fx)


# ------------------------------------------------------------------------------------ tools
def _speaking(**policy: object) -> KioskState:
    s, _ = run(idle(**policy), ButtonPressed(), SessionOpened("s"), VoiceStarted(), ButtonReleased(),
               AgentStateChanged(AgentState.SPEAKING), PlaybackStarted())
    assert s.phase is Phase.SPEAKING and s.agent_busy
    return s


def test_a_running_tool_holds_the_session_open() -> None:
    s, _ = run(idle(), ButtonPressed(), SessionOpened("s"), VoiceStarted(), ButtonReleased())
    s, fx = run(s, ToolStarted(Tool.CALL_STAFF))
    assert s.tool_running and fx == [ShowPattern("tool")]
    s, fx = run(s, TimerExpired(Timer.IDLE_END))  # silence while the tool runs is not the end
    assert s.phase is Phase.THINKING and fx == []
    s, fx = run(s, ToolFinished(Tool.CALL_STAFF))
    assert StartTimer(Timer.IDLE_END, 20.0) in fx and ShowPattern("thinking") in fx and not s.tool_running
    s, fx = run(s, TimerExpired(Timer.IDLE_END))  # an agent that then says nothing still ends the session
    assert s.phase is Phase.IDLE and CloseSession() in fx


def test_a_tool_between_two_parts_of_an_answer_shows_and_keeps_the_session() -> None:
    s, _ = run(_speaking(), ToolStarted(Tool.KIOSK_STATUS))
    assert pattern_key(s) == "tool"
    s, fx = run(s, PlaybackFinished(), AgentStateChanged(AgentState.THINKING))  # the answer pauses for the tool
    assert s.phase is Phase.LISTENING and pattern_key(s) == "tool"
    s, fx = run(s, TimerExpired(Timer.IDLE_END))
    assert s.phase is Phase.LISTENING and fx == []
    s, fx = run(s, ToolFinished(Tool.KIOSK_STATUS), AgentStateChanged(AgentState.SPEAKING), PlaybackStarted())
    assert s.phase is Phase.SPEAKING and pattern_key(s) == "speaking"


def test_hands_free_no_speech_waits_for_a_tool() -> None:
    s, _ = run(idle(InteractionMode.TAP_TO_TALK), ButtonPressed(), ButtonReleased(), SessionOpened("s"),
               ToolStarted(Tool.KIOSK_STATUS))
    s, fx = run(s, TimerExpired(Timer.NO_SPEECH))
    assert s.phase is Phase.LISTENING and fx == []


def test_take_message_hands_over_once_the_agent_has_finished() -> None:
    s, fx = run(_speaking(), MessageRequested(NOTE))
    assert s.handover is Handover.MESSAGE and StartTimer(Timer.HANDOVER, 10.0) in fx
    s, fx = run(s, AgentStateChanged(AgentState.LISTENING))  # its last words are still coming out
    assert s.phase is Phase.SPEAKING and fx == []
    s, fx = run(s, PlaybackFinished())
    assert s.phase is Phase.RECORDING_MESSAGE and s.online and s.message is MessageStep.TONE
    assert CloseSession() in fx and fx[-2:] == [PlayCue(Cue.RECORDING_TONE), ShowPattern("recording_message")]
    s, fx = run(s, CueFinished(Cue.RECORDING_TONE), VoiceStarted(), VoiceStopped())
    assert StartRecording() in fx and StopRecording(keep=True, note=NOTE) in fx and s.message_note is None
    s, fx = run(s, RecordingStored("m"))
    assert PlayCue(Cue.MESSAGE_STORED) in fx and s.phase is Phase.IDLE  # online: back to idle


def test_take_message_waits_through_a_pause_in_the_answer() -> None:
    """The agent pauses (the speaker runs dry) but is still busy: the handover waits for its listening state."""
    s, _ = run(_speaking(), MessageRequested(NOTE), PlaybackFinished())
    assert s.phase is Phase.LISTENING and s.handover is Handover.MESSAGE
    s, _ = run(s, AgentStateChanged(AgentState.SPEAKING), PlaybackStarted())
    assert s.phase is Phase.SPEAKING
    s, _ = run(s, PlaybackFinished(), AgentStateChanged(AgentState.LISTENING))
    assert s.phase is Phase.RECORDING_MESSAGE


def test_the_handover_timer_hands_over_an_agent_that_stays_busy() -> None:
    s, _ = run(_speaking(), MessageRequested(NOTE), PlaybackFinished())
    s, fx = run(s, TimerExpired(Timer.HANDOVER))
    assert s.phase is Phase.RECORDING_MESSAGE and CloseSession() in fx


def test_a_press_cancels_the_handover() -> None:
    s, _ = run(_speaking(), EndRequested())
    s, fx = run(s, ButtonPressed())
    assert s.handover is Handover.NONE and CancelTimer(Timer.HANDOVER) in fx and s.phase is Phase.LISTENING
    s, fx = run(s, VoiceStarted(), ButtonReleased(), AgentStateChanged(AgentState.LISTENING))
    assert s.phase is Phase.THINKING  # the conversation goes on


def test_end_conversation_ends_the_session_after_the_goodbye() -> None:
    s, _ = run(_speaking(), EndRequested())
    s, fx = run(s, PlaybackFinished(), AgentStateChanged(AgentState.LISTENING))
    assert s.phase is Phase.IDLE and CloseSession() in fx and PlayCue(Cue.SESSION_END) in fx


def test_take_message_is_ignored_without_an_operator_key() -> None:
    s, fx = run(_speaking(messages=False), MessageRequested(NOTE))
    assert fx == [] and s.handover is Handover.NONE and s.message_note is None


def test_staff_called_shows_for_a_while_without_hiding_the_live_microphone() -> None:
    s, fx = run(idle(), StaffCalled())
    assert StartTimer(Timer.STAFF_CALLED, 30.0) in fx and ShowPattern("staff_called") in fx
    s, fx = run(s, ButtonPressed(), SessionOpened("s"))
    assert pattern_key(s) == "listening"  # the microphone is live: that shows
    s, fx = run(s, ButtonReleased())
    assert pattern_key(s) == "staff_called"
    s, fx = run(s, TimerExpired(Timer.STAFF_CALLED))
    assert fx == [ShowPattern("listening")]


# ------------------------------------------------------------------------------------ docs table
def _representatives(mode: InteractionMode) -> list[tuple[str, KioskState]]:
    base = idle(mode)
    listening, _ = run(base, ButtonPressed(), SessionOpened("s"), VoiceStarted())
    thinking, _ = run(listening, VoiceStopped(), ButtonReleased())
    speaking, _ = run(thinking, AgentStateChanged(AgentState.SPEAKING), PlaybackStarted())
    offline, _ = run(base, LinkLost())
    offered, _ = run(offline, ButtonPressed(), ButtonReleased(), CueFinished(Cue.LEAVE_MESSAGE))
    recording, _ = run(offered, ButtonPressed(), ButtonReleased(), CueFinished(Cue.RECORDING_TONE),
                       VoiceStarted())
    saving, _ = run(recording, VoiceStopped())
    error, _ = run(base, ErrorOccurred("e"))
    verified = [("speaking (verified echo path)", replace(speaking, echo_path_verified=True))
                ] if mode is not InteractionMode.PUSH_TO_TALK else []
    tool, _ = run(thinking, ToolStarted(Tool.KIOSK_STATUS))
    handover, _ = run(speaking, MessageRequested(NOTE), AgentStateChanged(AgentState.LISTENING))
    reopening, _ = run(speaking, LinkLost())
    return [
        ("starting", initial_state(Policy(mode=mode))), ("idle", base), ("connecting", run(base, ButtonPressed())[0]),
        ("listening (talking)", listening), ("thinking", thinking), ("thinking (tool running)", tool),
        ("speaking", speaking), *verified, ("speaking (take_message asked, last words playing)", handover),
        ("connecting (room lost, fresh session in a moment)", reopening),
        ("offline", offline),
        ("offline (message offered)", offered), ("recording_message (recording)", recording),
        ("recording_message (saving)", saving), ("error", error),
    ]


TABLE_EVENTS: list[Event] = [
    Started(), ButtonPressed(), ButtonReleased(), ButtonHeld(), ButtonPressed(Button.CANCEL), VoiceStarted(),
    VoiceStopped(), SessionOpened("s"), SessionClosed(), ApiRefused(RefusalReason.MAINTENANCE),
    AgentStateChanged(AgentState.SPEAKING), AgentStateChanged(AgentState.LISTENING), PlaybackStarted(),
    PlaybackFinished(), CueFinished(Cue.LEAVE_MESSAGE), CueFinished(Cue.RECORDING_TONE), LinkUp(),
    LinkUp(proven=True), LinkLost(), LinkLost(transient=False), DeviceLost(), DeviceFound(),
    RouteChanged(Route.HEADSET, False), RouteChanged(Route.NONE, False),
    *(TimerExpired(t) for t in Timer), RecordingStored("m"), RecordingFailed("x"), ErrorOccurred("e"),
    # EndRequested behaves as MessageRequested up to the handover, and StaffCalled the same in every state (it
    # starts the staff_called timer): docs/behaviour.md says so in words.
    ToolStarted(Tool.KIOSK_STATUS), ToolFinished(Tool.KIOSK_STATUS), MessageRequested(NOTE),
]


def _fmt_event(event: Event) -> str:
    name = type(event).__name__
    detail = {ButtonPressed: "button", ButtonReleased: "button", ButtonHeld: "button", AgentStateChanged: "state",
              ApiRefused: "reason", CueFinished: "cue", TimerExpired: "name", RouteChanged: "route"}
    field = detail.get(type(event))
    if isinstance(event, LinkLost) and not event.transient:
        return "LinkLost(not transient)"
    if isinstance(event, LinkUp) and event.proven:
        return "LinkUp(proven)"
    return f"{name}({getattr(event, field)})" if field else name


def _fmt_effect(effect: Effect) -> str:
    match effect:
        case PlayCue(name=name):
            return f"cue {name.value}"
        case StartTimer(name=name, seconds=seconds):
            return f"start {name.value} ({seconds:g} s)"
        case CancelTimer(name=name):
            return f"cancel {name.value}"
        case StopRecording(keep=keep, note=note):
            if not keep:
                return "StopRecording(discard)"
            return "StopRecording(keep, note)" if note else "StopRecording(keep)"
        case EndTurn(commit=commit):
            return "EndTurn(commit)" if commit else "EndTurn(cancel)"
        case SpeakStatus():
            return "SpeakStatus"
    return type(effect).__name__


_END_SESSION = "ClearPlayback, CloseSession, cancel max_session, cancel no_speech, cancel idle_end"


def _rows(mode: InteractionMode) -> list[str]:
    rows = []
    for label, state in _representatives(mode):
        for event in TABLE_EVENTS:
            t = step(state, event)
            effects = [_fmt_effect(e) for e in t.effects if not isinstance(e, ShowPattern)]
            if t.state.phase is state.phase and not effects:
                continue
            nxt = t.state.phase.value if t.state.phase is not state.phase else "="
            text = (", ".join(effects) or "-").replace(_END_SESSION, "**end session**")
            rows.append(f"| {label} | {_fmt_event(event)} | {nxt} | {text} |")
    return rows


def behaviour_table(mode: InteractionMode) -> str:
    """The transition table in docs/behaviour.md: all of push-to-talk; for the others, the rows that differ."""
    rows = _rows(mode)
    if mode is not InteractionMode.PUSH_TO_TALK:
        ptt = set(_rows(InteractionMode.PUSH_TO_TALK))
        rows = [r for r in rows if r not in ptt]
    header = ["| state | event | next state | effects (in order; the LED pattern follows the state) |",
              "| --- | --- | --- | --- |"]
    return "\n".join(header + rows) + "\n"


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_docs_transition_table_is_current(mode: InteractionMode) -> None:
    from pathlib import Path

    doc = (Path(__file__).parents[2] / "docs" / "behaviour.md").read_text()
    assert behaviour_table(mode) in doc, (
        f"docs/behaviour.md is out of date for {mode.value}: regenerate the table with "
        f"tests.unit.test_state.behaviour_table(InteractionMode.{mode.name})")


# ------------------------------------------------------------------------------ messages off (no operator key)
def test_without_an_operator_key_the_reason_is_said_and_no_message_offered() -> None:
    s, fx = run(idle(messages=False), ButtonPressed(), ButtonReleased(), ApiRefused(RefusalReason.MAINTENANCE))
    assert s.phase is Phase.OFFLINE and s.message is MessageStep.NONE
    assert fx[-2:] == [PlayCue(Cue.MAINTENANCE), ShowPattern("maintenance")]
    s, fx = run(s, CueFinished(Cue.MAINTENANCE), ButtonPressed())
    assert fx == [PlayCue(Cue.MAINTENANCE)] and s.message is MessageStep.NONE  # each press says why again
    s, fx = run(s, ButtonReleased(), ButtonPressed())
    assert fx == [PlayCue(Cue.MAINTENANCE)] and s.phase is Phase.OFFLINE


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_without_an_operator_key_nothing_is_ever_recorded(
        mode: InteractionMode, _searches: Callable[[Policy], _Search]) -> None:
    """Over every reachable state and event: no offer, no recording, so no voice to store in the clear."""
    search = _searches(Policy(mode=mode, messages=False, reopen_attempts=SEARCH_REOPEN_ATTEMPTS))
    assert not search.failures, "\n\n".join(search.failures)
    assert Phase.RECORDING_MESSAGE not in {s.phase for s in search.states}


def test_the_policy_offers_messages_only_with_a_recipient_key() -> None:
    from kiosk.fallback.sealing import encode_key, generate_keypair
    from kiosk.settings import InteractionSettings, SpoolSettings

    interaction = InteractionSettings()
    assert not Policy.from_settings(interaction, SpoolSettings()).messages
    key = encode_key(generate_keypair()[1])
    assert Policy.from_settings(interaction, SpoolSettings(recipient_public_key=key)).messages
    assert Policy.from_settings(interaction).messages  # no spool settings: the table's default
