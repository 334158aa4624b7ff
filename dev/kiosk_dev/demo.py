"""``kiosk demo``: the kiosk's main job on a laptop, with the full local stack and simulated hardware.

It starts a private PulseAudio server with the virtual devices and the room simulator
(``kiosk_dev.pulse``, ``kiosk_dev.virtual_room``), the real LiveKit server with the stand-in session API
and agent in a private network (``kiosk_dev.stack``), and runs the same ``kiosk.app.Kiosk`` the service
runs, with the virtual button panel on gpiozero's mock pins. A visitor's spoken question goes into the
room, the agent's answer comes out of the kiosk's speaker sink (and back into the room as echo), and
the demo prints a session report: the timeline of states, latencies, ERLE and the streamed fraction.

- ``kiosk demo`` on a terminal: hold space to talk; ``v`` makes the virtual visitor ask the next question;
  ``o``, ``h``, ``a``, ``e`` and ``m`` switch the faults a visitor can meet (the network link, the headset, the
  array, the session API refusing for exhausted credits, the model in maintenance), so each fallback can be
  watched as it happens. Logs scroll above a live status line (``kiosk_dev.terminal.StatusTerminal``).
- ``kiosk demo --scripted [--json]``: asks the scripted questions by itself and prints the report
  (JSON for programs). Without a terminal the demo is always scripted.
- ``kiosk demo --real-devices``: the machine's own microphone and speaker instead of the virtual room.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import statistics
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiosk.errors import KioskError
from kiosk.events import (
    AgentState,
    AgentStateChanged,
    ApiRefused,
    DeviceLost,
    ErrorOccurred,
    Event,
    LinkLost,
    PlaybackFinished,
    SessionClosed,
    SessionOpened,
    VoiceStarted,
    VoiceStopped,
)
from kiosk.settings import Settings

if TYPE_CHECKING:
    from kiosk_dev.terminal import Key, StatusTerminal

_LOGGER = logging.getLogger(__name__)

QUESTIONS = (
    "Hello, where can I find the registration desk?",
    "What time does the keynote begin?",
)
# Waits bounded so a broken stack ends the demo with a report instead of hanging.
IDLE_WAIT_SECONDS = 30.0
ANSWER_WAIT_SECONDS = 30.0
HOLD_AFTER_WORDS_SECONDS = 1.0


def _percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """p50/p95/max in milliseconds, or None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(ordered), "p50_ms": round(1000 * statistics.median(ordered), 2),
            "p95_ms": round(1000 * p95, 2), "max_ms": round(1000 * ordered[-1], 2)}


