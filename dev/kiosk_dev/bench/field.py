"""``kiosk bench field``: scripted visitors on the full local stack while faults fire at random, on a loaded machine.

What runs (all on this machine, the kiosk side in the private network namespace):

- the local stack (``kiosk_dev.stack``: the real livekit-server, the stand-in session API and agents), the
  private PulseAudio server with the virtual devices and the virtual room, the stand-in message endpoint in
  the server's namespace (delivery needs the link, as in the field);
- the kiosk in a process of its own (``kiosk_dev.kiosk_process``: the same ``kiosk.app.Kiosk`` the service
  runs, with the virtual panel on a unix socket and a trace of its steps), started, watched and restarted
  by ``kiosk_dev.supervisor`` with the restart settings read from systemd/kiosk.service;
- a CPU hog on every core (busy processes at the bench's own priority; the kiosk gets the unit's ``Nice=``
  relative to that);
- a scripted visitor: asks questions through the virtual panel and the room (or the headset microphone when
  the headset is in), sometimes a follow-up, ends with the cancel button; meets an offline kiosk as a visitor
  would and leaves a message;
- a fault injector: a seeded shuffle of the fault kinds (``FAULTS``), one at a time, at seeded random gaps;
  faults that belong to a moment (mid-answer, during a recording, during a delivery) wait for it (bounded).

Afterwards every fault is restored, the kiosk must come back, every message a visitor was told was saved must
reach the endpoint exactly once, and a last question must be answered. The figures (``FieldResult``) come
from the kiosk's trace (its controller steps, with monotonic times), the supervisor's record of each start,
the endpoint's record of what it stored, and psutil samples of the kiosk process.

Definitions used in the report:

- *usable*: the kiosk is idle (online, a device open, waiting for a visitor), or in a conversation whose room
  is up (not reconnecting, not lost and being opened afresh), and stays so for ``STABLE_SECONDS``; *fault ->
  usable* runs from the fault's injection, *clear -> usable* from its end;
- *session lost*: a session (connecting .. speaking) that ended other than by the visitor's cancel or a
  session timer; its cause is the event that ended it, or the process's end;
- *exchange completed*: after the press, the agent began speaking, finished, and the answer's playback ran
  out, with the session still open;
- *message stored*: the kiosk confirmed it to the visitor (``RecordingStored``); *delivered*: the endpoint
  stored it; *lost*: stored but not delivered by the end of the drain; *duplicated*: stored twice at the
  endpoint (a re-sent upload the endpoint recognised is counted as re-sent, not duplicated).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiosk.events import Button
from kiosk.settings import Settings
from kiosk.state import SESSION_PHASES as STATE_SESSION_PHASES
from kiosk_dev.bench import BenchSection, TargetCheck

_LOGGER = logging.getLogger(__name__)

SECTION_HEADING = "## Measured"
SLOW_CALLBACKS_SHOWN = 8  # the loop callbacks that most often used 10 ms of CPU or more, in the report
ROOT = Path(__file__).resolve().parents[3]
UNIT_FILE = ROOT / "systemd" / "kiosk.service"
SESSION_PHASES = frozenset(phase.value for phase in STATE_SESSION_PHASES)  # as the trace names them
STABLE_SECONDS = 1.0  # idle this long counts as usable (a fault's DeviceLost may still be on its way)
ENDPOINT_PORT = 8097
OPERATOR_KEY = "operator.key"  # in the run directory: the private half the stand-in endpoint opens messages with
SAMPLE_SECONDS = 5.0
WARMUP_SECONDS = 60.0  # resource slopes skip each process's start-up
MIB = 1024 * 1024

# Every fault kind, with what it does (the report prints these).
FAULTS: dict[str, str] = {
    "capture_stall": "the sound server stopped (SIGSTOP) for 0.5-3 s, mid-conversation when one is open",
    "playback_underrun": "the agent's audio stops arriving for 0.3-1.5 s mid-answer (the stack's backend "
                         "stopped): the kiosk's playout buffer runs dry",
    "link_down_2s": "the namespace's link down for 2 s",
    "link_down_20s": "the namespace's link down for 20 s",
    "link_down_120s": "the namespace's link down for 120 s",
    "packet_loss": "10-30 % of packets dropped both ways for 10-20 s (iptables statistic match)",
    "delay_burst": "a 64 kbit/s bottleneck with up to 400 ms of queue both ways for 8-15 s (tbf)",
    "api_5xx": "the session API answers 503 for 10-30 s",
    "api_429": "the session API answers 429 with Retry-After 1-5 s for 10-30 s",
    "api_402": "the session API answers 402 (credits exhausted) for 20-40 s",
    "maintenance": "the catalog says maintenance for 10-30 s",
    "api_malformed": "the session API answers 201 with a malformed or non-JSON body for 10-30 s",
    "livekit_restart": "livekit-server killed (SIGKILL) and started again 0-10 s later",
    "agent_leaves": "the agent leaves the room mid-answer",
    "headset_plug": "the headset plugged in mid-answer, unplugged 15-30 s later",
    "array_removed": "the microphone array removed for 2-10 s and returned",
    "kill_idle": "the kiosk SIGKILLed while idle; restarted as systemd would",
    "kill_mid_answer": "the kiosk SIGKILLed mid-answer",
    "kill_recording": "the kiosk SIGKILLed while a visitor records a message (the API refusing meanwhile)",
    "kill_delivery": "the kiosk SIGKILLed while a stored message is being delivered (the endpoint's "
                     "answer held back 3 s)",
}
QUICK_FAULTS = ("capture_stall", "link_down_2s", "api_402", "kill_mid_answer", "kill_delivery", "headset_plug",
                "agent_leaves", "playback_underrun")
# The targets (reported, never asserted).
STALL_FAULTS = ("capture_stall", "playback_underrun")
SHORT_LINK_FAULTS = ("link_down_2s",)

# Short enough that the button is held well under interaction.status_hold_seconds (a long hold asks for the status).
QUESTIONS = (
    "Where is the registration desk?",
    "When does the next demonstration start?",
    "Where can I charge my phone?",
    "What time is the keynote?",
)
MESSAGES = (
    "Please ask the sales team to call me back about the order.",
    "I was here at noon and will come back tomorrow morning.",
)


# ------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class FieldConfig:
    """One run: how long, which faults, how far apart, how loaded."""

    duration_seconds: float
    seed: int = 1
    faults: tuple[str, ...] = tuple(FAULTS)
    gap_seconds: tuple[float, float] = (20.0, 60.0)
    min_rounds: int = 0  # go on past the duration until every fault kind has fired this many times
    load_processes: int = 0  # busy processes; 0 means none
    recover_limit_seconds: float = 240.0  # longer than this after a fault clears: stuck
    drain_seconds: float = 180.0
    run_dir: Path | None = None  # keep the kiosk's log, trace and spool here (default: a temporary directory)

    @classmethod
    def quick(cls, **overrides: Any) -> FieldConfig:
        """A few minutes with the faults that matter most (the test suite's run)."""
        fields: dict[str, Any] = {"duration_seconds": 150.0, "faults": QUICK_FAULTS, "gap_seconds": (3.0, 8.0),
                                  "min_rounds": 1,
                                  "load_processes": os.cpu_count() or 1, "recover_limit_seconds": 150.0,
                                  "drain_seconds": 120.0}
        fields.update(overrides)
        return cls(**fields)


# ------------------------------------------------------------------------------------------------- trace
@dataclass
class Step:
    """One controller step of the kiosk, from its trace."""

    t: float
    incarnation: int
    event: dict[str, Any]
    old: str
    new: str
    effects: list[dict[str, Any]]

    @property
    def kind(self) -> str:
        """The event's type name."""
        return str(self.event.get("type", ""))


class KioskView:
    """What the bench knows of the kiosk: its steps from the trace, its phase, loop lag and counters."""

    def __init__(self, copy_to: Path | None = None) -> None:
        self._copy = copy_to.open("ab") if copy_to is not None else None  # every trace line, for a post-mortem
        self.steps: list[Step] = []
        self.phase: str | None = None  # None while no process is up
        self.phase_since = time.monotonic()
        # The conversation's room is reconnecting, or was lost and a fresh session is on its way: a session
        # phase is not usable meanwhile (the visitor talks to nobody).
        self.room_down = False
        self.serving = False  # usable, or on its way there (TRANSIT_PHASES), with the room up
        self.serving_since = self.phase_since
        self.lag_ms: list[float] = []
        self.slow: list[tuple[float, str]] = []  # loop callbacks that used 10 ms or more of CPU: (ms, what)
        self.stats: dict[int, dict[str, Any]] = {}  # incarnation -> its last counters
        self.changed = asyncio.Event()
        self._buffers: dict[int, bytes] = {}

    def attach(self, fd: int, incarnation: int) -> None:
        """Read a new incarnation's trace from ``fd`` (closed at its end)."""
        os.set_blocking(fd, False)
        self._buffers[fd] = b""
        asyncio.get_running_loop().add_reader(fd, self._readable, fd, incarnation)

    def _readable(self, fd: int, incarnation: int) -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
            self._buffers.pop(fd, None)
            self._set_phase(None, time.monotonic())
            return
        data = self._buffers[fd] + chunk
        *lines, self._buffers[fd] = data.split(b"\n")
        if self._copy is not None and lines:
            self._copy.write(b"".join(line + b"\n" for line in lines))
            self._copy.flush()
        for line in lines:
            with contextlib.suppress(ValueError):
                self._record(json.loads(line), incarnation)

    def _record(self, item: dict[str, Any], incarnation: int) -> None:
        kind = item.get("kind")
        t = float(item["t"])
        if kind == "step":
            step = Step(t, incarnation, item["event"], item["old"], item["new"], item["effects"])
            self.steps.append(step)
            if step.kind == "LinkReconnecting" or (step.kind == "LinkLost" and step.new == "connecting"):
                self.room_down = True
            elif step.kind in ("LinkUp", "SessionOpened") or step.new not in SESSION_PHASES:
                self.room_down = False
            self._set_phase(step.new, t)
        elif kind == "lag":
            self.lag_ms.extend(float(v) for v in item["ms"])
        elif kind == "slow":
            self.slow.append((float(item["ms"]), str(item["what"])))
        elif kind == "stats":
            self.stats[incarnation] = item
        elif kind == "stopped":
            self._set_phase(None, t)

    def close(self) -> None:
        """Close the copy of the trace."""
        if self._copy is not None:
            self._copy.close()
            self._copy = None

    def _set_phase(self, phase: str | None, t: float) -> None:
        if phase != self.phase:
            self.phase = phase
            self.phase_since = t
        if phase is None:
            self.room_down = False
        serving = phase in USABLE_PHASES | TRANSIT_PHASES and not self.room_down
        if serving and not self.serving:
            self.serving_since = t
        self.serving = serving
        self.changed.set()

    @property
    def usable(self) -> bool:
        """In a usable phase with the room up."""
        return self.phase in USABLE_PHASES and not self.room_down

    async def wait(self, condition: Callable[[], bool], timeout_seconds: float) -> bool:
        """Wait until ``condition()`` holds, re-checked at every trace line (False on timeout)."""
        deadline = time.monotonic() + timeout_seconds
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
        return True

    def find(self, kind: str, since: float, predicate: Callable[[Step], bool] = lambda _: True) -> Step | None:
        """The first step of event type ``kind`` at or after ``since``."""
        return next((s for s in self.steps if s.t >= since and s.kind == kind and predicate(s)), None)

    def cue_finished(self, cue: str, since: float) -> Step | None:
        """The step of ``CueFinished(cue)`` at or after ``since``."""
        return self.find("CueFinished", since, lambda s: s.event.get("cue") == cue)


# ------------------------------------------------------------------------------------------------- records
@dataclass
class Exchange:
    """One question the visitor asked."""

    asked: float
    released: float
    completed: bool = False
    ended_by: str | None = None  # what ended the session during the exchange, if not the visitor
    refused: bool = False  # the kiosk answered with its offline fallback instead
    voice_detected: bool = False  # the kiosk's voice detection reported the visitor during the hold
    agent_heard: bool | None = None  # the stand-in agent heard an onset during the hold (from its report)
    agent_answered: bool | None = None  # ... and began sending an answer within 15 s of the release


@dataclass
class MessageAttempt:
    """One message a visitor tried to leave."""

    started: float
    message_id: str | None = None  # set once the kiosk confirmed it (RecordingStored)
    failed: str | None = None


@dataclass
class FaultRecord:
    """One fault: when it was set up, injected and cleared, and when the kiosk was usable again."""

    kind: str
    params: str = ""
    started: float = 0.0  # set-up began (e.g. the API made to refuse before a kill during a recording)
    injected: float = 0.0
    cleared: float = 0.0
    usable: float | None = None  # None: not usable within the limit (stuck)
    moment_reached: bool = True  # a fault that waits for a moment (mid-answer, ...) found it
    setup: bool = False  # ``started`` marks a set-up before the injection (counted as part of the fault)
    heard: list[str] = field(default_factory=list)
    saw: list[str] = field(default_factory=list)

    @property
    def fault_to_usable_seconds(self) -> float | None:
        """Injection -> usable."""
        return self.usable - self.injected if self.usable is not None else None

    @property
    def clear_to_usable_seconds(self) -> float | None:
        """End of the fault -> usable (0 when the kiosk never stopped being usable)."""
        return max(0.0, self.usable - self.cleared) if self.usable is not None else None


@dataclass
class Session:
    """One session as the trace shows it."""

    began: float
    ended: float | None
    opened: bool
    end_event: str
    lost: bool
    cause: str


@dataclass
class Sample:
    """Resources of the kiosk process at one moment."""

    t: float
    incarnation: int
    rss_bytes: int
    fds: int
    threads: int
    cpu_seconds: float


@dataclass
class FieldResult:
    """Everything one run measured (``summarise`` turns it into figures)."""

    config: dict[str, Any]
    unit: dict[str, Any]
    started: float
    ended: float
    exchanges: list[Exchange]
    messages: list[MessageAttempt]
    faults: list[FaultRecord]
    sessions: list[Session]
    incarnations: list[dict[str, Any]]
    unit_failed: bool
    samples: list[Sample]
    lag_ms: list[float]
    endpoint: dict[str, Any]
    final_exchange_completed: bool
    counters: dict[int, dict[str, Any]]
    skipped_faults: dict[str, str]
    load_average: list[float]
    slow_callbacks: list[tuple[float, str]] = field(default_factory=list)  # (CPU ms, what) of long loop callbacks


# ------------------------------------------------------------------------------------------------- rig
class CpuHog:
    """A busy process per requested core, at this process's priority (killed by their own ids)."""

    def __init__(self, processes: int) -> None:
        self._count = processes
        self._processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        """Start the busy processes."""
        for _ in range(self._count):
            self._processes.append(subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                                    stdin=subprocess.DEVNULL))

    def stop(self) -> None:
        """Stop them."""
        for process in self._processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
        self._processes.clear()


