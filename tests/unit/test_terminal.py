"""The interactive demo's terminal: logs scroll above a whole status line; the help line offers only wired keys.

The screen is checked with a terminal emulator (pyte): what a person would see, not the bytes written.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pyte
import pytest

from kiosk.events import Button, ButtonPressed, Event
from kiosk.settings import InteractionSettings, PanelSettings
from kiosk_dev.terminal import BASE_KEYS_HELP, Key, KeyboardControl, StatusTerminal, VirtualPanel

COLUMNS, ROWS = 80, 24
STATUS = "idle               \x1b[48;2;0;0;255m    \x1b[0m (0.00,0.00,1.00) pattern=idle talk=up"
STATUS_TEXT = "idle               " + " " * 4 + " (0.00,0.00,1.00) pattern=idle talk=up"
LOGS = [f"10:00:{i:02d} INFO    kiosk.controller: state idle -> connecting on Pressed {i}" for i in range(6)]


class Screen:
    """A terminal of COLUMNS x ROWS fed from a pipe, as a person would see it."""

    def __init__(self) -> None:
        self.screen = pyte.Screen(COLUMNS, ROWS)
        self.stream = pyte.ByteStream(self.screen)
        self.read_fd, self.write_fd = os.pipe()
        self._thread = threading.Thread(target=self._pump, daemon=True)
        self._thread.start()

    def _pump(self) -> None:
        while chunk := os.read(self.read_fd, 65536):
            # A tty turns "\n" into "\r\n" (ONLCR); a pipe does not, so do it here.
            self.stream.feed(chunk.replace(b"\n", b"\r\n"))

    def close(self) -> list[str]:
        os.close(self.write_fd)
        self._thread.join(5)
        os.close(self.read_fd)
        return [line.rstrip() for line in self.screen.display]


@pytest.fixture
def scratch_fd() -> Iterator[int]:
    """A file descriptor standing for standard error (the test must not take over pytest's own fd 2)."""
    fd = os.open(os.devnull, os.O_WRONLY)
    yield fd
    with contextlib.suppress(OSError):
        os.close(fd)


def _rows(lines: list[str]) -> list[str]:
    return [line for line in lines if line]


def test_log_lines_scroll_above_a_whole_status_line(scratch_fd: int) -> None:
    screen = Screen()
    terminal = StatusTerminal(capture_fd=scratch_fd, out_fd=screen.write_fd)
    terminal.start()
    terminal.update(STATUS)
    for i, line in enumerate(LOGS[:3]):
        os.write(scratch_fd, (line + "\n").encode())  # this process's logs
        terminal.update(STATUS if i % 2 else STATUS.replace("idle ", "busy "))
    # A child process started afterwards writes through the same pipe (its stderr is the taken-over fd).
    child = "import os, sys\nfor line in sys.argv[2:]:\n    os.write(int(sys.argv[1]), (line + '\\n').encode())\n"
    subprocess.run([sys.executable, "-c", child, str(scratch_fd), *LOGS[3:]], pass_fds=(scratch_fd,), check=True)
    os.write(scratch_fd, b"a partial line without its end")
    terminal.update(STATUS)
    # Let the relay thread drain the pipe before the fd is given back.
    deadline = 50
    while deadline and not any("Pressed 5" in line for line in screen.screen.display):
        threading.Event().wait(0.05)
        deadline -= 1
    terminal.stop()
    os.close(scratch_fd)  # the last writer of the pipe: the relay sees its end
    terminal.join(5)
    rows = _rows(screen.close())
    assert rows[:6] == LOGS, rows  # every log line whole, on its own row, in order
    # The status line is the last row and whole; it never shares a row with a log line.
    assert STATUS_TEXT.rstrip() in rows[-2] or STATUS_TEXT.rstrip() in rows[-1], rows
    assert not any("pattern=" in row and "kiosk.controller" in row for row in rows), rows
    assert "a partial line without its end" in rows[-1], rows  # what is left at the end is still shown


def test_the_naive_status_line_is_broken_by_a_log_line() -> None:
    """The check above can fail: writing the status line with a bare carriage return, as the demo did, lets the
    next log line land in the middle of it."""
    screen = Screen()
    os.write(screen.write_fd, ("\r\x1b[2K" + STATUS).encode())
    os.write(screen.write_fd, (LOGS[0] + "\n").encode())
    rows = _rows(screen.close())
    assert any("pattern=" in row and "10:00:00" in row for row in rows), rows


def test_an_overlong_status_line_is_clipped_not_wrapped(scratch_fd: int) -> None:
    screen = Screen()
    terminal = StatusTerminal(capture_fd=scratch_fd, out_fd=screen.write_fd)
    terminal.start()
    terminal.update("x" * (COLUMNS + 40))
    terminal.update("short status")
    terminal.stop()
    os.close(os.dup(scratch_fd))
    rows = _rows(screen.close())
    assert rows == ["short status"], rows  # the long one took one row, and the redraw erased it whole


# ------------------------------------------------------------------------------------------------ keys
async def test_the_help_line_offers_only_the_keys_that_are_wired(mock_pin_factory: Any) -> None:
    events: list[Event] = []
    loop = asyncio.get_running_loop()
    panel = VirtualPanel(PanelSettings(), InteractionSettings(), events.append, loop=loop, factory=mock_pin_factory)
    flipped: list[str] = []
    bare = KeyboardControl(panel, loop, hold_seconds=0.1, on_quit=lambda: None)
    assert "o:" not in bare.help and bare.help.startswith(BASE_KEYS_HELP)
    bare.feed("o")  # not wired: nothing happens, and the help never offered it
    keys = KeyboardControl(panel, loop, hold_seconds=0.1, on_quit=lambda: None,
                           keys=[Key("o", "network off/on", lambda: flipped.append("o")),
                                 Key("h", "headset plug/unplug", lambda: flipped.append("h"))])
    assert "o: network off/on" in keys.help and "h: headset plug/unplug" in keys.help
    for key in "oho":
        keys.feed(key)
    assert flipped == ["o", "h", "o"]
    keys.feed("t")
    for _ in range(50):  # gpiozero hands the press over to the loop
        if events:
            break
        await asyncio.sleep(0.02)
    assert events == [ButtonPressed(Button.TALK)]
    with pytest.raises(ValueError, match="distinct"):
        KeyboardControl(panel, loop, hold_seconds=0.1, on_quit=lambda: None, keys=[Key("c", "clash", lambda: None)])
    panel.close()
