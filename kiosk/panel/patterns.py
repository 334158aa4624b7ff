"""LED patterns: one pure mapping from the kiosk's state to what the status LEDs show.

A pattern is data: a colour (for RGB LEDs; single-colour LEDs use the brightness only) and a
brightness over time: ``Solid(level)``, ``Off``, ``Blink(on, off)`` or ``Pulse(fade_in, fade_out)``.
``kiosk.panel.gpio`` drives gpiozero's own ``blink()``/``pulse()`` from it; ``level_at`` gives the same
brightness as a pure function of time (the terminal panel's preview, tests, docs). hw/README.md
documents the table.
"""

from __future__ import annotations

from dataclasses import dataclass

from kiosk.errors import KioskError
from kiosk.state import KioskState, pattern_key

Colour = tuple[float, float, float]


@dataclass(frozen=True, slots=True)
class Solid:
    """Steadily on at ``level`` (0..1)."""

    level: float = 1.0


@dataclass(frozen=True, slots=True)
class Off:
    """Dark."""


@dataclass(frozen=True, slots=True)
class Blink:
    """On for ``on_seconds``, off for ``off_seconds``, repeated."""

    on_seconds: float
    off_seconds: float


@dataclass(frozen=True, slots=True)
class Pulse:
    """Fade in over ``fade_in_seconds``, out over ``fade_out_seconds``, repeated (on/off LEDs blink instead)."""

    fade_in_seconds: float
    fade_out_seconds: float


Brightness = Solid | Off | Blink | Pulse

WHITE: Colour = (1.0, 1.0, 1.0)
BLUE: Colour = (0.0, 0.0, 1.0)
GREEN: Colour = (0.0, 1.0, 0.0)
YELLOW: Colour = (1.0, 0.8, 0.0)
CYAN: Colour = (0.0, 0.8, 1.0)
AMBER: Colour = (1.0, 0.4, 0.0)
MAGENTA: Colour = (1.0, 0.0, 1.0)
RED: Colour = (1.0, 0.0, 0.0)
VIOLET: Colour = (0.6, 0.0, 1.0)


@dataclass(frozen=True, slots=True)
class Pattern:
    """What the status LEDs show in one state."""

    name: str
    colour: Colour
    brightness: Brightness
    meaning: str

    def level_at(self, t_seconds: float) -> float:
        """Brightness 0..1 at ``t_seconds`` after the pattern started (what gpiozero's threads render)."""
        b = self.brightness
        if isinstance(b, Solid):
            return b.level
        if isinstance(b, Off):
            return 0.0
        if isinstance(b, Blink):
            return 1.0 if t_seconds % (b.on_seconds + b.off_seconds) < b.on_seconds else 0.0
        t = t_seconds % (b.fade_in_seconds + b.fade_out_seconds)
        if t < b.fade_in_seconds:
            return t / b.fade_in_seconds
        return 1.0 - (t - b.fade_in_seconds) / b.fade_out_seconds

    def rgb_at(self, t_seconds: float) -> Colour:
        """The RGB value at ``t_seconds`` (colour scaled by brightness)."""
        level = self.level_at(t_seconds)
        r, g, b = self.colour
        return (r * level, g * level, b * level)


_ALL = (
    Pattern("starting", WHITE, Blink(0.1, 0.9), "starting up"),
    Pattern("idle", BLUE, Pulse(2.0, 2.0), "ready: press to talk (slow breathing)"),
    Pattern("connecting", BLUE, Blink(0.15, 0.15), "opening a session"),
    Pattern("consent", WHITE, Pulse(0.75, 0.75), "the AI notice is playing: the microphone is not live yet"),
    Pattern("listening", GREEN, Solid(1.0), "the microphone is live: speak now"),
    Pattern("thinking", YELLOW, Pulse(0.5, 0.5), "the agent is working on an answer"),
    Pattern("speaking", CYAN, Pulse(0.3, 0.3), "the agent is speaking (press to interrupt)"),
    Pattern("tool", YELLOW, Blink(0.1, 0.1), "the agent is using one of the kiosk's tools: the answer goes on"),
    Pattern("staff_called", VIOLET, Pulse(1.0, 1.0), "a member of staff has been called (call_staff)"),
    Pattern("offline", AMBER, Blink(1.0, 1.0), "no network or service: press to hear why and leave a message"),
    Pattern("maintenance", AMBER, Pulse(1.5, 1.5), "the service is in maintenance: press to leave a message"),
    Pattern("credits_exhausted", MAGENTA, Blink(1.0, 1.0), "the account has no credits: press to leave a message"),
    Pattern("budget_cap", MAGENTA, Pulse(1.5, 1.5), "the spending cap is reached: press to leave a message"),
    Pattern("recording_message", RED, Solid(1.0), "recording a visitor's message"),
    Pattern("error", RED, Blink(0.2, 0.2), "something failed (audio device, ...): see the status endpoint"),
)

PATTERNS: dict[str, Pattern] = {p.name: p for p in _ALL}


def pattern_named(name: str) -> Pattern:
    """The pattern called ``name``; a ``KioskError`` names the known ones if there is none."""
    try:
        return PATTERNS[name]
    except KeyError:
        raise KioskError("unknown_pattern",
                         f"no LED pattern named '{name}'; known: {', '.join(PATTERNS)}") from None


def pattern_for(state: KioskState) -> Pattern:
    """The LED pattern for ``state`` (the one mapping the panel and the docs use)."""
    return PATTERNS[pattern_key(state)]
