"""``kiosk doctor gpio``: check the panel on the real header: blink each LED, wait for each button.

``check_gpio`` returns one ``CheckResult`` per check; the doctor command (``kiosk.doctor``) prints
them. Interactive runs ask the person at the kiosk what they saw and wait for each button press;
non-interactive runs check what needs no person: the pin factory loads, every pin can be claimed,
each button reads released at rest (a button reading pressed at rest means wrong pull or wiring).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kiosk.errors import DeviceError
from kiosk.settings import LedSpec, PanelSettings, Settings

_LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckResult:
    """One doctor check: what was checked, whether it passed, and the detail (the fix when it failed)."""

    name: str
    ok: bool
    detail: str


def _led_name(index: int, led: LedSpec) -> str:
    return f"led[{index}] ({led.kind} on GPIO {', '.join(str(p) for p in led.pins)})"


def check_gpio(
    settings: Settings | PanelSettings,
    *,
    interactive: bool | None = None,
    pin_factory: Any = None,
    ask: Callable[[str], str] = input,
    say: Callable[[str], None] = print,
    button_timeout_seconds: float = 15.0,
    blink_seconds: float = 0.6,
) -> list[CheckResult]:
    """Check the configured buttons and LEDs; interactive runs ask what lit and wait for presses.

    ``settings`` is the whole settings or just their panel section; ``interactive`` None means "when
    standard input is a terminal".
    """
    from gpiozero import LED, PWMLED, RGBLED
    from gpiozero import Button as GpioButton
    from gpiozero.exc import GPIOZeroError

    from kiosk.panel.gpio import make_pin_factory

    panel = settings.panel if isinstance(settings, Settings) else settings
    if interactive is None:
        interactive = sys.stdin.isatty()
    results: list[CheckResult] = []
    if not panel.enabled:
        return [CheckResult("gpio panel", True, "panel.enabled is false: nothing to check")]
    try:
        factory = pin_factory if pin_factory is not None else make_pin_factory(panel.pin_factory)
        if factory is None:
            from gpiozero import Device

            factory = Device._default_pin_factory()
    except (DeviceError, GPIOZeroError) as error:
        return [CheckResult("gpio pin factory", False, f"{error}")]
    results.append(CheckResult("gpio pin factory", True, type(factory).__name__))

    for index, led in enumerate(panel.leds):
        name = _led_name(index, led)
        try:
            if led.kind == "rgb":
                red, green, blue = led.pins
                device: Any = RGBLED(red, green, blue, active_high=led.active_high, pin_factory=factory)
                steps: list[tuple[str, Any]] = [("red", (1, 0, 0)), ("green", (0, 1, 0)), ("blue", (0, 0, 1))]
            elif led.kind == "pwm":
                device = PWMLED(led.pins[0], active_high=led.active_high, pin_factory=factory)
                steps = [("on", 1.0)]
            else:
                device = LED(led.pins[0], active_high=led.active_high, pin_factory=factory)
                steps = [("on", True)]
        except GPIOZeroError as error:
            results.append(CheckResult(name, False, f"cannot claim the pins: {error}; check panel.leds[{index}] "
                                                    "and that no other program uses them"))
            continue
        try:
            if interactive:
                say(f"Watch {name}: it lights {', then '.join(s for s, _ in steps)}.")
            for _, value in steps:
                device.value = value
                time.sleep(blink_seconds)
                device.value = (0, 0, 0) if led.kind == "rgb" else 0
                time.sleep(blink_seconds / 3)
            if interactive:
                answer = ask(f"Did {name} light {', '.join(s for s, _ in steps)} in that order? [y/n] ")
                ok = answer.strip().lower().startswith("y")
                detail = "seen lighting as expected" if ok else (
                    "not seen: check the wiring and resistor (hw/README.md), the pins, and "
                    f"panel.leds[{index}].active_high (common-anode RGB LEDs need false)")
                results.append(CheckResult(name, ok, detail))
            else:
                results.append(CheckResult(name, True, "pins claimed and driven (no one asked to watch)"))
        finally:
            device.close()

    buttons = [("talk button", panel.talk_button, "talk_button")]
    if panel.cancel_button is not None:
        buttons.append(("cancel button", panel.cancel_button, "cancel_button"))
    for label, spec, field in buttons:
        name = f"{label} (GPIO {spec.pin})"
        try:
            button = GpioButton(spec.pin, pull_up=spec.pull_up, pin_factory=factory)
        except GPIOZeroError as error:
            results.append(CheckResult(name, False, f"cannot claim the pin: {error}; check panel.{field}.pin"))
            continue
        try:
            if button.is_pressed:
                results.append(CheckResult(name, False, "reads pressed at rest: check the wiring, and "
                                                        f"panel.{field}.pull_up (true: button to ground)"))
                continue
            if not interactive:
                results.append(CheckResult(name, True, "reads released at rest (no one asked to press it)"))
                continue
            say(f"Press and release the {label} within {button_timeout_seconds:.0f} s.")
            pressed = button.wait_for_press(timeout=button_timeout_seconds)
            released = pressed and button.wait_for_release(timeout=button_timeout_seconds)
            if pressed and released:
                results.append(CheckResult(name, True, "press and release seen"))
            elif pressed:
                results.append(CheckResult(name, False, "pressed but never released: a stuck button or a short"))
            else:
                results.append(CheckResult(name, False, f"no press within {button_timeout_seconds:.0f} s: check the "
                                                        f"wiring (hw/README.md) and panel.{field}"))
        finally:
            button.close()
    return results