class Voice:
    """The visitor's voice: into the room, or into the headset microphone while the headset is plugged in."""

    def __init__(self, pulse: Any, room: Any) -> None:
        self._pulse = pulse
        self.room = room
        self.headset = False
        self._players: list[subprocess.Popen[bytes]] = []

    def say(self, audio: Any) -> float:
        """Speak ``audio`` (16 kHz float) now; returns its length in seconds."""
        from kiosk_dev.pulse import HEADSET_MIC_SINK

        seconds = len(audio) / 16000
        if self.headset:
            pcm = (np.clip(audio, -1, 1) * 32767).astype(np.int16)
            with contextlib.suppress(OSError):
                self._players = [p for p in self._players if p.poll() is None]
                self._players.append(self._pulse.play(HEADSET_MIC_SINK, pcm.tobytes()))
        else:
            with contextlib.suppress(OSError, ValueError, AssertionError):
                self.room.say(audio)  # the room is away while the array is out: the words go nowhere
        return seconds

    def stop(self) -> None:
        """End players still running (by their own ids)."""
        for player in self._players:
            if player.poll() is None:
                player.kill()
            player.wait(timeout=5)


class Endpoint:
    """The stand-in message endpoint in the server's namespace (delivery crosses the link)."""

    def __init__(self, network: Any, private_key: Path) -> None:
        self._network = network
        self._private_key = private_key
        self._process: subprocess.Popen[str] | None = None
        self.url = ""

    def start(self) -> str:
        """Start it; returns the upload URL."""
        argv = [sys.executable, "-m", "kiosk_dev.message_endpoint", "--host", self._network.server_ip,
                "--port", str(ENDPOINT_PORT), "--private-key", str(self._private_key)]
        self._process = subprocess.Popen(self._network.server_command(argv), stdout=subprocess.PIPE, text=True,
                                         stdin=subprocess.DEVNULL)
        assert self._process.stdout is not None
        ready, _, _ = select.select([self._process.stdout], [], [], 30.0)
        if not ready:
            raise RuntimeError("the message endpoint did not start within 30 s")
        self.url = self._process.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError(f"the message endpoint did not start (it printed {self.url!r})")
        return self.url

    def _call(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url.replace("/messages", path), data=data,
                                         method="POST" if body is not None else "GET",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as reply:
            result: dict[str, Any] = json.loads(reply.read())
            return result

    def received(self) -> dict[str, Any]:
        """What it stored (``MessageEndpoint.summary``)."""
        return self._call("/received")

    def script(self, faults: Sequence[str]) -> None:
        """Append faults to its script (``slow_after_store``, ...)."""
        self._call("/script", {"faults": list(faults)})

    def stop(self) -> None:
        """Stop it (by its own id)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None


@dataclass
class Rig:
    """The running parts a fault or the visitor acts on."""

    stack: Any
    pulse: Any
    room: Any
    voice: Voice
    supervisor: Any
    view: KioskView
    panel: Any
    endpoint: Endpoint
    rng: random.Random


def _run_quiet(argv: Sequence[str]) -> None:
    subprocess.run(list(argv), check=True, capture_output=True, text=True, timeout=10)


def tools_missing(kind: str) -> str | None:
    """Why a fault kind cannot run on this machine (None: it can)."""
    if kind == "packet_loss" and shutil.which("iptables") is None:
        return "iptables is not installed"
    if kind == "delay_burst" and shutil.which("tc") is None:
        return "tc (iproute2) is not installed"
    return None


# ------------------------------------------------------------------------------------------------- visitor
class Visitor:
    """Scripted visitors, one after another: questions while the kiosk is idle, a message while it is offline."""

    def __init__(self, rig: Rig, questions: list[Any], messages: list[Any]) -> None:
        self._rig = rig
        self._questions = questions
        self._messages = messages
        self.exchanges: list[Exchange] = []
        self.attempts: list[MessageAttempt] = []
        self.paused = False
        self._until = 0.0

    def stop(self) -> None:
        """The current visitor finishes; no new one comes."""
        self._until = 0.0

    async def run(self, until: float) -> None:
        """Visit until ``until`` (monotonic) or ``stop()``."""
        view = self._rig.view
        self._until = until
        while time.monotonic() < self._until:
            if self.paused:
                await asyncio.sleep(0.5)
                continue
            if view.phase == "idle":
                await self.converse()
            elif view.phase == "offline":
                await self.leave_message()
            else:
                await view.wait(lambda: view.phase in ("idle", "offline"), 5.0)
                continue
            await asyncio.sleep(self._rig.rng.uniform(1.0, 4.0))

    async def _tap(self, button: Button = Button.TALK, hold_seconds: float = 0.2) -> float:
        pressed = time.monotonic()
        panel = self._rig.panel
        await panel.press(button)
        await asyncio.sleep(hold_seconds)
        await panel.release(button)
        return pressed

    async def converse(self) -> Exchange | None:
        """One visitor: a question, maybe a follow-up, then the cancel button. Returns the last exchange."""
        rig = self._rig
        view = rig.view
        exchange: Exchange | None = None
        for turn in range(3):
            if turn and (view.phase not in ("listening", "thinking") or rig.rng.random() < 0.5):
                break
            exchange = await self.ask(rig.rng.choice(self._questions))
            if exchange is None or not exchange.completed:
                break
        if view.phase in SESSION_PHASES:
            await self._tap(Button.CANCEL, 0.15)
            await view.wait(lambda: view.phase not in SESSION_PHASES or view.phase is None, 10.0)
        if view.phase == "offline" and exchange is not None and exchange.refused:
            await self.leave_message(offer_pending=True)
        return exchange

    async def ask(self, audio: Any) -> Exchange | None:
        """Press, say ``audio``, release; wait for the answer (or the end of the session)."""
        rig = self._rig
        view = rig.view
        pressed = time.monotonic()
        fresh = view.phase == "idle"
        if not await rig.panel.press(Button.TALK):
            return None
        # A new session: talk after the start tone (the kiosk's "go ahead"); what is said before it reaches the
        # agent only as far back as the pre-roll. In an open session the microphone goes live at the press.
        if fresh:
            await view.wait(lambda: view.cue_finished("session_start", pressed) is not None
                            or view.phase not in ("idle", "connecting", "listening"), 15.0)
        await asyncio.sleep(0.3)
        seconds = rig.voice.say(audio)
        await asyncio.sleep(seconds + 0.3)
        await rig.panel.release(Button.TALK)
        exchange = Exchange(asked=pressed, released=time.monotonic())
        self.exchanges.append(exchange)

        def answered() -> bool:
            began = view.find("AgentStateChanged", pressed, lambda s: s.event.get("state") == "speaking")
            return began is not None and view.find("PlaybackFinished", began.t) is not None \
                and view.find("AgentStateChanged", began.t, lambda s: s.event.get("state") == "listening") is not None

        def ended() -> Step | None:
            return next((s for s in view.steps if s.t >= pressed and s.old in SESSION_PHASES
                         and s.new not in SESSION_PHASES), None)

        await view.wait(lambda: answered() or ended() is not None or view.phase is None, 45.0)
        exchange.voice_detected = view.find("VoiceStarted", pressed, lambda s: s.t <= exchange.released) is not None
        end = ended()
        exchange.completed = answered() and (end is None or end.t > (view.find("PlaybackFinished", pressed) or end).t)
        if end is not None and not exchange.completed:
            exchange.ended_by = _describe(end)
            exchange.refused = end.new == "offline"
        elif view.phase is None and not exchange.completed:
            exchange.ended_by = "the kiosk process ended"
        return exchange

    async def leave_message(self, offer_pending: bool = False) -> MessageAttempt | None:
        """An offline kiosk: hear the offer (press), press again, speak after the tone."""
        rig = self._rig
        view = rig.view
        since = time.monotonic() - (30.0 if offer_pending else 0.0)
        if not offer_pending:
            since = await self._tap()
        if not await view.wait(lambda: view.cue_finished("leave_message", since) is not None
                               or view.phase != "offline", 30.0) or view.phase != "offline":
            return None
        attempt = MessageAttempt(started=await self._tap())
        self.attempts.append(attempt)
        tone = attempt.started
        if not await view.wait(lambda: view.cue_finished("recording_tone", tone) is not None
                               or view.phase not in ("offline", "recording_message"), 10.0):
            attempt.failed = "no recording tone"
            return attempt
        await asyncio.sleep(0.3)
        seconds = rig.voice.say(rig.rng.choice(self._messages))

        def outcome() -> Step | None:
            return next((s for s in view.steps if s.t >= tone and s.kind in ("RecordingStored", "RecordingFailed")),
                        None)

        await view.wait(lambda: outcome() is not None or view.phase is None, seconds + 20.0)
        result = outcome()
        if result is not None and result.kind == "RecordingStored":
            attempt.message_id = str(result.event.get("message_id"))
            await view.wait(lambda: view.cue_finished("message_stored", result.t) is not None, 15.0)
        else:
            attempt.failed = _describe(result) if result is not None else "no confirmation"
        return attempt


def _describe(step: Step | None) -> str:
    """An event as the report names it: its type and a short reason (never a visitor's words)."""
    if step is None:
        return "-"
    event = step.event
    for key in ("reason", "device", "code", "route", "name", "cue", "button", "state"):
        value = event.get(key)
        if value:
            return f"{step.kind}({str(value).split(':')[0][:60]})"
    return step.kind


# ------------------------------------------------------------------------------------------------- faults
FaultRun = Callable[[Rig, FaultRecord], Awaitable[None]]


async def _moment(rig: Rig, phases: Sequence[str], within_seconds: float) -> bool:
    """Wait (bounded) until the kiosk is in one of ``phases``."""
    view = rig.view
    return await view.wait(lambda: view.phase in phases, within_seconds)


async def _capture_stall(rig: Rig, record: FaultRecord) -> None:
    record.moment_reached = await _moment(rig, ("listening", "thinking", "speaking"), 30.0)
    seconds = rig.rng.uniform(0.5, 3.0)
    record.params = f"{seconds:.1f} s"
    pid = rig.pulse.pid
    record.injected = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
        record.cleared = time.monotonic()


async def _playback_underrun(rig: Rig, record: FaultRecord) -> None:
    record.moment_reached = await _moment(rig, ("speaking",), 60.0)
    seconds = rig.rng.uniform(0.3, 1.5)
    record.params = f"{seconds:.1f} s"
    pid = rig.stack.backend_pid
    record.injected = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
        record.cleared = time.monotonic()


def _link_down(seconds: float) -> FaultRun:
    async def run(rig: Rig, record: FaultRecord) -> None:
        record.moment_reached = await _moment(rig, ("listening", "thinking", "speaking"), 30.0)
        record.params = f"{seconds:.0f} s"
        network = rig.stack.network
        record.injected = time.monotonic()
        await asyncio.to_thread(network.set_link, False)
        try:
            await asyncio.sleep(seconds)
        finally:
            await asyncio.to_thread(network.set_link, True)
            record.cleared = time.monotonic()
    return run


def _iptables_loss(interface: str, probability: float, add: bool) -> None:
    for chain, direction in (("INPUT", "-i"), ("OUTPUT", "-o")):
        _run_quiet(["iptables", "-I" if add else "-D", chain, direction, interface, "-m", "statistic",
                    "--mode", "random", "--probability", f"{probability:.2f}", "-j", "DROP"])


async def _packet_loss(rig: Rig, record: FaultRecord) -> None:
    record.moment_reached = await _moment(rig, ("listening", "thinking", "speaking"), 30.0)
    probability = rig.rng.uniform(0.1, 0.3)
    seconds = rig.rng.uniform(10.0, 20.0)
    record.params = f"{probability:.0%} for {seconds:.0f} s"
    interface = rig.stack.network.client_if
    record.injected = time.monotonic()
    await asyncio.to_thread(_iptables_loss, interface, probability, True)
    try:
        await asyncio.sleep(seconds)
    finally:
        await asyncio.to_thread(_iptables_loss, interface, probability, False)
        record.cleared = time.monotonic()


def _bottleneck(network: Any, add: bool) -> None:
    spec = ["tbf", "rate", "64kbit", "burst", "1600", "latency", "400ms"]
    for argv in (["tc", "qdisc"], network.server_command(["tc", "qdisc"])):
        interface = network.client_if if argv[0] == "tc" else network.server_if
        if add:
            _run_quiet([*argv, "replace", "dev", interface, "root", *spec])
        else:
            with contextlib.suppress(subprocess.CalledProcessError):
                _run_quiet([*argv, "del", "dev", interface, "root"])


async def _delay_burst(rig: Rig, record: FaultRecord) -> None:
    record.moment_reached = await _moment(rig, ("listening", "thinking", "speaking"), 30.0)
    seconds = rig.rng.uniform(8.0, 15.0)
    record.params = f"{seconds:.0f} s"
    network = rig.stack.network
    record.injected = time.monotonic()
    await asyncio.to_thread(_bottleneck, network, True)
    try:
        await asyncio.sleep(seconds)
    finally:
        await asyncio.to_thread(_bottleneck, network, False)
        record.cleared = time.monotonic()


def _api(mode: str, low: float, high: float) -> FaultRun:
    async def run(rig: Rig, record: FaultRecord) -> None:
        seconds = rig.rng.uniform(low, high)
        stack = rig.stack
        chosen = rig.rng.choice(["malformed", "not_json"]) if mode == "malformed" else mode
        retry_after = rig.rng.uniform(1.0, 5.0)
        record.params = f"{chosen} for {seconds:.0f} s" + (f", Retry-After {retry_after:.0f} s"
                                                           if chosen == "rate_limited" else "")
        record.injected = time.monotonic()
        if chosen == "maintenance":
            await asyncio.to_thread(stack.set_model_status, "gpt-realtime", "maintenance")
        else:
            await asyncio.to_thread(stack.fail, chosen, None, retry_after)
        try:
            await asyncio.sleep(seconds)
        finally:
            await asyncio.to_thread(stack.fail, "none")
            await asyncio.to_thread(stack.set_model_status, "gpt-realtime", "available")
            record.cleared = time.monotonic()
    return run


LIVEKIT_DOWN_SECONDS = (0.0, 10.0)


async def _livekit_restart(rig: Rig, record: FaultRecord) -> None:
    record.moment_reached = await _moment(rig, ("listening", "thinking", "speaking"), 30.0)
    # Down for a while, as a crash and a restart by its supervisor are: a bare restart takes under a second here,
    # which the SDK's resume hides, and would never show what a longer outage does to the conversation.
    down = rig.rng.uniform(*LIVEKIT_DOWN_SECONDS)
    record.injected = time.monotonic()
    await asyncio.to_thread(rig.stack.restart_livekit, down)
    record.cleared = time.monotonic()
    record.params = f"down {down:.1f} s, back after {record.cleared - record.injected:.1f} s"


async def _agent_leaves(rig: Rig, record: FaultRecord) -> None:
    record.moment_reached = await _moment(rig, ("speaking",), 60.0)
    await asyncio.sleep(rig.rng.uniform(0.0, 1.0))
    record.injected = time.monotonic()
    left = await asyncio.to_thread(rig.stack.agents_leave)
    record.cleared = time.monotonic()
    record.params = f"{left} agent(s) left"


async def _headset_plug(rig: Rig, record: FaultRecord) -> None:
    record.moment_reached = await _moment(rig, ("speaking",), 60.0)
    seconds = rig.rng.uniform(15.0, 30.0)
    record.params = f"in for {seconds:.0f} s"
    record.injected = time.monotonic()
    await asyncio.to_thread(rig.pulse.plug, "headset")
    rig.voice.headset = True
    try:
        await asyncio.sleep(seconds)
        await _moment(rig, ("speaking",), 20.0)
    finally:
        rig.voice.headset = False
        await asyncio.to_thread(rig.pulse.unplug, "headset")
        record.cleared = time.monotonic()


async def _array_removed(rig: Rig, record: FaultRecord) -> None:
    record.moment_reached = await _moment(rig, ("listening", "thinking", "speaking"), 30.0)
    seconds = rig.rng.uniform(2.0, 10.0)
    record.params = f"{seconds:.0f} s"
    record.injected = time.monotonic()
    await asyncio.to_thread(rig.pulse.unplug, "array")
    try:
        await asyncio.sleep(seconds)
    finally:
        await asyncio.to_thread(rig.pulse.plug, "array")
        await asyncio.to_thread(rig.room.restart)  # its pipes went with the array's sinks
        record.cleared = time.monotonic()


def _kill(phases: Sequence[str], within_seconds: float, extra_delay: tuple[float, float]) -> FaultRun:
    async def run(rig: Rig, record: FaultRecord) -> None:
        record.moment_reached = await _moment(rig, phases, within_seconds)
        await asyncio.sleep(rig.rng.uniform(*extra_delay))
        record.injected = time.monotonic()
        pid = rig.supervisor.kill()
        record.cleared = time.monotonic()
        record.params = f"pid {pid} in {rig.view.phase or '-'}"
    return run


async def _kill_recording(rig: Rig, record: FaultRecord) -> None:
    stack = rig.stack
    record.setup = True
    await asyncio.to_thread(stack.fail, "credits_exhausted")  # the visitor meets the offline kiosk
    try:
        record.moment_reached = await _moment(rig, ("recording_message",), 120.0)
        delay = rig.rng.uniform(0.3, 2.5)
        await asyncio.sleep(delay)
        record.injected = time.monotonic()
        pid = rig.supervisor.kill()
        record.params = f"pid {pid} {delay:.1f} s into the recording ({rig.view.phase or '-'})"
    finally:
        await asyncio.to_thread(stack.fail, "none")
        record.cleared = time.monotonic()


async def _kill_delivery(rig: Rig, record: FaultRecord) -> None:
    stack = rig.stack
    view = rig.view
    record.setup = True
    await asyncio.to_thread(stack.fail, "credits_exhausted")
    await asyncio.to_thread(rig.endpoint.script, ["slow_after_store"])  # stores, holds its answer back 3 s
    since = time.monotonic()
    try:
        stored = await view.wait(lambda: view.find("RecordingStored", since) is not None, 150.0)
        record.moment_reached = stored
        message_id = str(view.find("RecordingStored", since).event["message_id"]) if stored else ""  # type: ignore[union-attr]
        posted = False
        deadline = time.monotonic() + 10.0
        while stored and time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if message_id in (await asyncio.to_thread(rig.endpoint.received)).get("posts", {}):
                    posted = True
                    break
            await asyncio.sleep(0.1)
        record.injected = time.monotonic()
        pid = rig.supervisor.kill()
        if not stored:
            record.params = f"pid {pid}, no message stored in time"
        else:
            record.params = f"pid {pid}, " + ("the upload stored, its answer held back" if posted
                                              else "the upload not seen yet")
    finally:
        await asyncio.to_thread(stack.fail, "none")
        record.cleared = time.monotonic()


FAULT_RUNS: dict[str, FaultRun] = {
    "capture_stall": _capture_stall,
    "playback_underrun": _playback_underrun,
    "link_down_2s": _link_down(2.0),
    "link_down_20s": _link_down(20.0),
    "link_down_120s": _link_down(120.0),
    "packet_loss": _packet_loss,
    "delay_burst": _delay_burst,
    "api_5xx": _api("server_error", 10.0, 30.0),
    "api_429": _api("rate_limited", 10.0, 30.0),
    "api_402": _api("credits_exhausted", 20.0, 40.0),
    "maintenance": _api("maintenance", 10.0, 30.0),
    "api_malformed": _api("malformed", 10.0, 30.0),
    "livekit_restart": _livekit_restart,
    "agent_leaves": _agent_leaves,
    "headset_plug": _headset_plug,
    "array_removed": _array_removed,
    "kill_idle": _kill(("idle",), 60.0, (0.0, 0.3)),
    "kill_mid_answer": _kill(("speaking",), 90.0, (0.0, 1.5)),
    "kill_recording": _kill_recording,
    "kill_delivery": _kill_delivery,
}


# The phases in which the kiosk serves a visitor: waiting for one, or in a conversation. Connecting counts once
# it leads into a conversation (a refusal turns it into offline).
USABLE_PHASES = frozenset({"idle", "listening", "thinking", "speaking"})
# Serving a visitor on the way back to a usable phase: a connection that opens, a message being left.
TRANSIT_PHASES = frozenset({"connecting", "recording_message"})


async def _usable(view: KioskView, supervisor: Any, since: float, limit_seconds: float) -> float | None:
    """From when the kiosk was usable after ``since`` (None: not within ``limit_seconds``).

    Usable: idle or in a conversation, and still so STABLE_SECONDS later; a connection that starts meanwhile
    must lead into a conversation.
    """
    deadline = since + limit_seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        if not await view.wait(lambda: view.usable and supervisor.ready, remaining):
            return None
        candidate = max(view.serving_since, since)
        if await view.wait(lambda: not view.serving, STABLE_SECONDS):
            continue
        if view.phase in TRANSIT_PHASES:
            await view.wait(lambda: view.phase not in TRANSIT_PHASES, max(0.0, deadline - time.monotonic()))
            if view.phase not in USABLE_PHASES:
                continue
        return candidate


async def _inject(rig: Rig, config: FieldConfig, until: float, records: list[FaultRecord],
                  visitor: Visitor) -> None:
    """One fault at a time, a seeded shuffle of the kinds, at seeded random gaps.

    Until ``until``, and at least ``config.min_rounds`` rounds of every kind.
    """
    rng = random.Random(rig.rng.random())
    kinds = list(config.faults)
    order: list[str] = []
    rounds = 0
    while True:
        # Past the duration: stop at once, or (with min_rounds) once that many rounds are complete.
        if time.monotonic() >= until and rounds >= config.min_rounds and (config.min_rounds == 0 or not order):
            break
        await asyncio.sleep(rng.uniform(*config.gap_seconds))
        if not order:
            if time.monotonic() >= until and rounds >= config.min_rounds:
                break
            order = kinds[:]
            rng.shuffle(order)
            rounds += 1
        kind = order.pop()
        record = FaultRecord(kind, started=time.monotonic())
        records.append(record)
        _LOGGER.info("field: fault %s", kind)
        try:
            await FAULT_RUNS[kind](rig, record)
        except (OSError, subprocess.SubprocessError, ValueError, RuntimeError) as error:
            # The rig could not inject it (a tool failed): say so in the report and go on with the run.
            _LOGGER.error("field: fault %s could not be injected: %s", kind, error)
            record.params = f"not injected: {error}"[:200]
        finally:
            if not record.injected:
                record.injected = record.cleared = time.monotonic()
        # What the visitor met is counted from the fault itself; faults with a set-up (the API made to refuse
        # before a kill during a recording) set ``started`` earlier.
        if not record.setup:
            record.started = record.injected
        # Until the kiosk is usable again no new visitor comes (one already there finishes), so that the figure
        # says when the next visitor can use it, not how long the last one talked.
        visitor.paused = True
        try:
            record.usable = await _usable(rig.view, rig.supervisor, record.cleared, config.recover_limit_seconds)
        finally:
            visitor.paused = False
        _LOGGER.info("field: %s %s: usable %s s after it cleared", kind, record.params,
                     f"{record.clear_to_usable_seconds:.1f}" if record.usable is not None else "never")


async def _sample(supervisor: Any, samples: list[Sample], stop: asyncio.Event) -> None:
    """Sample the kiosk process (psutil) every SAMPLE_SECONDS."""
    import psutil

    while not stop.is_set():
        current = supervisor.current
        if current is not None:
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(current.pid)
                with process.oneshot():
                    cpu = process.cpu_times()
                    samples.append(Sample(time.monotonic(), current.number, process.memory_info().rss,
                                          process.num_fds(), process.num_threads(), cpu.user + cpu.system))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), SAMPLE_SECONDS)


