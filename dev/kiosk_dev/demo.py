"""``kiosk demo``: the kiosk's main job on a laptop, with the full local stack and simulated hardware.

It starts a private PulseAudio server with the virtual devices and the room simulator
(``kiosk_dev.pulse``, ``kiosk_dev.virtual_room``), the real LiveKit server with the stand-in session API
and agent in a private network (``kiosk_dev.stack``), and runs the same ``kiosk.app.Kiosk`` the service
runs, with the virtual button panel on gpiozero's mock pins. A visitor's spoken question goes into the
room, the agent's answer comes out of the kiosk's speaker sink (and back into the room as echo), and
the demo prints a session report: the timeline of states, latencies, ERLE and the streamed fraction.

- ``kiosk demo`` on a terminal: hold space to talk; ``v`` makes the virtual visitor ask the next question.
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
from typing import Any

from kiosk.errors import KioskError
from kiosk.events import Event, PlaybackFinished, PlaybackStarted, SessionOpened, VoiceStarted, VoiceStopped
from kiosk.settings import Settings

_LOGGER = logging.getLogger(__name__)

QUESTIONS = (
    "Hello, where can I find the registration desk?",
    "What time does the keynote begin?",
)
# Waits bounded so a broken stack ends the demo with a report instead of hanging.
IDLE_WAIT_SECONDS = 30.0
ANSWER_WAIT_SECONDS = 30.0


def _percentiles(values: Sequence[float]) -> dict[str, float] | None:
    """p50/p95/max in milliseconds, or None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {"n": len(ordered), "p50_ms": round(1000 * statistics.median(ordered), 2),
            "p95_ms": round(1000 * p95, 2), "max_ms": round(1000 * ordered[-1], 2)}


