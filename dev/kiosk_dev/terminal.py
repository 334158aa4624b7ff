"""A virtual panel (the real GpioPanel on gpiozero's MockFactory), its keyboard, and a live status line.

The panel is for running without a Pi. Buttons are pressed by code (``press``/``release``, for tests and
scripted demos) or from the keyboard (``KeyboardControl``): terminals report key presses, never key releases,
so holding space is seen as the key's auto-repeat, and the button is released once the repeats stop (or
``toggle`` mode: each space flips the button). The status line reads the LED values back from the mock pins.

``StatusTerminal`` owns the terminal while the interactive demo or panel runs: whatever anything writes
to standard error (this process's logs, the local stack's child processes, native libraries) scrolls
above one status line, which is redrawn whole below it. Libraries that keep such a live line (a
progress bar's ``write``, a rich console's live display) catch only what Python code prints through
them; here the writers include child processes and C libraries, so the terminal is taken over at the
file-descriptor level: fd 2 becomes a pipe, and one thread relays each complete line to the real
terminal above the status line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import termios
import threading
import tty
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from kiosk.events import Button
from kiosk.panel.gpio import GpioPanel
from kiosk.ports import EventSink
from kiosk.settings import VALID_BCM_PINS, ButtonSpec, InteractionSettings, PanelSettings

_LOGGER = logging.getLogger(__name__)

# The keys every keyboard control has; ``Key``s add to them, and the help line lists only what is wired.
BASE_KEYS_HELP = "space: hold to talk   t: toggle talk   c: cancel   s: status (long hold)"
QUIT_HELP = "q: quit"


@dataclass(frozen=True)
class Key:
    """One more key for ``KeyboardControl``: ``action`` runs on each press (the owner keeps any on/off state)."""

    key: str
    help: str  # what the help line says, e.g. "network off/on"
    action: Callable[[], None]


def keys_help(keys: Sequence[Key]) -> str:
    """The help line for the base keys plus ``keys``, in order: a key that is not wired is never offered."""
    return "   ".join([BASE_KEYS_HELP, *(f"{k.key}: {k.help}" for k in keys), QUIT_HELP])


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
    """Keys to buttons: space held (auto-repeat) or toggled is talk, c cancel, s a long hold, q quit; plus ``keys``."""

    def __init__(
        self,
        panel: VirtualPanel,
        loop: asyncio.AbstractEventLoop,
        *,
        hold_seconds: float,
        on_quit: Callable[[], None],
        keys: Sequence[Key] = (),
        toggle: bool = False,
        release_gap_seconds: float = 0.25,
        first_repeat_seconds: float = 0.7,
    ) -> None:
        reserved = {" ", "t", "c", "s", "q"}
        taken = [k.key for k in keys if k.key in reserved or len(k.key) != 1]
        if taken or len({k.key for k in keys}) != len(keys):
            raise ValueError(f"keys must be single characters, distinct and not {sorted(reserved)}: {taken}")
        self._panel = panel
        self._loop = loop
        self._hold_seconds = hold_seconds
        self._on_quit = on_quit
        self._keys = {k.key: k for k in keys}
        self.help = keys_help(keys)
        self.toggle = toggle
        self._gap_seconds = release_gap_seconds
        self._first_seconds = first_repeat_seconds
        self._release: asyncio.TimerHandle | None = None
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
        elif key in self._keys:
            self._keys[key].action()
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


# Erase the cursor's line; turn the terminal's auto-wrap off/on (DECAWM), so an over-long status line is
# clipped at the right edge instead of wrapping onto a second line that the next redraw would not erase.
_ERASE_LINE = "\r\x1b[2K"
_WRAP_OFF = "\x1b[?7l"
_WRAP_ON = "\x1b[?7h"
_READ_BYTES = 65536


class StatusTerminal:
    """A live status line under scrolling output, by taking over a file descriptor (see the module docstring).

    ``start()`` points ``capture_fd`` (standard error) at a pipe; a thread relays each complete line to
    ``out_fd`` (the terminal, a copy of the original fd) after erasing the status line, then draws the status
    line again. ``update(text)`` redraws it. ``stop()`` puts the original fd back, leaves the last status on
    its own line, and keeps relaying what children still write, as plain lines. Child processes started
    after ``start()`` inherit the pipe as their standard error, so they must be started after it.
    """

    def __init__(self, *, capture_fd: int = 2, out_fd: int | None = None) -> None:
        self._capture_fd = capture_fd
        self._out_fd = out_fd
        self._saved_fd: int | None = None
        self._read_fd: int | None = None
        self._lock = threading.Lock()
        self._status = ""
        self._live = False
        self._thread: threading.Thread | None = None

    @staticmethod
    def usable(fd: int = 2) -> bool:
        """Whether ``fd`` is a terminal (otherwise there is no line to keep; plain output is better)."""
        return os.isatty(fd)

    def start(self) -> None:
        """Take over ``capture_fd`` and start relaying."""
        self._saved_fd = os.dup(self._capture_fd)
        if self._out_fd is None:
            self._out_fd = self._saved_fd
        read_fd, write_fd = os.pipe()
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stderr.flush()
        os.dup2(write_fd, self._capture_fd)
        os.close(write_fd)
        self._read_fd = read_fd
        self._live = True
        # Thread boundary: this thread only reads the pipe and writes whole lines to the terminal, under the lock
        # that update() takes too; it never touches the loop.
        self._thread = threading.Thread(target=self._relay, name="status-terminal", daemon=True)
        self._thread.start()

    def update(self, status: str) -> None:
        """Show ``status`` (one line; clipped at the terminal's width) below the output."""
        with self._lock:
            self._status = status
            if self._live:
                self._write(_ERASE_LINE + self._status_text())

    def stop(self) -> None:
        """Give the fd back; the last status stays on its own line."""
        if self._saved_fd is None:
            return
        with contextlib.suppress(AttributeError, ValueError, OSError):
            sys.stderr.flush()
        with self._lock:
            os.dup2(self._saved_fd, self._capture_fd)
            if self._live:
                self._write(_ERASE_LINE + self._status_text() + "\n")
            self._live = False
        # The relay thread runs on until every writer of the pipe (children still running) has closed it.

    def join(self, timeout_seconds: float) -> None:
        """Wait for the relay to see the end of its pipe (every writer gone), for tests."""
        if self._thread is not None:
            self._thread.join(timeout_seconds)

    def _status_text(self) -> str:
        return _WRAP_OFF + self._status + _WRAP_ON if self._status else ""

    def _write(self, text: str) -> None:
        assert self._out_fd is not None
        data = text.encode(errors="replace")
        while data:
            try:
                data = data[os.write(self._out_fd, data):]
            except InterruptedError:
                continue
            except OSError:
                return  # the terminal went away: nothing left to show anything on

    def _line(self, line: str) -> None:
        line = line.rsplit("\r", 1)[-1]  # a progress line that rewrote itself: its last state
        with self._lock:
            if self._live:
                self._write(_ERASE_LINE + line + "\n" + self._status_text())
            else:
                self._write(line + "\n")

    def _relay(self) -> None:
        assert self._read_fd is not None
        pending = b""
        while True:
            try:
                chunk = os.read(self._read_fd, _READ_BYTES)
            except InterruptedError:
                continue
            except OSError:
                break
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                self._line(raw.decode(errors="replace"))
        if pending:
            self._line(pending.decode(errors="replace"))
        os.close(self._read_fd)