# ------------------------------------------------------------------------------------------------- run
def kiosk_environment(stack: Any, run_dir: Path, endpoint_url: str) -> dict[str, str]:
    """The kiosk's settings as the service would get them (environment over defaults), pointed at the rig."""
    from kiosk_dev.demo import operator_key
    from kiosk_dev.message_endpoint import DEFAULT_TOKEN
    from kiosk_dev.pulse import ARRAY_DEVICE, HEADSET_DEVICE

    credentials = run_dir / "credentials"
    credentials.mkdir(exist_ok=True)
    # As LoadCredential= hands them over: the session API's and delivery's own.
    (credentials / "device-credential").write_text(stack.credential + "\n")
    (credentials / "delivery-credential").write_text(DEFAULT_TOKEN + "\n")
    (run_dir / "kiosk.toml").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIOSK_")}
    env.update({
        "KIOSK_CONFIG": str(run_dir / "kiosk.toml"),
        "CREDENTIALS_DIRECTORY": str(credentials),  # as LoadCredential= hands it over
        "KIOSK_SESSION__API_URL": stack.api_url,
        "KIOSK_SECURITY__ALLOW_INSECURE_TRANSPORT": "true",  # plain http between two namespaces of this machine
        "KIOSK_AUDIO__CAPTURE_DEVICE": ARRAY_DEVICE, "KIOSK_AUDIO__PLAYBACK_DEVICE": ARRAY_DEVICE,
        "KIOSK_AUDIO__HEADSET_CAPTURE_DEVICE": HEADSET_DEVICE, "KIOSK_AUDIO__HEADSET_PLAYBACK_DEVICE": HEADSET_DEVICE,
        "KIOSK_AUDIO__HEADSET_USB_IDS": '["*"]',  # the virtual headset is no USB card
        "KIOSK_AEC__MAX_DELAY_MS": "1000",  # the virtual room's path (two sound-server hops), as in the demo
        "KIOSK_SPOOL__DIRECTORY": str(run_dir / "spool"),
        # Messages are sealed to the operator's public key; the endpoint holds the private half (OPERATOR_KEY).
        "KIOSK_SPOOL__RECIPIENT_PUBLIC_KEY": operator_key(run_dir / OPERATOR_KEY),
        "KIOSK_DELIVERY__URL": endpoint_url,
        "KIOSK_PANEL__PIN_FACTORY": "mock",
    })
    return env


