"""The GPIO panel: gpiozero Buttons and LEDs (LED, PWMLED, RGBLED) with the pin factory injected.

gpiozero calls button callbacks on its own threads; they only hand a pre-built event to the asyncio
loop with ``loop.call_soon_threadsafe``. LED patterns use gpiozero's own ``blink()`` and ``pulse()``,
which run in gpiozero's background threads, so the loop never animates LEDs itself.

The optional staff-call output (``panel.staff_output``: a relay module, bell or beacon, hw/README.md) is a
gpiozero ``DigitalOutputDevice``; ``call_staff()`` switches it on for ``pulse_seconds`` with a one-shot
``blink`` in gpiozero's background thread (the ``StaffSignal`` port), so the loop never waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from kiosk.errors import DeviceError
from kiosk.events import Button, ButtonHeld, ButtonPressed, ButtonReleased, Event
from kiosk.panel.patterns import Blink, Off, Pattern, Pulse, Solid, pattern_named
from kiosk.ports import EventSink
from kiosk.settings import ButtonSpec, InteractionSettings, LedSpec, PanelSettings

_LOGGER = logging.getLogger(__name__)


def make_pin_factory(name: str | None) -> Any:
    """A gpiozero pin factory by name (``mock`` gets PWM-capable mock pins); None: gpiozero's own choice.

    ``GPIOZERO_PIN_FACTORY=mock`` in the environment (with ``name`` None) also gets PWM-capable mock pins:
    gpiozero's default mock pins cannot dim, and the panel's PWM and RGB LEDs need that.
    """
    if name is None:
        if os.environ.get("GPIOZERO_PIN_FACTORY", "").lower() == "mock":
            return make_pin_factory("mock")
        return None
    if name.lower() == "mock":
        from gpiozero.pins.mock import MockFactory, MockPWMPin

        return MockFactory(pin_class=MockPWMPin)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        group = entry_points(group="gpiozero_pin_factories")
    for entry in group:
        if entry.name.lower() == name.lower():
            try:
                return entry.load()()
            except Exception as error:  # a missing C library or no GPIO chip: say which and how to fix
                raise DeviceError(
                    f"pin factory '{name}' cannot start ({error}); on a Pi install its library "
                    "(e.g. python3-lgpio), elsewhere set panel.pin_factory = \"mock\"", code="gpio_factory",
                ) from error
    known = sorted({e.name for e in group} | {"mock"})
    raise DeviceError(f"panel.pin_factory '{name}' is not a gpiozero pin factory; use one of {', '.join(known)}",
                      code="gpio_factory")


@dataclass
class LedDevice:
    """One configured LED and the gpiozero device driving it."""

    spec: LedSpec
    device: Any  # gpiozero LED, PWMLED or RGBLED

    def readback(self) -> tuple[float, ...]:
        """The current output value(s) read back from the device (one, or r, g, b)."""
        value = self.device.value
        if isinstance(value, tuple):
            return tuple(float(v) for v in value)
        return (float(value),)


class GpioPanel:
    """The ``Panel`` port on gpiozero: buttons post events, ``show`` drives the LEDs."""

    def __init__(
        self,
        panel: PanelSettings,
        interaction: InteractionSettings,
        sink: EventSink,
        *,
        loop: asyncio.AbstractEventLoop,
        pin_factory: Any = None,
    ) -> None:
        from gpiozero import LED, PWMLED, RGBLED, DigitalOutputDevice
        from gpiozero import Button as GpioButton
        from gpiozero.exc import GPIOZeroError

        self.factory = pin_factory if pin_factory is not None else make_pin_factory(panel.pin_factory)
        self.settings = panel
        self.buttons: dict[Button, Any] = {}
        self.leds: list[LedDevice] = []
        self.pattern: Pattern | None = None
        self.staff_output: Any = None  # gpiozero DigitalOutputDevice, when panel.staff_output is set
        specs: list[tuple[Button, ButtonSpec]] = [(Button.TALK, panel.talk_button)]
        if panel.cancel_button is not None:
            specs.append((Button.CANCEL, panel.cancel_button))
        try:
            for which, spec in specs:
                device = GpioButton(spec.pin, pull_up=spec.pull_up, bounce_time=spec.bounce_ms / 1000 or None,
                                    hold_time=interaction.status_hold_seconds, pin_factory=self.factory)
                device.when_pressed = _poster(loop, sink, ButtonPressed(which))
                device.when_released = _poster(loop, sink, ButtonReleased(which))
                device.when_held = _poster(loop, sink, ButtonHeld(which))
                self.buttons[which] = device
            for led in panel.leds:
                if led.kind == "rgb":
                    red, green, blue = led.pins
                    dev: Any = RGBLED(red, green, blue, active_high=led.active_high, pwm=True,
                                      pin_factory=self.factory)
                elif led.kind == "pwm":
                    dev = PWMLED(led.pins[0], active_high=led.active_high, pin_factory=self.factory)
                else:
                    dev = LED(led.pins[0], active_high=led.active_high, pin_factory=self.factory)
                self.leds.append(LedDevice(led, dev))
            staff = panel.staff_output
            if staff is not None:
                # Off at start (initial_value=False) whatever the wiring's active level.
                self.staff_output = DigitalOutputDevice(staff.pin, active_high=staff.active_high, initial_value=False,
                                                        pin_factory=self.factory)
        except GPIOZeroError as error:
            self.close()
            raise DeviceError(f"GPIO panel cannot start: {error}; check panel.* pins against hw/README.md "
                              "(and that no other program holds them)", code="gpio_panel") from error

    def show(self, pattern: str) -> None:
        """Show the named LED pattern on every LED."""
        chosen = pattern_named(pattern)
        self.pattern = chosen
        for led in self.leds:
            _apply(led, chosen)

    def call_staff(self) -> None:
        """Switch the staff-call output on for ``pulse_seconds`` (gpiozero's thread switches it off again).

        ``DeviceError`` when no output is configured or gpiozero refuses; the tool turns that into ``failed``.
        """
        from gpiozero.exc import GPIOZeroError

        spec = self.settings.staff_output
        if self.staff_output is None or spec is None:
            raise DeviceError("no staff-call output: set panel.staff_output (hw/README.md)", code="gpio_staff_output")
        try:
            self.staff_output.blink(on_time=spec.pulse_seconds, off_time=0.0, n=1, background=True)
        except GPIOZeroError as error:
            raise DeviceError(f"the staff-call output on GPIO {spec.pin} failed: {error}", code="gpio_staff_output") \
                from error

    def readback(self) -> list[tuple[float, ...]]:
        """Every LED's current value(s), read back from the pins."""
        return [led.readback() for led in self.leds]

    def is_pressed(self, button: Button) -> bool:
        """Whether ``button`` reads as pressed now."""
        device = self.buttons.get(button)
        return bool(device is not None and device.is_pressed)

    def close(self) -> None:
        """Stop LED threads and release every pin."""
        for led in self.leds:
            led.device.close()
        for device in self.buttons.values():
            device.close()
        if self.staff_output is not None:
            self.staff_output.off()  # never leave a relay or beacon switched on
            self.staff_output.close()
            self.staff_output = None
        self.leds.clear()
        self.buttons.clear()


def _poster(loop: asyncio.AbstractEventLoop, sink: EventSink, event: Event) -> Callable[[], None]:
    """A gpiozero callback that hands ``event`` (built once, here) to the loop."""

    def post() -> None:
        # gpiozero's thread: only hand over; the loop runs the sink. Never block, raise or log here.
        loop.call_soon_threadsafe(sink, event)

    return post


def _apply(led: LedDevice, pattern: Pattern) -> None:
    """Drive one LED with gpiozero's own blink/pulse threads."""
    b = pattern.brightness
    dev = led.device
    if led.spec.kind == "rgb":
        if isinstance(b, Solid):
            dev.color = tuple(c * b.level for c in pattern.colour)
        elif isinstance(b, Off):
            dev.off()
        elif isinstance(b, Blink):
            dev.blink(on_time=b.on_seconds, off_time=b.off_seconds, on_color=pattern.colour)
        else:
            dev.pulse(fade_in_time=b.fade_in_seconds, fade_out_time=b.fade_out_seconds, on_color=pattern.colour)
    elif led.spec.kind == "pwm":
        if isinstance(b, Solid):
            dev.value = b.level
        elif isinstance(b, Off):
            dev.off()
        elif isinstance(b, Blink):
            dev.blink(on_time=b.on_seconds, off_time=b.off_seconds)
        else:
            dev.pulse(fade_in_time=b.fade_in_seconds, fade_out_time=b.fade_out_seconds)
    elif isinstance(b, Solid):
        dev.on() if b.level > 0 else dev.off()
    elif isinstance(b, Off):
        dev.off()
    elif isinstance(b, Blink):
        dev.blink(on_time=b.on_seconds, off_time=b.off_seconds)
    else:
        assert isinstance(b, Pulse)
        # An on/off LED cannot fade: the pulse becomes a blink with the same rhythm.
        dev.blink(on_time=b.fade_in_seconds, off_time=b.fade_out_seconds)


def open_panel(
    panel: PanelSettings, interaction: InteractionSettings, sink: EventSink, *, loop: asyncio.AbstractEventLoop,
) -> GpioPanel | None:
    """The app's panel: a ``GpioPanel`` on the configured pin factory, or None when ``panel.enabled`` is false."""
    if not panel.enabled:
        _LOGGER.info("GPIO panel disabled (panel.enabled = false): no buttons or LEDs")
        return None
    return GpioPanel(panel, interaction, sink, loop=loop)
