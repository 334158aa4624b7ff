"""A virtual panel for running without a Pi: the real GpioPanel on gpiozero's MockFactory.

Buttons are pressed by code (``press``/``release``, for tests and scripted demos) or from the keyboard
(``KeyboardControl``): terminals report key presses, never key releases, so holding space is seen as
the key's auto-repeat, and the button is released once the repeats stop (or ``toggle`` mode: each
space flips the button). The status line reads the LED values back from the mock pins.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import termios
import tty
from collections.abc import Callable
from typing import Any, TextIO

from kiosk.events import Button
from kiosk.panel.gpio import GpioPanel
from kiosk.ports import EventSink
from kiosk.settings import VALID_BCM_PINS, ButtonSpec, InteractionSettings, PanelSettings

_LOGGER = logging.getLogger(__name__)

KEYS_HELP = "space: hold to talk   t: toggle talk   c: cancel   s: status (long hold)   v: visitor voice on/off   " \
            "o: network off/on   q: quit"


def with_cancel_button(panel: PanelSettings) -> PanelSettings:
    """``panel`` with a cancel button on the first free pin if it has none (the virtual panel always has one)."""
    if panel.cancel_button is not None:
        return panel
    used = {panel.talk_button.pin, *(p for led in panel.leds for p in led.pins)}
    if panel.staff_output is not None:
        used.add(panel.staff_output.pin)
    free = next(p for p in reversed(VALID_BCM_PINS) if p not in used)
    return panel.model_copy(update={"cancel_button": ButtonSpec(pin=free)})


class VirtualPanel:
    """The ``Panel`` port on mock pins, with buttons pressed programmatically."""

    def __init__(self, panel: PanelSettings, interaction: InteractionSettings, sink: EventSink, *,
                 loop: asyncio.AbstractEventLoop, factory: Any = None) -> None:
        from gpiozero.pins.mock import MockFactory, MockPWMPin

        self.settings = with_cancel_button(panel)
        self.factory = factory if factory is not None else MockFactory(pin_class=MockPWMPin)
        self.gpio = GpioPanel(self.settings, interaction, sink, loop=loop, pin_factory=self.factory)

    def _spec(self, button: Button) -> ButtonSpec:
        spec = self.settings.talk_button if button is Button.TALK else self.settings.cancel_button
        assert spec is not None  # with_cancel_button guarantees one
        return spec

    def press(self, button: Button = Button.TALK) -> None:
        """Drive the button's pin to its pressed level (gpiozero then posts ButtonPressed)."""
        spec = self._spec(button)
        pin = self.factory.pin(spec.pin)
        pin.drive_low() if spec.pull_up else pin.drive_high()

    def release(self, button: Button = Button.TALK) -> None:
        """Drive the button's pin to its released level."""
        spec = self._spec(button)
        pin = self.factory.pin(spec.pin)
        pin.drive_high() if spec.pull_up else pin.drive_low()

    def is_pressed(self, button: Button = Button.TALK) -> bool:
        """Whether the button reads as pressed."""
        return self.gpio.is_pressed(button)

    def show(self, pattern: str) -> None:
        """Show an LED pattern (gpiozero animates the mock pins)."""
        self.gpio.show(pattern)

    def call_staff(self) -> None:
        """Pulse the staff-call output on its mock pin (the ``StaffSignal`` port)."""
        self.gpio.call_staff()

    def close(self) -> None:
        """Let go of the buttons and release the pins."""
        for button in (Button.TALK, Button.CANCEL):
            self.release(button)
        self.gpio.close()

    def status_line(self, *, colour: bool) -> str:
        """The LEDs as read back from the pins (ANSI colour blocks when ``colour``) and the pattern name."""
        parts = []
        for values in self.gpio.readback():
            rgb = values if len(values) == 3 else (values[0],) * 3
            text = "(" + ",".join(f"{v:.2f}" for v in values) + ")"
            if colour:
                r, g, b = (round(255 * v) for v in rgb)
                parts.append(f"\x1b[48;2;{r};{g};{b}m    \x1b[0m {text}")
            else:
                parts.append(f"led{text}")
        pattern = self.gpio.pattern.name if self.gpio.pattern is not None else "-"
        talk = "down" if self.is_pressed(Button.TALK) else "up"
        return f"{' '.join(parts)} pattern={pattern} talk={talk}"


class KeyboardControl:
    """Keys to buttons: space held (auto-repeat) or toggled is talk, c cancel, s a long hold, q quit."""

    def __init__(
        self,
        panel: VirtualPanel,
        loop: asyncio.AbstractEventLoop,
        *,
        hold_seconds: float,
        on_quit: Callable[[], None],
        on_voice: Callable[[bool], None] | None = None,
        on_network: Callable[[bool], None] | None = None,
        toggle: bool = False,
        release_gap_seconds: float = 0.25,
        first_repeat_seconds: float = 0.7,
    ) -> None:
        self._panel = panel
        self._loop = loop
        self._hold_seconds = hold_seconds
        self._on_quit = on_quit
        self._on_voice = on_voice
        self._on_network = on_network
        self.toggle = toggle
        self._gap_seconds = release_gap_seconds
        self._first_seconds = first_repeat_seconds
        self._release: asyncio.TimerHandle | None = None
        self._voice = False
        self._network = True
        self._saved: list[Any] | None = None
        self._fd: int | None = None

    def feed(self, key: str) -> None:
        """Handle one key (from the terminal, or from a test)."""
        if key == " " and not self.toggle:
            if self._release is None:
                self._panel.press(Button.TALK)
                # The first auto-repeat comes after the keyboard's repeat delay (about half a second).
                self._release = self._loop.call_later(self._first_seconds, self._release_talk)
            else:
                self._release.cancel()
                self._release = self._loop.call_later(self._gap_seconds, self._release_talk)
        elif key in (" ", "t"):
            if self._panel.is_pressed(Button.TALK):
                self._panel.release(Button.TALK)
            else:
                self._panel.press(Button.TALK)
        elif key == "c":
            self._panel.press(Button.CANCEL)
            self._loop.call_later(0.1, self._panel.release, Button.CANCEL)
        elif key == "s":
            self._panel.press(Button.TALK)
            self._loop.call_later(self._hold_seconds + 0.3, self._panel.release, Button.TALK)
        elif key == "v" and self._on_voice is not None:
            self._voice = not self._voice
            self._on_voice(self._voice)
        elif key == "o" and self._on_network is not None:
            self._network = not self._network
            self._on_network(self._network)
        elif key in ("q", "\x03", "\x04"):
            self._on_quit()

    def _release_talk(self) -> None:
        # No auto-repeat for a while: the key was let go.
        self._release = None
        self._panel.release(Button.TALK)

    def attach(self, stream: TextIO = sys.stdin) -> None:
        """Read keys from a terminal (cbreak mode, restored by ``detach``)."""
        fd = stream.fileno()
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        self._fd = fd
        self._loop.add_reader(fd, self._readable)

    def _readable(self) -> None:
        assert self._fd is not None
        for key in os.read(self._fd, 64).decode(errors="ignore"):
            self.feed(key)

    def detach(self) -> None:
        """Stop reading keys and restore the terminal."""
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            if self._saved is not None:
                with contextlib.suppress(termios.error):
                    termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._fd = None