def run(settings: Settings, config: FieldConfig) -> FieldResult:
    """Start everything, run the visitors and the faults, restore, drain; returns what was measured."""
    from kiosk_dev.stack import LocalStack

    # The private network must be entered before any loop or rtc thread starts (LocalStack does it first).
    with LocalStack(agent_options={"end_of_turn_ms": 800, "linger_seconds": 5.0}) as stack, \
            contextlib.ExitStack() as exits:
        if config.run_dir is None:
            run_dir = Path(exits.enter_context(tempfile.TemporaryDirectory(prefix="kiosk-field-")))
        else:
            run_dir = config.run_dir
            run_dir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(_run(stack, config, run_dir, exits))


async def _run(stack: Any, config: FieldConfig, run_dir: Path, exits: contextlib.ExitStack) -> FieldResult:
    from kiosk_dev.kiosk_process import PANEL_SOCKET_ENV, TRACE_FD_ENV, PanelClient
    from kiosk_dev.pulse import private_pulse
    from kiosk_dev.speech import espeak, normalise
    from kiosk_dev.supervisor import ServiceUnit, Spawn, Supervisor, service_environment
    from kiosk_dev.virtual_room import VirtualRoom

    rng = random.Random(config.seed)
    pulse = exits.enter_context(private_pulse(run_dir / "pulse"))
    pulse.unplug("headset")  # the visitor talks into the room; the headset is a fault
    room = VirtualRoom(pulse, seed=config.seed, delay_ms=20.0, drift_ppm=50.0, noise_kind="pink", noise_dbfs=-55.0)
    await asyncio.to_thread(room.start)
    exits.callback(room.stop)
    from kiosk_dev.demo import operator_key

    operator_key(run_dir / OPERATOR_KEY)  # made before the endpoint starts: it opens messages with it
    endpoint = Endpoint(stack.network, run_dir / OPERATOR_KEY)
    await asyncio.to_thread(endpoint.start)
    exits.callback(endpoint.stop)
    questions = [normalise(espeak(q, "en-us"), -26.0) for q in QUESTIONS]
    messages = [normalise(espeak(m, "en-us"), -26.0) for m in MESSAGES]
    view = KioskView(run_dir / "trace.jsonl")
    exits.callback(view.close)
    unit = ServiceUnit.from_file(UNIT_FILE, runtime_dir=run_dir / "run")
    pending: list[int] = []

    def before_start() -> Spawn:
        read_fd, write_fd = os.pipe()
        pending[:] = [read_fd, write_fd]
        return Spawn(env={TRACE_FD_ENV: str(write_fd)}, pass_fds=(write_fd,))

    def on_start(incarnation: Any) -> None:
        read_fd, write_fd = pending
        os.close(write_fd)
        view.attach(read_fd, incarnation.number)

    env = service_environment(kiosk_environment(stack, run_dir, endpoint.url))
    env[PANEL_SOCKET_ENV] = str(run_dir / "panel.sock")
    log = exits.enter_context((run_dir / "kiosk.log").open("ab"))
    supervisor = Supervisor(unit, [sys.executable, "-m", "kiosk_dev.kiosk_process"], env=env,
                            runtime_dir=run_dir / "run", log=log, before_start=before_start, on_start=on_start)
    panel = PanelClient(run_dir / "panel.sock")
    voice = Voice(pulse, room)
    exits.callback(voice.stop)
    rig = Rig(stack, pulse, room, voice, supervisor, view, panel, endpoint, rng)
    hog = CpuHog(config.load_processes)
    samples: list[Sample] = []
    records: list[FaultRecord] = []
    skipped = {kind: why for kind in config.faults if (why := tools_missing(kind)) is not None}
    runnable = FieldConfig(**{**asdict(config), "faults": tuple(k for k in config.faults if k not in skipped)})
    visitor = Visitor(rig, questions, messages)
    stop_sampling = asyncio.Event()
    started = time.monotonic()
    await supervisor.start()
    final_ok = False
    load: list[float] = []
    try:
        if not await supervisor.wait_ready(unit.timeout_start_seconds):
            raise RuntimeError(f"the kiosk did not start; see {run_dir / 'kiosk.log'}")
        await _usable(view, supervisor, time.monotonic(), 60.0)
        hog.start()
        sampler = asyncio.create_task(_sample(supervisor, samples, stop_sampling))
        until = time.monotonic() + config.duration_seconds
        visiting = asyncio.create_task(visitor.run(float("inf")))
        if runnable.faults:
            await _inject(rig, runnable, until, records, visitor)
        else:
            await asyncio.sleep(max(0.0, until - time.monotonic()))
        visitor.stop()
        await visiting
        load = list(os.getloadavg())
        hog.stop()
        # Drain: everything is restored by now; the kiosk must be usable, every stored message delivered, and
        # a last question answered.
        await _usable(view, supervisor, time.monotonic(), config.recover_limit_seconds)
        stored = {a.message_id for a in visitor.attempts if a.message_id}
        deadline = time.monotonic() + config.drain_seconds
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                if stored <= set((await asyncio.to_thread(endpoint.received))["stored"]):
                    break
            await asyncio.sleep(1.0)
        await _usable(view, supervisor, time.monotonic(), 60.0)
        for _ in range(2):  # one retry: the agent may split a question on a loaded machine
            last = await visitor.ask(questions[0])
            if last is not None and last.completed:
                final_ok = True
                break
        if view.phase in SESSION_PHASES:
            await visitor._tap(Button.CANCEL, 0.15)
        stop_sampling.set()
        await sampler
    finally:
        hog.stop()
        stop_sampling.set()
        await panel.aclose()
        await supervisor.stop()
        await asyncio.to_thread(_restore, rig)
    received: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        received = await asyncio.to_thread(endpoint.received)
    with contextlib.suppress(OSError, ValueError):
        _agent_figures(visitor.exchanges, await asyncio.to_thread(stack.agent_reports))
    ended = time.monotonic()
    result = FieldResult(
        config={**asdict(config), "run_dir": str(run_dir)}, unit=unit.describe(), started=started, ended=ended,
        exchanges=visitor.exchanges, messages=visitor.attempts, faults=records,
        sessions=sessions_from(view.steps, supervisor.incarnations), incarnations=[
            {**asdict(i), "describe": i.describe} for i in supervisor.incarnations],
        unit_failed=supervisor.failed, samples=samples, lag_ms=view.lag_ms, slow_callbacks=view.slow, endpoint=received,
        final_exchange_completed=final_ok, counters=dict(view.stats), skipped_faults=skipped, load_average=load)
    for record in records:
        end = record.usable if record.usable is not None else record.cleared + config.recover_limit_seconds
        record.heard, record.saw = heard_and_seen(view.steps, record.started, end)
    return result


