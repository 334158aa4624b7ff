"""Barge-ins as the kiosk can judge them: how often the agent was interrupted, and which were likely wrong.

The kiosk cannot know what a visitor meant; it can see what happened around an interruption. ``BargeInJudge``
watches the controller's steps (the app feeds it every transition with the loop time) and counts:

- a **barge-in**: a step out of ``speaking`` that interrupts the agent (``InterruptAgent``), by ``voice`` (a
  ``VoiceStarted`` with voice barge-in on) or by ``press`` (the talk button, on every route);
- a **likely false** barge-in: one by voice after which the visitor's speech within ``FALSE_WINDOW_SECONDS``
  adds up to less than ``MIN_TURN_SPEECH_SECONDS`` (from the voice events' own times). A real interruption
  ("wait, where is ...") goes on speaking; echo the canceller let through, a cough or a door is over at once.
  It cannot tell a visitor who said one short word ("stop") from a blip; such a word counts as likely false;
- a **likely missed** barge-in: a press that interrupts the agent within ``MISSED_WINDOW_SECONDS`` of a visitor
  voice onset that did not interrupt it: a ``VoiceStarted`` while the agent spoke without voice barge-in (push
  to talk, the headset, an unverified echo path), or at least ``MIN_REJECTED_FRAMES`` of speech-like sound that
  the capture chain's double-talk decision held back as the agent's echo (its ``echo_rejected_frames``, sampled
  with ``note_echo_rejected``). A visitor who spoke over the agent and, unheard, pressed is the pattern. Echo held
  back for its own sake just before an unrelated press also matches, and a visitor who gave up without pressing
  is not seen at all.

Pure and clock-free: times are passed in as seconds. docs/fleet.md ("Watching") states these definitions.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from kiosk.effects import Effect, InterruptAgent
from kiosk.events import Button, ButtonPressed, Event, VoiceStarted, VoiceStopped
from kiosk.state import KioskState, Phase

FALSE_WINDOW_SECONDS = 3.0
MIN_TURN_SPEECH_SECONDS = 0.5
MISSED_WINDOW_SECONDS = 2.0
MIN_REJECTED_FRAMES = 20  # 200 ms of 10 ms frames
_SAMPLES = 64  # echo-rejection samples kept (the app samples a few times a second)


@dataclass
class BargeInCounts:
    """Running totals (the metrics are raised to them)."""

    voice: int = 0
    press: int = 0
    likely_false: int = 0
    likely_missed: int = 0


@dataclass
class _Pending:
    """A voice barge-in whose window is still open."""

    at_seconds: float
    speech_seconds: float = 0.0


class BargeInJudge:
    """Counts barge-ins and judges the likely false and likely missed ones (see the module docstring)."""

    def __init__(self) -> None:
        self.counts = BargeInCounts()
        self._pending: list[_Pending] = []
        self._voice_since: float | None = None  # VoiceStarted.at_seconds of the speech running now
        self._unanswered_onset: float | None = None  # loop time of the last onset that did not interrupt
        self._rejected: deque[tuple[float, int]] = deque(maxlen=_SAMPLES)

    def note_echo_rejected(self, total_frames: int, now_seconds: float) -> None:
        """A sample of the capture chain's running ``echo_rejected_frames`` (a new chain starts again at 0)."""
        if self._rejected and total_frames < self._rejected[-1][1]:
            self._rejected.clear()
        self._rejected.append((now_seconds, total_frames))

    def _rejected_within(self, now_seconds: float) -> int:
        """Echo-rejected frames counted in the ``MISSED_WINDOW_SECONDS`` before ``now_seconds``."""
        if not self._rejected:
            return 0
        latest = self._rejected[-1][1]
        before = next((total for at, total in reversed(self._rejected)
                       if at <= now_seconds - MISSED_WINDOW_SECONDS), None)
        if before is None:  # no sample that old: count from the oldest kept (a shorter look back)
            before = self._rejected[0][1]
        return latest - before

    def observe(self, old: KioskState, event: Event, effects: Sequence[Effect], now_seconds: float) -> None:
        """One controller step: the state before, the event, the step's effects, and the loop time."""
        interrupted = old.phase is Phase.SPEAKING and any(isinstance(e, InterruptAgent) for e in effects)
        if isinstance(event, VoiceStarted):
            self._voice_since = event.at_seconds
            if old.phase is Phase.SPEAKING and not interrupted:
                self._unanswered_onset = now_seconds
        elif isinstance(event, VoiceStopped):
            if self._voice_since is not None:
                self._credit(self._voice_since, event.at_seconds)
            self._voice_since = None
        if interrupted and isinstance(event, VoiceStarted):
            self.counts.voice += 1
            self._pending.append(_Pending(now_seconds))
        elif interrupted and isinstance(event, ButtonPressed) and event.button is Button.TALK:
            self.counts.press += 1
            onset = self._unanswered_onset
            if (onset is not None and now_seconds - onset <= MISSED_WINDOW_SECONDS) or \
                    self._rejected_within(now_seconds) >= MIN_REJECTED_FRAMES:
                self.counts.likely_missed += 1
            self._unanswered_onset = None
        self.poll(now_seconds)

    def _credit(self, start_seconds: float, end_seconds: float) -> None:
        """Add a run of speech to every open window it overlaps."""
        for pending in self._pending:
            # Only runs from the one that caused the barge-in on reach here; that one began a little before it
            # (the onset look-back) and counts from its start.
            window_end = pending.at_seconds + FALSE_WINDOW_SECONDS
            pending.speech_seconds += max(0.0, min(end_seconds, window_end) - start_seconds)

    def poll(self, now_seconds: float) -> None:
        """Judge the voice barge-ins whose window has closed by ``now_seconds``."""
        still: list[_Pending] = []
        for pending in self._pending:
            window_end = pending.at_seconds + FALSE_WINDOW_SECONDS
            running = 0.0
            if self._voice_since is not None:
                running = max(0.0, min(now_seconds, window_end) - self._voice_since)
            if pending.speech_seconds + running >= MIN_TURN_SPEECH_SECONDS:
                continue  # the visitor went on speaking: a real interruption
            if now_seconds >= window_end:
                self.counts.likely_false += 1
                continue
            still.append(pending)
        self._pending = still
