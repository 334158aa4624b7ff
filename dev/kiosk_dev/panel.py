"""``kiosk panel``: try the kiosk's behaviour alone, with the virtual panel and a scripted stand-in agent.

On a terminal, keys drive the buttons and a live line shows the LEDs read back from the mock pins.
Without a terminal (or with ``--script``), commands are read one per line:
``press [talk|cancel]``, ``release [talk|cancel]``, ``hold [talk|cancel]``, ``voice on|off``,
``network off|on``, ``wait SECONDS``, ``quit``; each state change is printed, and ``--json`` prints the
session report at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from kiosk.errors import InputError
from kiosk.settings import InteractionMode, Settings

_LOGGER = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``kiosk panel``."""
    parser = subparsers.add_parser(
        "panel", help="try the behaviour alone: virtual buttons and LEDs, a stand-in agent (no Pi needed)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=[m.value for m in InteractionMode], default=None,
                        help="interaction mode (default: interaction.mode)")
    parser.add_argument("--echo-verified", action="store_true",
                        help="pretend the audio route's echo path is verified (voice barge-in allowed)")
    parser.add_argument("--toggle", action="store_true", help="space toggles talk instead of hold-to-talk")
    parser.add_argument("--script", type=Path, default=None,
                        help="read commands from this file ('-': stdin) instead of the keyboard")
    parser.add_argument("--json", action="store_true", help="print the session report as JSON at the end")
    parser.set_defaults(handler=_cmd_panel)


def _cmd_panel(args: argparse.Namespace, settings: Settings) -> int:
    interaction = settings.interaction
    if args.mode is not None:
        interaction = interaction.model_copy(update={"mode": InteractionMode(args.mode)})
    interactive = args.script is None and sys.stdin.isatty()
    if args.script is None or str(args.script) == "-":
        source: TextIO = sys.stdin
    else:
        try:
            source = args.script.open()
        except OSError as error:
            raise InputError(f"cannot read the panel script {args.script}: {error.strerror}") from None
    report = asyncio.run(run_panel(settings.model_copy(update={"interaction": interaction}),
                                   echo_verified=args.echo_verified, toggle=args.toggle,
                                   interactive=interactive, source=source))
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


async def run_panel(settings: Settings, *, echo_verified: bool, toggle: bool, interactive: bool,
                    source: TextIO, out: TextIO | None = None) -> dict[str, object]:
    """Run the controller with the virtual panel until quit (or the end of the script); returns the report."""
    out = out if out is not None else sys.stdout  # looked up at call time (a default would pin the import's)
    from kiosk.clock import LoopClock
    from kiosk.controller import Controller
    from kiosk.events import Button, Event, LinkLost, LinkUp, RefusalReason, Route, Started
    from kiosk.state import Policy
    from kiosk_dev.behaviour import MemoryMessageStore, SimulatedAudio, SimulatedRoom
    from kiosk_dev.terminal import Key, KeyboardControl, StatusTerminal, VirtualPanel

    loop = asyncio.get_running_loop()
    clock = LoopClock(loop)
    holder: list[Controller] = []

    def sink(event: Event) -> None:
        holder[0].post(event)

    hands_free = settings.interaction.mode is not InteractionMode.PUSH_TO_TALK
    audio = SimulatedAudio(sink, clock, voice_follows_gate=not hands_free, cue_seconds=0.4)
    room = SimulatedRoom(sink, clock, agent=True)
    panel = VirtualPanel(settings.panel, settings.interaction, sink, loop=loop)
    # The store is in memory here, so "leave a message" is offered whether or not an operator key is configured.
    policy = replace(Policy.from_settings(settings.interaction, settings.spool,
                                          consent_notice=settings.session.consent_notice), messages=True)
    controller = Controller(policy=policy, audio=audio,
                            link=room, clock=clock, panel=panel, store=MemoryMessageStore(),
                            route=Route.ARRAY, echo_path_verified=echo_verified)
    holder.append(controller)
    start = clock.now()
    colour = interactive and out.isatty()

    def line() -> str:
        return f"{clock.now() - start:7.2f}s {controller.phase.value:<18} {panel.status_line(colour=colour)}"

    if not interactive:
        controller.add_listener(lambda old, event, t: print(line(), file=out) if t.state.phase != old.phase
                                else None)
    task = controller.start()
    controller.post(Started())
    quit_event = asyncio.Event()

    def network(on: bool) -> None:
        # As a real network: the session in progress is lost, and fresh ones are refused (the API is unreachable)
        # until it is back; the kiosk tries a fresh session after a lost room, then goes offline.
        room.refuse = None if on else RefusalReason.UNREACHABLE
        controller.post(LinkUp() if on else LinkLost("virtual panel: network switched off"))

    try:
        if interactive:
            switches = {"voice": False, "network": True}

            def flip(name: str, action: Callable[[bool], None]) -> Callable[[], None]:
                def run() -> None:
                    switches[name] = not switches[name]
                    action(switches[name])
                return run

            keys = KeyboardControl(panel, loop, hold_seconds=settings.interaction.status_hold_seconds,
                                   on_quit=quit_event.set, toggle=toggle,
                                   keys=[Key("v", "visitor voice on/off", flip("voice", audio.speak)),
                                         Key("o", "network off/on", flip("network", network))])
            # Log lines (state changes) scroll above the live line instead of landing in the middle of it.
            terminal = StatusTerminal() if colour and StatusTerminal.usable() else None
            if terminal is not None:
                terminal.start()
            print(keys.help, file=sys.stderr if terminal is not None else out, flush=True)
            keys.attach()
            try:
                while not quit_event.is_set() and not task.done():
                    if terminal is not None:
                        terminal.update(line())
                    else:
                        print("\r\x1b[2K" + line(), end="", file=out, flush=True)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(quit_event.wait(), 0.1)
            finally:
                keys.detach()
                if terminal is not None:
                    terminal.stop()
                else:
                    print(file=out)
        else:
            buttons = {"talk": Button.TALK, "cancel": Button.CANCEL}
            for number, raw in enumerate(source, start=1):
                words = raw.split("#", 1)[0].split()
                if not words:
                    continue
                verb, rest = words[0], words[1:]
                which = buttons.get(rest[0] if rest else "talk")
                if verb in ("press", "release", "hold") and which is not None:
                    if verb == "release":
                        panel.release(which)
                    else:
                        panel.press(which)
                    if verb == "hold":
                        await asyncio.sleep(settings.interaction.status_hold_seconds + 0.3)
                        panel.release(which)
                elif verb == "voice" and rest in (["on"], ["off"]):
                    audio.speak(rest[0] == "on")
                elif verb == "network" and rest in (["on"], ["off"]):
                    network(rest[0] == "on")
                elif verb == "wait" and len(rest) == 1:
                    try:
                        await asyncio.sleep(float(rest[0]))
                    except ValueError:
                        raise InputError(f"line {number}: 'wait {rest[0]}' needs seconds, e.g. wait 1.5") from None
                elif verb == "quit":
                    break
                else:
                    raise InputError(f"line {number}: '{raw.strip()}' is not a panel command; use press/release/"
                                     "hold [talk|cancel], voice on|off, network on|off, wait SECONDS or quit")
                await asyncio.sleep(0.05)  # let gpiozero's hand-over and the controller run
            await controller.settle()
    finally:
        await controller.aclose()  # re-raises a crash of the controller
        panel.close()
    return controller.report()