def _agent_figures(exchanges: Sequence[Exchange], reports: dict[str, Any]) -> None:
    """What the stand-in agents heard and sent, per exchange (their times are this machine's monotonic clock)."""
    onsets = sorted(t for report in reports.values() for t in report.get("onsets_at", []))
    answers = sorted(t for report in reports.values() for t in report.get("answers_sent_at", []))
    for exchange in exchanges:
        exchange.agent_heard = any(exchange.asked <= t <= exchange.released + 1.0 for t in onsets)
        exchange.agent_answered = any(exchange.asked <= t <= exchange.released + 15.0 for t in answers)


def _restore(rig: Rig) -> None:
    """Put every fault back (best effort; the stack stops next anyway)."""
    with contextlib.suppress(Exception):
        rig.stack.network.set_link(True)
    with contextlib.suppress(Exception):
        _bottleneck(rig.stack.network, False)
    with contextlib.suppress(Exception):
        rig.stack.fail("none")
        rig.stack.set_model_status("gpt-realtime", "available")
    with contextlib.suppress(Exception):
        rig.pulse.plug("array")


# ------------------------------------------------------------------------------------------------- figures
NORMAL_ENDS = ("ButtonPressed(cancel)", "TimerExpired(idle_end)", "TimerExpired(no_speech)",
               "TimerExpired(max_session)")