class _Recorder:
    """Keeps (time, event) for the report (a controller listener) and when the speaker made a sound."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.start = loop.time()
        self.events: list[tuple[float, Event]] = []
        self.sounds: list[float] = []  # loop times of rendered frames louder than silence
        self.changed = asyncio.Event()

    def __call__(self, old: Any, event: Event, transition: Any) -> None:
        self.events.append((self._loop.time(), event))
        self.changed.set()

    def frame(self, out: Any, mic: Any, ref: Any, now: float) -> None:
        """Engine frame listener: the far-end reference is exactly what the speaker rendered."""
        if int(abs(ref).max(initial=0)) > RENDERED_PEAK:
            self.sounds.append(now)

    async def wait_until(self, condition: Any, timeout_seconds: float) -> bool:
        """Wait until ``condition()`` holds, re-checked after every event (False on timeout)."""
        deadline = self._loop.time() + timeout_seconds
        while not condition():
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
        return True

    def first(self, kind: type[Event] | tuple[type[Event], ...], since: float, until: float = float("inf"),
              predicate: Any = None) -> tuple[float, Event] | None:
        """The first ``kind`` event in [since, until), as (loop time, event)."""
        for at, event in self.events:
            if since <= at < until and isinstance(event, kind) and (predicate is None or predicate(event)):
                return at, event
        return None

    async def wait_for(self, kind: type[Event] | tuple[type[Event], ...], since: float, timeout_seconds: float,
                       predicate: Any = None) -> float | None:
        """Loop time of the first ``kind`` event after ``since`` (None on timeout)."""
        found: list[float] = []

        def seen() -> bool:
            hit = self.first(kind, since, predicate=predicate)
            if hit is not None:
                found.append(hit[0])
            return hit is not None

        return found[0] if await self.wait_until(seen, timeout_seconds) else None


# A rendered frame whose peak is above this is sound (agent speech or a cue); decoded silence stays at +-16.
RENDERED_PEAK = 64
# Events that end a conversation without the visitor asking for it (the exchange's ``ended_by``).
_SESSION_ENDERS = (LinkLost, DeviceLost, ErrorOccurred, ApiRefused, SessionClosed)


def _seconds(start: float | None, end: float | None) -> float | None:
    return round(end - start, 3) if start is not None and end is not None else None


def describe_event(event: Event) -> str:
    """An event as the report names it: its type and its reason (never a visitor's words)."""
    detail = getattr(event, "reason", None) or getattr(event, "device", None) or getattr(event, "code", None)
    return f"{type(event).__name__}({detail})" if detail else type(event).__name__


def exchange_figures(recorder: _Recorder, *, pressed: float, released: float, until: float) -> dict[str, Any]:
    """The figures of one push-to-talk exchange, each defined so that it cannot be negative.

    - ``session_opened_after_press_s``: press -> SessionOpened.
    - ``agent_began_after_press_s``: press -> the agent's ``lk.agent.state`` became speaking.
    - ``answer_heard_after_press_s``: press -> the first sound the speaker rendered once the agent began
      (cues before it, such as the session's start tone, do not count).
    - ``answer_heard_after_release_s``: release -> that sound, only when it came after the release; when the
      agent was already speaking while the button was held it is None and ``answer_began_while_held`` is True.
    - ``answer_played`` / ``answer_seconds``: the answer was heard and its playback ran out (PlaybackFinished)
      with the session still open; seconds of sound rendered in between.
    - ``ended_by``: the event that ended the session during the exchange without the visitor asking for it.
    """
    began = recorder.first(AgentStateChanged, pressed, until, lambda e: e.state is AgentState.SPEAKING)
    heard = next((t for t in recorder.sounds if began is not None and began[0] <= t < until), None)
    ender = recorder.first(_SESSION_ENDERS, pressed, until)
    finished = recorder.first(PlaybackFinished, heard, until) if heard is not None else None
    played = finished is not None and (ender is None or finished[0] <= ender[0])
    opened = recorder.first(SessionOpened, pressed, until)
    return {
        "voice_started": recorder.first(VoiceStarted, pressed, until) is not None,
        "voice_stopped": recorder.first(VoiceStopped, pressed, until) is not None,
        "held_s": round(released - pressed, 3),
        "session_opened_after_press_s": _seconds(pressed, opened[0] if opened else None),
        "agent_began_after_press_s": _seconds(pressed, began[0] if began else None),
        "answer_heard_after_press_s": _seconds(pressed, heard),
        "answer_heard_after_release_s": _seconds(released, heard) if heard is not None and heard >= released
        else None,
        "answer_began_while_held": heard is not None and heard < released,
        "answer_played": played,
        "answer_seconds": round(0.01 * sum(1 for t in recorder.sounds
                                           if heard is not None and finished is not None
                                           and heard <= t <= finished[0]), 2) if played else 0.0,
        "ended_by": describe_event(ender[1]) if ender is not None else None,
    }


def operator_key(path: Path) -> str:
    """The demo's operator key pair: the private key in ``path`` (made once, 0600), the public key returned.

    A kiosk only ever has the public key; the demo keeps the private one beside its temporary spool so the
    stand-in endpoint (``--private-key``) and ``kiosk messages decrypt --key`` can show the round trip.
    """
    from kiosk.fallback.sealing import (
        encode_key,
        generate_keypair,
        public_key_for,
        read_private_key,
        write_private_key,
    )

    if path.exists():
        return encode_key(public_key_for(read_private_key(path)))
    private, public = generate_keypair()
    write_private_key(path, private)
    return encode_key(public)


def demo_settings(base: Settings, *, api: Any, spool_dir: Path, real_devices: bool,
                  operator_key_file: Path | None = None) -> Settings:
    """``base`` pointed at the local stack, the virtual devices, a temporary spool and a free metrics port.

    Messages are sealed to a demo operator key whose private half is ``operator_key_file`` (default:
    ``operator.key`` beside the spool directory); delivery uses the stand-in endpoint's credential. Every tool
    the agent can call is enabled, with the staff-call output on a mock pin of the virtual panel (GPIO 26).
    """
    from pydantic import SecretStr

    from kiosk.events import Tool
    from kiosk.settings import StaffOutputSpec
    from kiosk_dev.message_endpoint import DEFAULT_TOKEN
    from kiosk_dev.pulse import ARRAY_DEVICE, HEADSET_DEVICE

    audio = base.audio if real_devices else base.audio.model_copy(update={
        "capture_device": ARRAY_DEVICE, "playback_device": ARRAY_DEVICE,
        "headset_capture_device": HEADSET_DEVICE, "headset_playback_device": HEADSET_DEVICE,
        "headset_usb_ids": ["*"],  # the virtual headset is no USB card
    })
    # The virtual room's speaker-to-microphone path (two PulseAudio hops) can exceed the default search range.
    aec = base.aec if real_devices else base.aec.model_copy(update={"max_delay_ms": max(base.aec.max_delay_ms, 1000)})
    return base.model_copy(update={
        "audio": audio,
        "aec": aec,
        "session": api,
        "spool": base.spool.model_copy(update={
            "directory": spool_dir,
            "recipient_public_key": operator_key(operator_key_file or spool_dir.parent / "operator.key")}),
        "delivery": base.delivery.model_copy(update={"credential": SecretStr(DEFAULT_TOKEN)}),
        "panel": base.panel if base.panel.staff_output is not None else base.panel.model_copy(update={
            "staff_output": StaffOutputSpec(pin=26)}),
        "tools": base.tools.model_copy(update={"enabled": list(Tool)}),
        "metrics": base.metrics.model_copy(update={"port": 0}),
        # The stack's private network is plain http/ws between two namespaces of this machine.
        "security": base.security.model_copy(update={"allow_insecure_transport": True}),
    })


async def _scripted(kiosk: Any, panel: Any, room: Any, recorder: _Recorder, questions: Sequence[str]) -> list[
        dict[str, Any]]:
    """Ask each question with the talk button held; wait for the agent's answer to finish playing."""
    from kiosk.state import Phase
    from kiosk_dev.speech import espeak, normalise

    loop = asyncio.get_running_loop()
    exchanges: list[dict[str, Any]] = []
    for question in questions:
        await recorder.wait_until(lambda: kiosk.controller.phase is Phase.IDLE, IDLE_WAIT_SECONDS)
        # Rendered before the press, off the loop: on a busy machine espeak-ng took seconds, the button stayed
        # held that long and the hold became a status request.
        speech = normalise(await asyncio.to_thread(espeak, question, "en-us"), -26.0)
        pressed = loop.time()
        panel.press()
        await asyncio.sleep(0.4)
        if room is not None:
            room.say(speech, name=question)
        speech_seconds = len(speech) / 16000
        # Held a second past the words, so the last word has gone through the capture path (which lags on a loaded
        # machine) before the release ends the turn. Push-to-talk takes manual turns: the agent answers after the
        # release (an agent without turn methods answers on silence, and the report says it began while held).
        await asyncio.sleep(speech_seconds + HOLD_AFTER_WORDS_SECONDS)
        panel.release()
        released = loop.time()

        def answered(since: float = pressed) -> bool:
            began = recorder.first(AgentStateChanged, since, predicate=lambda e: e.state is AgentState.SPEAKING)
            return recorder.first(_SESSION_ENDERS, since) is not None or (
                began is not None and recorder.first(PlaybackFinished, began[0]) is not None)

        await recorder.wait_until(answered, ANSWER_WAIT_SECONDS)
        # Playback runs out a moment after the agent stops; keep listening briefly for the end of the answer.
        await asyncio.sleep(0.5)
        exchanges.append({"question": question,
                          **exchange_figures(recorder, pressed=pressed, released=released, until=loop.time())})
    return exchanges


def session_report(kiosk: Any, recorder: _Recorder, exchanges: list[dict[str, Any]],
                   room: Any) -> dict[str, Any]:
    """The demo's report: exchanges, the timeline of states, latencies, ERLE and the streamed fraction."""
    link = kiosk.link
    controller = kiosk.controller.report() if kiosk.controller is not None else {}
    stats = kiosk.engine.chain.echo_canceller.stats()
    summary = kiosk.metrics_server.summary() if kiosk.metrics_server is not None else {}
    return {
        "exchanges": exchanges,
        "answered": sum(1 for e in exchanges if e["answer_played"]),
        "timeline": controller.get("timeline", []),
        "latency": {
            "last_session_connect_s": link.connect_seconds,
            "capture_path": _percentiles(list(link.capture_latencies_s)),
            "playout_path": _percentiles(list(link.playout_latencies_s)),
        },
        "aec": {"backend": kiosk.settings.aec.backend.value, "erle_db": round(stats.erle_db, 1),
                "delay_ms": stats.delay_ms, "converged": stats.converged},
        "metrics": summary,
        "captions": [{"speaker": c.speaker, "text": c.text} for c in list(link.captions)[-6:]]
        if hasattr(link, "captions") else [],
        "speaker_heard_by_room": bool(room is not None and room.far_energy > 0),
        "audio": kiosk.engine.stats(),
    }


@dataclass
class DemoEnvironment:
    """What the demo runs the kiosk in: the local stack, the virtual room (None with real devices), the settings."""

    stack: Any  # kiosk_dev.stack.LocalStack
    pulse: Any  # kiosk_dev.pulse's private server, None with real devices
    room: Any  # kiosk_dev.virtual_room.VirtualRoom, None with real devices
    settings: Settings
    directory: Path  # the temporary directory holding the spool and the demo's operator key


@contextlib.contextmanager
def demo_environment(settings: Settings, *, real_devices: bool,
                     terminal: StatusTerminal | None = None) -> Iterator[DemoEnvironment]:
    """Start the stack and the virtual room; the settings point at them (``kiosk_dev.fleet`` records in it too)."""
    from kiosk_dev.stack import LocalStack
    from kiosk_dev.virtual_room import VirtualRoom

    with contextlib.ExitStack() as stack:
        if terminal is not None:
            terminal.update("starting the local stack ...")
        local = stack.enter_context(LocalStack())
        pulse = None
        room = None
        if not real_devices:
            from kiosk_dev.pulse import private_pulse

            pulse = stack.enter_context(private_pulse())
            pulse.unplug("headset")  # the visitor talks into the room; the headset is plugged in on demand
            room = VirtualRoom(pulse, seed=1, delay_ms=20.0, drift_ppm=50.0, noise_kind="pink", noise_dbfs=-55.0)
            room.start()
            stack.callback(room.stop)
        # The spool and the demo's operator key (the private half, which a real kiosk never holds) in one
        # temporary directory.
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kiosk-demo-")))
        cfg = demo_settings(settings, api=local.session_settings(), spool_dir=directory / "spool",
                            real_devices=real_devices)
        yield DemoEnvironment(local, pulse, room, cfg, directory)


async def run_demo(settings: Settings, *, scripted: bool, real_devices: bool,
                   questions: Sequence[str] = QUESTIONS, terminal: StatusTerminal | None = None) -> dict[str, Any]:
    """Run the stack, the virtual room and the kiosk; returns the session report.

    ``terminal`` (interactive runs on a terminal) keeps the status line under the logs; it must have been
    started before this, so that the stack's child processes write through it too.
    """
    from kiosk.app import Kiosk
    from kiosk_dev.terminal import VirtualPanel

    loop = asyncio.get_running_loop()
    with demo_environment(settings, real_devices=real_devices, terminal=terminal) as env:
        cfg, room = env.settings, env.room
        kiosk = Kiosk(cfg)
        panel = VirtualPanel(cfg.panel, cfg.interaction, kiosk.bus.post, loop=loop)
        kiosk.panel = panel
        kiosk.staff = panel  # call_staff pulses the virtual panel's mock pin
        recorder = _Recorder(loop)
        kiosk.listeners.append(recorder)
        kiosk.engine.listeners.append(recorder.frame)
        await kiosk.start()
        try:
            if scripted:
                exchanges = await _scripted(kiosk, panel, room, recorder, questions)
            else:
                faults = DemoFaults(env.stack, env.pulse, room)
                try:
                    exchanges = await _interactive(kiosk, panel, faults, cfg, terminal)
                finally:
                    await faults.restore()
            return session_report(kiosk, recorder, exchanges, room)
        finally:
            await kiosk.aclose()
    raise KioskError("demo_failed", "unreachable")  # pragma: no cover


class DemoFaults:
    """The faults a visitor can meet, switched from the demo's keyboard so each fallback can be watched.

    Each key flips one fault and logs a line saying what it did; the status line lists those in force.
    The network is the private namespace's veth link (a real outage for the session API and LiveKit), the
    headset and the array are the virtual sound devices (plugged and pulled as USB devices would be), and the
    refusals come from the stand-in session API. The switching runs off the loop (``ip``, ``pactl`` and HTTP
    calls block for a moment).
    """

    def __init__(self, local: Any, pulse: Any, room: Any) -> None:
        self._local = local
        self._pulse = pulse
        self.room = room
        self.network_down = False
        self.headset_in = False
        self.array_out = False
        self.credits_exhausted = False
        self.maintenance = False
        self._tasks: set[asyncio.Task[None]] = set()

    def keys(self) -> list[Key]:
        """The fault keys this demo can serve (the device keys only with the virtual devices)."""
        from kiosk_dev.terminal import Key

        keys = [Key("o", "network off/on", self._switch(self._network))]
        if self._pulse is not None:
            keys += [Key("h", "headset plug/unplug", self._switch(self._headset)),
                     Key("a", "array out/in", self._switch(self._array))]
        keys += [Key("e", "API refuses: credits exhausted on/off", self._switch(self._credits)),
                 Key("m", "model in maintenance on/off", self._switch(self._maintenance))]
        return keys

    def describe(self) -> str:
        """The faults in force, for the status line ('' when none)."""
        active = [name for name, on in (("network down", self.network_down), ("headset in", self.headset_in),
                                        ("array out", self.array_out), ("credits exhausted", self.credits_exhausted),
                                        ("maintenance", self.maintenance)) if on]
        return "faults: " + ", ".join(active) if active else ""

    def _switch(self, flip: Any) -> Any:
        def run() -> None:
            task = asyncio.ensure_future(asyncio.to_thread(flip))
            self._tasks.add(task)
            task.add_done_callback(self._done)
        return run

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            _LOGGER.error("demo: the fault switch failed: %s", task.exception())

    def _network(self) -> None:
        self.network_down = not self.network_down
        self._local.network.set_link(not self.network_down)
        _LOGGER.warning("demo: network link %s (the namespace's veth: session API and LiveKit %s)",
                        "down" if self.network_down else "up", "unreachable" if self.network_down else "reachable")

    def _headset(self) -> None:
        self.headset_in = not self.headset_in
        (self._pulse.plug if self.headset_in else self._pulse.unplug)("headset")
        _LOGGER.warning("demo: headset %s", "plugged in" if self.headset_in else "unplugged")

    def _array(self) -> None:
        self.array_out = not self.array_out
        if self.array_out:
            self._pulse.unplug("array")
        else:
            self._pulse.plug("array")
            if self.room is not None:
                self.room.restart()  # the room's pipes went with the array's sinks
        _LOGGER.warning("demo: microphone array %s", "removed" if self.array_out else "back")

    def _credits(self) -> None:
        self.credits_exhausted = not self.credits_exhausted
        self._local.fail("credits_exhausted" if self.credits_exhausted else "none")
        _LOGGER.warning("demo: the session API %s", "refuses new sessions: credits exhausted (402)"
                        if self.credits_exhausted else "grants sessions again")

    def _maintenance(self) -> None:
        self.maintenance = not self.maintenance
        self._local.set_model_status("gpt-realtime", "maintenance" if self.maintenance else "available")
        _LOGGER.warning("demo: the model is %s", "in maintenance" if self.maintenance else "available again")

    async def restore(self) -> None:
        """Wait for switches in flight; put every fault back (so the stack and devices stop cleanly)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=30)
        undo = [flip for flip, on in ((self._network, self.network_down), (self._headset, self.headset_in),
                                      (self._array, self.array_out), (self._credits, self.credits_exhausted),
                                      (self._maintenance, self.maintenance)) if on]
        for flip in undo:
            with contextlib.suppress(Exception):  # best effort on the way out; the stack stops next anyway
                await asyncio.to_thread(flip)


async def _interactive(kiosk: Any, panel: Any, faults: DemoFaults, settings: Settings,
                       terminal: StatusTerminal | None) -> list[dict[str, Any]]:
    """Keyboard control until q: space talks, v makes the virtual visitor ask the next question, fault keys."""
    from kiosk_dev.speech import espeak, normalise
    from kiosk_dev.terminal import Key, KeyboardControl

    loop = asyncio.get_running_loop()
    quit_event = asyncio.Event()
    asked = 0

    def visitor() -> None:
        nonlocal asked
        if faults.room is not None:
            faults.room.say(normalise(espeak(QUESTIONS[asked % len(QUESTIONS)], "en-us"), -26.0))
            asked += 1

    extra = [Key("v", "the virtual visitor asks a question", visitor)] if faults.room is not None else []
    keys = KeyboardControl(panel, loop, hold_seconds=settings.interaction.status_hold_seconds,
                           on_quit=quit_event.set, keys=extra + faults.keys())
    print(keys.help, file=sys.stderr, flush=True)
    keys.attach()
    try:
        while not quit_event.is_set():
            state = kiosk.controller.phase.value if kiosk.controller is not None else "starting"
            line = f"{state:<18} {panel.status_line(colour=True)} {faults.describe()}".rstrip()
            if terminal is not None:
                terminal.update(line)
            else:
                print(f"\r\x1b[2K{line}", end="", file=sys.stderr, flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(quit_event.wait(), 0.2)
    finally:
        keys.detach()
        if terminal is None:
            print(file=sys.stderr)
    return []


def _print_report(report: dict[str, Any]) -> None:
    print("session report")
    for i, exchange in enumerate(report["exchanges"], start=1):
        print(f"  question {i}: {exchange['question']!r}: {_describe_exchange(exchange)}")
    print("  timeline: " + " -> ".join(f"{e['state']}@{e['t_seconds']}s" for e in report["timeline"]))
    latency = report["latency"]
    print(f"  last session's connect: {latency['last_session_connect_s']} s; capture path: {latency['capture_path']}; "
          f"playout path: {latency['playout_path']}")
    aec = report["aec"]
    print(f"  AEC {aec['backend']}: ERLE {aec['erle_db']} dB, delay {aec['delay_ms']} ms, converged {aec['converged']}")
    for caption in report["captions"]:
        print(f"  {caption['speaker']}: {caption['text']}")


def _describe_exchange(exchange: dict[str, Any]) -> str:
    """One exchange in words (the figures as ``exchange_figures`` defines them)."""
    if exchange["answer_heard_after_press_s"] is None:
        why = f"the session ended on {exchange['ended_by']}" if exchange["ended_by"] else "nothing was heard"
        return f"no answer: {why}"
    heard = f"answer heard {exchange['answer_heard_after_press_s']} s after the press"
    if exchange["answer_began_while_held"]:
        heard += ", while the button was still held (the agent took the turn before the release)"
    else:
        heard += f", {exchange['answer_heard_after_release_s']} s after the release"
    if exchange["answer_played"]:
        return f"{heard}; played to its end ({exchange['answer_seconds']} s of sound)"
    cut = f"cut short by {exchange['ended_by']}" if exchange["ended_by"] else "did not finish playing"
    return f"{heard}; {cut}"


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from kiosk_dev.netns import enter_private_network
    from kiosk_dev.terminal import StatusTerminal

    scripted = args.scripted or not sys.stdin.isatty()
    # Interactive on a terminal: logs scroll above one live status line. Started first, so that every child
    # process of the stack writes through it.
    terminal = StatusTerminal() if not scripted and StatusTerminal.usable() else None
    if terminal is not None:
        terminal.start()
    try:
        # The rtc SDK's threads must start inside the private network: enter it before anything else.
        enter_private_network()
        report = asyncio.run(run_demo(settings, scripted=scripted, real_devices=args.real_devices,
                                      terminal=terminal))
    finally:
        if terminal is not None:
            terminal.stop()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_report(report)
    ok = not scripted or report["answered"] == len(report["exchanges"])
    return 0 if ok else 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``kiosk demo``."""
    demo = subparsers.add_parser("demo", help="the full local stack with simulated hardware (see README)")
    demo.add_argument("--scripted", action="store_true", help="ask the scripted questions, print the report")
    demo.add_argument("--json", action="store_true", help="print the session report as JSON")
    demo.add_argument("--real-devices", action="store_true",
                      help="use the configured (real) microphone and speaker instead of the virtual room")
    demo.set_defaults(handler=_cmd_demo)
