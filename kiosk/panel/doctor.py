"""``kiosk doctor gpio``: check the panel on the real header: blink each LED, wait for each button.

``check_gpio`` returns one ``Check`` per part; the doctor command (``kiosk.doctor``) prints them.
Interactive runs ask the person at the kiosk what they saw and wait for each button press;
non-interactive runs check what needs no person: the pin factory loads, every pin can be claimed,
each button reads released at rest (a button reading pressed at rest means wrong pull or wiring).
gpiozero's own warnings (its pin factory fallbacks off a Pi) become part of the pin factory's line
instead of raw text before the report.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

from kiosk.checks import Check, Verdict
from kiosk.errors import DeviceError
from kiosk.settings import LedSpec, PanelSettings, Settings, StaffOutputSpec

_LOGGER = logging.getLogger(__name__)

_WIRING_FIX = "check the wiring against hw/README.md"
_FACTORY_FIX = "set panel.pin_factory (lgpio on a Pi, with python3-lgpio installed; mock without a Pi)"


def _result(name: str, ok: bool, detail: str, fix: str = _WIRING_FIX) -> Check:
    return Check("gpio", name, Verdict.OK if ok else Verdict.FAIL, detail, None if ok else fix)


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
) -> list[Check]:
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
    results: list[Check] = []
    if not panel.enabled:
        return [Check("gpio", "panel", Verdict.SKIP, "panel.enabled is false: nothing to check")]
    with warnings.catch_warnings(record=True) as caught:
        # gpiozero warns (PinFactoryFallback) for each factory it tries and skips: fold them into this line.
        warnings.simplefilter("always")
        try:
            factory = pin_factory if pin_factory is not None else make_pin_factory(panel.pin_factory)
            if factory is None:
                from gpiozero import Device

                factory = Device._default_pin_factory()
        except (DeviceError, GPIOZeroError) as error:
            tried = "; ".join(str(w.message) for w in caught)
            return [_result("pin factory", False, f"{error}" + (f" (tried: {tried})" if tried else ""),
                            _FACTORY_FIX)]
    skipped = [str(w.message) for w in caught]
    results.append(_result("pin factory", True, type(factory).__name__
                           + (f" (after {len(skipped)} fallback(s): {'; '.join(skipped)})" if skipped else "")))

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
            results.append(_result(name, False, f"cannot claim the pins: {error}; check panel.leds[{index}] "
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
                results.append(_result(name, ok, detail))
            else:
                results.append(_result(name, True, "pins claimed and driven (no one asked to watch)"))
        finally:
            device.close()

    staff = panel.staff_output
    if staff is not None:
        results.append(_check_staff_output(staff, factory, interactive, ask, say))

    buttons = [("talk button", panel.talk_button, "talk_button")]
    if panel.cancel_button is not None:
        buttons.append(("cancel button", panel.cancel_button, "cancel_button"))
    for label, spec, field in buttons:
        name = f"{label} (GPIO {spec.pin})"
        try:
            button = GpioButton(spec.pin, pull_up=spec.pull_up, pin_factory=factory)
        except GPIOZeroError as error:
            results.append(_result(name, False, f"cannot claim the pin: {error}; check panel.{field}.pin"))
            continue
        try:
            if button.is_pressed:
                results.append(_result(name, False, "reads pressed at rest: check the wiring, and "
                                                        f"panel.{field}.pull_up (true: button to ground)"))
                continue
            if not interactive:
                results.append(_result(name, True, "reads released at rest (no one asked to press it)"))
                continue
            say(f"Press and release the {label} within {button_timeout_seconds:.0f} s.")
            pressed = button.wait_for_press(timeout=button_timeout_seconds)
            released = pressed and button.wait_for_release(timeout=button_timeout_seconds)
            if pressed and released:
                results.append(_result(name, True, "press and release seen"))
            elif pressed:
                results.append(_result(name, False, "pressed but never released: a stuck button or a short"))
            else:
                results.append(_result(name, False, f"no press within {button_timeout_seconds:.0f} s: check the "
                                                        f"wiring (hw/README.md) and panel.{field}"))
        finally:
            button.close()
    return results


def _check_staff_output(staff: StaffOutputSpec, factory: Any, interactive: bool, ask: Callable[[str], str],
                        say: Callable[[str], None]) -> Check:
    """Claim the staff-call output; with someone at the kiosk, pulse it once and ask whether it rang."""
    from gpiozero import DigitalOutputDevice
    from gpiozero.exc import GPIOZeroError

    name = f"staff-call output (GPIO {staff.pin})"
    try:
        device = DigitalOutputDevice(staff.pin, active_high=staff.active_high, initial_value=False,
                                     pin_factory=factory)
    except GPIOZeroError as error:
        return _result(name, False, f"cannot claim the pin: {error}; check panel.staff_output.pin")
    try:
        if not interactive:
            # Nobody is there to hear it: a bell or beacon is not set off unasked.
            return _result(name, True, "pin claimed, left off (no one asked to watch)")
        say(f"Watch and listen: the {name} switches on for {staff.pulse_seconds:g} s (bell, beacon or relay click).")
        device.on()
        time.sleep(staff.pulse_seconds)
        device.off()
        ok = ask("Did the bell, beacon or relay go on and off again? [y/n] ").strip().lower().startswith("y")
        return _result(name, ok, "seen switching on and off" if ok else (
            "not seen: check the wiring (hw/README.md, staff-call output), the relay module's supply, and "
            "panel.staff_output.active_high (false for an active-low relay module)"))
    finally:
        device.off()
        device.close()


def check_panel(settings: Settings) -> list[Check]:
    """``kiosk doctor gpio``: ``check_gpio`` on the configured panel, asking the person at a terminal."""
    def ask(prompt: str) -> str:
        sys.stderr.write(prompt)
        sys.stderr.flush()
        return sys.stdin.readline().strip()

    def say(message: str) -> None:
        print(message, file=sys.stderr)

    try:
        # Interactive on a terminal (blink each LED, wait for each button); prompts go to stderr so the
        # report on stdout (and --json) stays clean.
        return check_gpio(settings.panel, ask=ask, say=say)
    except Exception as error:  # a broken pin factory or a missing gpiochip must read as a failed check
        return [Check("gpio", "panel", Verdict.FAIL, f"the GPIO check failed: {error}",
                      "check panel.pin_factory and that the kiosk user is in the gpio group")]