def sessions_from(steps: Sequence[Step], incarnations: Sequence[Any]) -> list[Session]:
    """Sessions (connecting .. speaking) from the steps; lost unless the visitor or a session timer ended them."""
    sessions: list[Session] = []
    current: Session | None = None
    ends = {i.number: i for i in incarnations}
    last_incarnation = 0
    for step in steps:
        if current is not None and step.incarnation != last_incarnation:
            _process_end(current, ends.get(last_incarnation))
            sessions.append(current)
            current = None
        last_incarnation = step.incarnation
        if step.kind == "SessionOpened" and current is not None:
            current.opened = True
        if current is None and step.new in SESSION_PHASES and step.old not in SESSION_PHASES:
            current = Session(step.t, None, False, "", False, "")
        elif current is not None and step.new not in SESSION_PHASES:
            current.ended = step.t
            current.end_event = _describe(step)
            current.lost = current.end_event not in NORMAL_ENDS and current.opened
            current.cause = current.end_event
            sessions.append(current)
            current = None
    if current is not None:
        _process_end(current, ends.get(last_incarnation))
        sessions.append(current)
    return sessions


def _process_end(session: Session, incarnation: Any) -> None:
    ended = getattr(incarnation, "ended", None)
    session.ended = ended
    if ended is None:
        session.end_event = session.cause = "still open at the end"
        return
    session.end_event = "process ended"
    session.cause = "kiosk killed (SIGKILL)" if incarnation.planned else f"kiosk process ended: {incarnation.describe}"
    session.lost = session.opened


def heard_and_seen(steps: Sequence[Step], start: float, end: float) -> tuple[list[str], list[str]]:
    """Cues played and LED patterns shown between two times, in order, repeats folded."""
    heard: list[str] = []
    saw: list[str] = []
    for step in steps:
        if not start <= step.t <= end:
            continue
        for effect in step.effects:
            if effect.get("type") == "PlayCue":
                heard.append(str(effect.get("name")))
            elif effect.get("type") == "ShowPattern":
                name = str(effect.get("name"))
                if not saw or saw[-1] != name:
                    saw.append(name)
    return heard, saw


def _fold(items: Sequence[str], sep: str, limit: int = 8) -> str:
    """Items joined, at most ``limit`` of them (the rest as '...')."""
    return sep.join(items[:limit]) + (f"{sep}... ({len(items) - limit} more)" if len(items) > limit else "")


def _percentiles(values: Sequence[float]) -> tuple[float | None, float | None, float | None]:
    if not values:
        return None, None, None
    array = np.asarray(values, dtype=float)
    return float(np.percentile(array, 50)), float(np.percentile(array, 95)), float(array.max())


def _slope_per_hour(points: Sequence[tuple[float, float]]) -> float | None:
    if len(points) < 3:
        return None
    t = np.asarray([p[0] for p in points])
    v = np.asarray([p[1] for p in points])
    if float(t.max() - t.min()) < 30.0:
        return None
    return float(np.polyfit(t, v, 1)[0] * 3600.0)