class _Recorder:
    """Keeps (time, event) for the report; a controller listener."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.start = loop.time()
        self.events: list[tuple[float, Event]] = []
        self.changed = asyncio.Event()

    def __call__(self, old: Any, event: Event, transition: Any) -> None:
        self.events.append((self._loop.time(), event))
        self.changed.set()

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

    async def wait_for(self, kind: type[Event], since: float, timeout_seconds: float,
                       predicate: Any = None) -> float | None:
        """Loop time of the first ``kind`` event after ``since`` (None on timeout)."""
        deadline = self._loop.time() + timeout_seconds
        while True:
            for at, event in self.events:
                if at >= since and isinstance(event, kind) and (predicate is None or predicate(event)):
                    return at
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return None
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)


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
        pressed = loop.time()
        panel.press()
        await asyncio.sleep(0.4)
        speech = normalise(espeak(question, "en-us"), -26.0)
        if room is not None:
            room.say(speech, name=question)
        speech_seconds = len(speech) / 16000
        await asyncio.sleep(speech_seconds + 0.5)
        panel.release()
        released = loop.time()
        opened = await recorder.wait_for(SessionOpened, pressed, 1.0)
        # Push-to-talk takes manual turns: the agent answers after end_turn, i.e. after the release (the report's
        # answer_started_after_release_s is positive; an agent without turn methods could answer earlier).
        speaking = await recorder.wait_for(PlaybackStarted, pressed + 0.4, ANSWER_WAIT_SECONDS)
        finished = await recorder.wait_for(PlaybackFinished, speaking, ANSWER_WAIT_SECONDS) \
            if speaking is not None else None
        exchanges.append({
            "question": question,
            "voice_started": await recorder.wait_for(VoiceStarted, pressed, 0.0) is not None,
            "voice_stopped": await recorder.wait_for(VoiceStopped, pressed, 0.0) is not None,
            "session_opened_s": round(opened - pressed, 3) if opened is not None else None,
            "answer_started_after_release_s": round(speaking - released, 3) if speaking is not None else None,
            "answer_played": finished is not None,
        })
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
            "connect_s": link.connect_seconds,
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
def demo_environment(settings: Settings, *, real_devices: bool) -> Iterator[DemoEnvironment]:
    """Start the stack and the virtual room; the settings point at them (``kiosk_dev.fleet`` records in it too)."""
    from kiosk_dev.stack import LocalStack
    from kiosk_dev.virtual_room import VirtualRoom

    with contextlib.ExitStack() as stack:
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
                   questions: Sequence[str] = QUESTIONS) -> dict[str, Any]:
    """Run the stack, the virtual room and the kiosk; returns the session report."""
    from kiosk.app import Kiosk
    from kiosk_dev.terminal import VirtualPanel

    loop = asyncio.get_running_loop()
    with demo_environment(settings, real_devices=real_devices) as env:
        cfg, room = env.settings, env.room
        kiosk = Kiosk(cfg)
        panel = VirtualPanel(cfg.panel, cfg.interaction, kiosk.bus.post, loop=loop)
        kiosk.panel = panel
        kiosk.staff = panel  # call_staff pulses the virtual panel's mock pin
        recorder = _Recorder(loop)
        kiosk.listeners.append(recorder)
        await kiosk.start()
        try:
            if scripted:
                exchanges = await _scripted(kiosk, panel, room, recorder, questions)
            else:
                exchanges = await _interactive(kiosk, panel, room, cfg)
            return session_report(kiosk, recorder, exchanges, room)
        finally:
            await kiosk.aclose()
    raise KioskError("demo_failed", "unreachable")  # pragma: no cover


async def _interactive(kiosk: Any, panel: Any, room: Any, settings: Settings) -> list[dict[str, Any]]:
    """Keyboard control until q: space talks, v makes the virtual visitor ask the next question."""
    from kiosk_dev.speech import espeak, normalise
    from kiosk_dev.terminal import KEYS_HELP, KeyboardControl

    loop = asyncio.get_running_loop()
    quit_event = asyncio.Event()
    asked = 0

    def visitor(_: bool) -> None:
        nonlocal asked
        if room is not None:
            room.say(normalise(espeak(QUESTIONS[asked % len(QUESTIONS)], "en-us"), -26.0))
            asked += 1

    keys = KeyboardControl(panel, loop, hold_seconds=settings.interaction.status_hold_seconds,
                           on_quit=quit_event.set, on_voice=visitor)
    print(KEYS_HELP.replace("visitor voice on/off", "the virtual visitor asks a question"), file=sys.stderr)
    keys.attach()
    try:
        while not quit_event.is_set():
            state = kiosk.controller.phase.value if kiosk.controller is not None else "starting"
            print(f"\r\x1b[2K{state:<18} {panel.status_line(colour=True)}", end="", file=sys.stderr, flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(quit_event.wait(), 0.2)
    finally:
        keys.detach()
        print(file=sys.stderr)
    return []


def _print_report(report: dict[str, Any]) -> None:
    print("session report")
    for i, exchange in enumerate(report["exchanges"], start=1):
        print(f"  question {i}: {exchange['question']!r}: answer played: {exchange['answer_played']}, "
              f"answer started {exchange['answer_started_after_release_s']} s after release")
    print("  timeline: " + " -> ".join(f"{e['state']}@{e['t_seconds']}s" for e in report["timeline"]))
    latency = report["latency"]
    print(f"  connect: {latency['connect_s']} s; capture path: {latency['capture_path']}; "
          f"playout path: {latency['playout_path']}")
    aec = report["aec"]
    print(f"  AEC {aec['backend']}: ERLE {aec['erle_db']} dB, delay {aec['delay_ms']} ms, converged {aec['converged']}")
    for caption in report["captions"]:
        print(f"  {caption['speaker']}: {caption['text']}")


def _cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    from kiosk_dev.netns import enter_private_network

    scripted = args.scripted or not sys.stdin.isatty()
    # The rtc SDK's threads must start inside the private network: enter it before anything else.
    enter_private_network()
    report = asyncio.run(run_demo(settings, scripted=scripted, real_devices=args.real_devices))
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