def resource_figures(result: FieldResult) -> dict[str, Any]:
    """Memory, fds and threads over time (per process, after its warm-up), loop lag, CPU per conversation minute."""
    by_incarnation: dict[int, list[Sample]] = {}
    for sample in result.samples:
        by_incarnation.setdefault(sample.incarnation, []).append(sample)
    starts = {i["number"]: i["started"] for i in result.incarnations}
    longest: tuple[float, int] = (0.0, 0)
    for number, samples in by_incarnation.items():
        span = samples[-1].t - max(samples[0].t, starts.get(number, samples[0].t) + WARMUP_SECONDS)
        if span > longest[0]:
            longest = (span, number)
    figures: dict[str, Any] = {"longest_process_seconds": round(longest[0], 1)}
    chosen = [s for s in by_incarnation.get(longest[1], []) if s.t >= starts.get(longest[1], 0.0) + WARMUP_SECONDS]
    figures["rss_mib_per_hour"] = _slope_per_hour([(s.t, s.rss_bytes / MIB) for s in chosen])
    figures["fds_per_hour"] = _slope_per_hour([(s.t, float(s.fds)) for s in chosen])
    figures["threads_per_hour"] = _slope_per_hour([(s.t, float(s.threads)) for s in chosen])
    if result.samples:
        figures["rss_mib"] = [round(min(s.rss_bytes for s in result.samples) / MIB, 1),
                              round(max(s.rss_bytes for s in result.samples) / MIB, 1)]
        figures["fds"] = [min(s.fds for s in result.samples), max(s.fds for s in result.samples)]
        figures["threads"] = [min(s.threads for s in result.samples), max(s.threads for s in result.samples)]
    # CPU between two samples is split between conversation and waiting by the share of that interval the
    # kiosk spent in a session.
    spans = [(s.began, s.ended or result.ended) for s in result.sessions]
    in_talk = waiting = 0.0
    for samples in by_incarnation.values():
        previous_cpu, previous_t = 0.0, starts.get(samples[0].incarnation, samples[0].t)
        for sample in samples:
            delta = sample.cpu_seconds - previous_cpu
            length = max(1e-9, sample.t - previous_t)
            share = sum(max(0.0, min(b, sample.t) - max(a, previous_t)) for a, b in spans) / length
            in_talk += delta * min(1.0, share)
            waiting += delta * max(0.0, 1.0 - share)
            previous_cpu, previous_t = sample.cpu_seconds, sample.t
    talk_seconds = sum(b - a for a, b in spans)
    idle_seconds = max(0.0, result.ended - result.started - talk_seconds)
    figures["cpu_seconds"] = round(in_talk + waiting, 1)
    figures["conversation_minutes"] = round(talk_seconds / 60.0, 2)
    figures["cpu_seconds_per_conversation_minute"] = round(in_talk / (talk_seconds / 60.0), 1) if talk_seconds \
        else None
    figures["cpu_seconds_per_waiting_minute"] = round(waiting / (idle_seconds / 60.0), 1) if idle_seconds else None
    p50, _, worst = _percentiles(result.lag_ms)
    figures["loop_lag_ms"] = {"n": len(result.lag_ms), "p50": p50,
                              "p99": float(np.percentile(result.lag_ms, 99)) if result.lag_ms else None, "max": worst}
    by_what: dict[str, list[float]] = {}
    for spent_ms, what in result.slow_callbacks:
        by_what.setdefault(what, []).append(spent_ms)
    ranked = sorted(by_what.items(), key=lambda item: (-len(item[1]), item[0]))[:SLOW_CALLBACKS_SHOWN]
    figures["slow_callbacks"] = [[what, len(v), round(max(v), 1)] for what, v in ranked]
    return figures


def message_figures(result: FieldResult) -> dict[str, Any]:
    """Messages stored (confirmed to the visitor), delivered, lost, duplicated, re-sent."""
    stored = [a.message_id for a in result.messages if a.message_id]
    at_endpoint = result.endpoint.get("stored", {}) if result.endpoint else {}
    counts = result.endpoint.get("store_count", {}) if result.endpoint else {}
    posts = result.endpoint.get("posts", {}) if result.endpoint else {}
    opened = result.endpoint.get("opened", {}) if result.endpoint else {}
    durations = {k: v.get("seconds") for k, v in opened.items()}  # the endpoint opened each with the operator's key
    return {
        "attempted": len(result.messages),
        "stored": len(stored),
        "delivered": sum(1 for m in stored if m in at_endpoint),
        "lost": sorted(m for m in stored if m not in at_endpoint),
        "duplicated": sorted(k for k, n in counts.items() if n > 1),
        "re_sent": sum(max(0, n - 1) for n in posts.values()),
        "unconfirmed_at_endpoint": sorted(k for k in at_endpoint if k not in stored),
        "not_stored": Counter(a.failed for a in result.messages if not a.message_id),
        # Confirmed to the visitor but (almost) empty: the recording ended before the words.
        "shorter_than_1s": sorted(m for m in stored if (durations.get(m) or 0.0) < 1.0 and m in durations),
    }


# A fault's consequences can come after the kiosk looked usable again (an agent lost in a reconnect is waited
# for livekit.reconnect_grace_seconds, after the SDK's own reconnect): a loss this long after is still put down
# to the latest fault.
ATTRIBUTION_SECONDS = 30.0


def _why_not(exchange: Exchange) -> str:
    """Where an exchange that did not complete went wrong, as far as the kiosk and the agent tell."""
    if exchange.ended_by and not exchange.ended_by.startswith("TimerExpired"):
        return f"session ended: {exchange.ended_by}"
    if exchange.agent_heard is False:
        return "the agent heard nothing" + ("" if exchange.voice_detected else " (nor did the kiosk's voice detection)")
    if exchange.agent_answered is False:
        return "the agent heard the visitor but did not answer"
    return "answered, but the kiosk did not play it to its end" + (f" ({exchange.ended_by})" if exchange.ended_by
                                                                    else "")


def _fault_of(result: FieldResult, t: float) -> str:
    """The fault a moment belongs to: the latest that started before it, if it was still on or just over."""
    latest = None
    for record in result.faults:
        if record.started <= t:
            latest = record
    if latest is None:
        return "no fault"
    end = latest.usable if latest.usable is not None else latest.cleared + result.config["recover_limit_seconds"]
    return latest.kind if t <= max(end, latest.cleared) + ATTRIBUTION_SECONDS else "no fault"


def summarise(result: FieldResult) -> dict[str, Any]:
    """The run's figures as plain data (``--json``) and the invariants the quick test checks."""
    lost = [s for s in result.sessions if s.lost]
    ended = [i for i in result.incarnations if i["ended"] is not None and not i["planned"]]
    # A clean exit nobody asked for is the kiosk's own memory restart (kiosk.recycle): systemd starts it again.
    recycled = [i for i in ended if i["cause"] == "clean"]
    exits = [i for i in ended if i["cause"] != "clean"]
    faults: dict[str, Any] = {}
    for kind in dict.fromkeys(r.kind for r in result.faults):
        records = [r for r in result.faults if r.kind == kind]
        f2u = [r.fault_to_usable_seconds for r in records if r.fault_to_usable_seconds is not None]
        c2u = [r.clear_to_usable_seconds for r in records if r.clear_to_usable_seconds is not None]
        heard = Counter(_fold(r.heard, ", ") or "nothing" for r in records).most_common(1)[0][0]
        saw = Counter(_fold(r.saw, " > ") or "no change" for r in records).most_common(1)[0][0]
        faults[kind] = {
            "count": len(records), "recovered": len(f2u),
            "moment_missed": sum(1 for r in records if not r.moment_reached),
            "fault_to_usable_s": _percentiles(f2u), "clear_to_usable_s": _percentiles(c2u),
            "sessions_lost": sum(1 for s in lost if _fault_of(result, s.ended or s.began) == kind),
            "heard": heard, "saw": saw, "params": [r.params for r in records],
        }
    lost_by_cause = Counter(f"{s.cause} [{_fault_of(result, s.ended or s.began)}]" for s in lost)
    messages = message_figures(result)
    stuck = [r.kind for r in result.faults if r.usable is None]
    return {
        "duration_s": round(result.ended - result.started, 1),
        "exchanges": {"attempted": len(result.exchanges), "completed": sum(e.completed for e in result.exchanges),
                      "refused": sum(e.refused for e in result.exchanges),
                      "cut_short": Counter(e.ended_by for e in result.exchanges if e.ended_by and not e.refused),
                      "not_completed_why": Counter(_why_not(e) for e in result.exchanges
                                                   if not e.completed and not e.refused)},
        "sessions": {"opened": sum(s.opened for s in result.sessions), "lost": len(lost),
                     "lost_by_cause": dict(lost_by_cause)},
        "faults": faults,
        "skipped_faults": result.skipped_faults,
        "messages": messages,
        "resources": resource_figures(result),
        "restarts": {"planned": sum(1 for i in result.incarnations if i["planned"] and i["ended"] is not None),
                     "memory": len(recycled), "unplanned": [i["describe"] for i in exits],
                     "unit_failed": result.unit_failed},
        "invariants": {
            "messages_lost": len(messages["lost"]), "messages_duplicated": len(messages["duplicated"]),
            "faults_stuck": stuck, "unplanned_exits": len(exits), "unit_failed": result.unit_failed,
            "final_exchange_completed": result.final_exchange_completed,
        },
        "load_average": result.load_average,
    }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def sections(result: FieldResult, summary: dict[str, Any]) -> list[BenchSection]:
    """The report's tables, with the issue's targets."""
    config = result.config
    resources = summary["resources"]
    messages = summary["messages"]
    exchanges = summary["exchanges"]
    overview = BenchSection(
        title="Run", columns=["figure", "value"],
        rows=[["length (min)", round(summary["duration_s"] / 60, 1)],
              ["seed", config["seed"]],
              ["CPU hogs (busy processes)", config["load_processes"]],
              ["load average (1, 5, 15 min) at the end", ", ".join(f"{v:.1f}" for v in result.load_average) or "-"],
              ["faults injected", len(result.faults)],
              ["exchanges attempted / completed", f"{exchanges['attempted']} / {exchanges['completed']}"],
              ["... refused with the offline fallback", exchanges["refused"]],
              ["... not completed, why", "; ".join(f"{k}: {n}" for k, n in exchanges["not_completed_why"].items())
               or "-"],
              ["sessions opened / lost", f"{summary['sessions']['opened']} / {summary['sessions']['lost']}"],
              ["messages attempted / stored / delivered", f"{messages['attempted']} / {messages['stored']} / "
                                                          f"{messages['delivered']}"],
              ["... not stored, why", "; ".join(f"{k}: {n}" for k, n in messages["not_stored"].items()) or "-"],
              ["... stored and confirmed, but under 1 s long", len(messages["shorter_than_1s"])],
              ["messages lost / duplicated / re-sent (recognised)",
               f"{len(messages['lost'])} / {len(messages['duplicated'])} / {messages['re_sent']}"],
              ["kiosk restarts: planned (SIGKILL) / memory (kiosk.recycle) / unplanned",
               f"{summary['restarts']['planned']} / {summary['restarts'].get('memory', 0)} / "
               f"{len(summary['restarts']['unplanned'])}"],
              ["unit failed (start limit)", "yes" if result.unit_failed else "no"],
              ["final question answered", "yes" if result.final_exchange_completed else "**no**"]],
        notes=["Unit settings read from systemd/kiosk.service: "
               + ", ".join(f"{k}={v}" for k, v in result.unit.items()) + "."],
    )
    if summary["restarts"]["unplanned"]:
        overview.notes.append("Unplanned ends of the kiosk process: " + "; ".join(summary["restarts"]["unplanned"]))
    if result.skipped_faults:
        overview.notes.append("Not run: " + "; ".join(f"{k} ({v})" for k, v in result.skipped_faults.items()))

    fault_rows: list[list[str | float | int | None]] = []
    for kind, figures in summary["faults"].items():
        f2u, c2u = figures["fault_to_usable_s"], figures["clear_to_usable_s"]
        fault_rows.append([kind, figures["count"], f"{figures['recovered']}/{figures['count']}",
                           _ms(f2u[0]), _ms(f2u[1]), _ms(f2u[2]), _ms(c2u[0]), _ms(c2u[1]), _ms(c2u[2]),
                           figures["sessions_lost"], figures["heard"], figures["saw"]])
    fault_table = BenchSection(
        title="Faults: time to a usable kiosk (s) and what the visitor heard and saw",
        columns=["fault", "n", "usable again", "fault->usable p50", "p95", "max", "clear->usable p50", "p95", "max",
                 "sessions lost", "heard (most common)", "saw (most common)"],
        rows=fault_rows,
        notes=[f"{kind}: {FAULTS[kind]}" for kind in summary["faults"]])
    lost = BenchSection(title="Sessions lost, by cause [fault in force]", columns=["cause", "sessions"],
                        rows=[[cause, n] for cause, n in sorted(summary["sessions"]["lost_by_cause"].items(),
                                                                key=lambda item: -item[1])] or [["none", 0]])
    lag = resources["loop_lag_ms"]
    resource = BenchSection(
        title="Resources of the kiosk process", columns=["figure", "value"],
        rows=[["resident memory (MiB, min-max)", "-".join(str(v) for v in resources.get("rss_mib", [])) or "-"],
              ["resident memory growth (MiB per hour)", resources["rss_mib_per_hour"]],
              ["file descriptors (min-max) / growth per hour",
               f"{'-'.join(str(v) for v in resources.get('fds', []))} / {_round(resources['fds_per_hour'])}"],
              ["threads (min-max) / growth per hour",
               f"{'-'.join(str(v) for v in resources.get('threads', []))} / {_round(resources['threads_per_hour'])}"],
              ["longest-running process after warm-up (min)", round(resources["longest_process_seconds"] / 60, 1)],
              ["event-loop lag p50 / p99 / max (ms)", f"{_round(lag['p50'])} / {_round(lag['p99'])} / "
                                                      f"{_round(lag['max'])}"],
              ["CPU seconds per conversation minute", resources["cpu_seconds_per_conversation_minute"]],
              ["CPU seconds per minute waiting for a visitor", resources["cpu_seconds_per_waiting_minute"]],
              ["conversation minutes", resources["conversation_minutes"]]],
        notes=["Growth is the least-squares slope over the longest-running kiosk process, after its first "
               f"{WARMUP_SECONDS:.0f} s (a SIGKILL starts a new process)."])
    over_time = BenchSection(title="Resources over time (kiosk process)",
                             columns=["minute", "process", "resident memory (MiB)", "fds", "threads"],
                             rows=[[round((s.t - result.started) / 60, 1), s.incarnation, round(s.rss_bytes / MIB, 1),
                                    s.fds, s.threads] for s in _evenly(result.samples, 12)])
    stall_lost = sum(summary["faults"].get(k, {}).get("sessions_lost", 0) for k in STALL_FAULTS)
    link_lost = sum(summary["faults"].get(k, {}).get("sessions_lost", 0) for k in SHORT_LINK_FAULTS)
    c2u_max = max((r.clear_to_usable_seconds for r in result.faults if r.clear_to_usable_seconds is not None),
                  default=0.0)
    resource.targets = [
        TargetCheck("sessions lost to a stall up to 3 s", float(stall_lost), "== 0", stall_lost == 0),
        TargetCheck("sessions lost to a link drop up to 10 s", float(link_lost), "== 0", link_lost == 0),
        TargetCheck("usable after any fault clears (max s)", c2u_max, "<= 3", c2u_max <= 3.0),
        TargetCheck("messages lost or duplicated", float(len(messages["lost"]) + len(messages["duplicated"])),
                    "== 0", not messages["lost"] and not messages["duplicated"]),
        TargetCheck("memory growth (MiB/h)", resources["rss_mib_per_hour"] if resources["rss_mib_per_hour"]
                    is not None else float("nan"), "<= 1 (over 2 h)",
                    resources["rss_mib_per_hour"] is not None and resources["rss_mib_per_hour"] <= 1.0),
        TargetCheck("event-loop lag p99 (ms)", lag["p99"] if lag["p99"] is not None else float("nan"), "<= 20",
                    lag["p99"] is not None and lag["p99"] <= 20.0),
    ]
    slow_rows = resources.get("slow_callbacks", [])
    slow = BenchSection(
        title="Loop callbacks that used 10 ms of CPU or more (the kiosk's own part of the loop lag)",
        columns=["what ran (task coroutine, and where it then waited)", "times", "longest (ms CPU)"],
        rows=slow_rows or [["none", 0, None]],
        notes=["CPU time of the loop thread per callback (time.thread_time), so waiting for a busy CPU does not "
               "count; recorded by kiosk_dev.kiosk_process."])
    return [overview, fault_table, lost, resource, slow, over_time]


def _evenly(samples: Sequence[Sample], count: int) -> list[Sample]:
    """At most ``count`` samples spread evenly over the run (the first and the last included)."""
    if len(samples) <= count:
        return list(samples)
    return [samples[round(i * (len(samples) - 1) / (count - 1))] for i in range(count)]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def render(result: FieldResult, summary: dict[str, Any], *, command: str, when: Any,
           heading: str = SECTION_HEADING) -> str:
    """The ``## Measured`` section of docs/field.md (or another ``heading``: a soak beside a fault run)."""
    from kiosk_dev.bench import report

    return report.render_markdown(sections(result, summary), command=command, when=when, heading=heading)


def as_json(result: FieldResult, summary: dict[str, Any]) -> dict[str, Any]:
    """Everything for ``--json``: the summary and the raw records (no audio, no words)."""
    return {"summary": summary, "faults": [asdict(r) for r in result.faults],
            "exchanges": [asdict(e) for e in result.exchanges], "messages": [asdict(m) for m in result.messages],
            "sessions": [asdict(s) for s in result.sessions], "incarnations": result.incarnations,
            "samples": [asdict(s) for s in result.samples],
            "config": result.config, "unit": result.unit,
            "run": {"started": result.started, "ended": result.ended, "load_average": result.load_average,
                    "skipped_faults": result.skipped_faults}}


def result_from_json(data: dict[str, Any]) -> tuple[FieldResult, dict[str, Any]]:
    """A run printed with ``--json``, back as what ``render`` takes (to write docs/field.md from a kept run).

    The trace-level records (loop lag samples, endpoint, counters) are not in the JSON; the summary holds their
    figures. Files from before ``run`` was added render the load average as "-".
    """
    summary = data["summary"]
    run = data.get("run", {})
    samples = [Sample(**s) for s in data["samples"]]
    invariants = summary["invariants"]
    result = FieldResult(
        config=data["config"], unit=data["unit"],
        started=run.get("started", samples[0].t if samples else 0.0), ended=run.get("ended", 0.0),
        exchanges=[Exchange(**e) for e in data["exchanges"]], messages=[MessageAttempt(**m) for m in data["messages"]],
        faults=[FaultRecord(**f) for f in data["faults"]], sessions=[Session(**s) for s in data["sessions"]],
        incarnations=data["incarnations"], unit_failed=bool(invariants["unit_failed"]), samples=samples, lag_ms=[],
        endpoint={}, final_exchange_completed=bool(invariants["final_exchange_completed"]), counters={},
        skipped_faults=run.get("skipped_faults", {}), load_average=run.get("load_average", []))
    return result, summary


def quick_config(seconds: float | None = None, **overrides: Any) -> FieldConfig:
    """``--quick`` (optionally shorter or longer)."""
    if seconds is not None:
        overrides["duration_seconds"] = seconds
    return FieldConfig.quick(**overrides)
