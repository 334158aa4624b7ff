"""The GPIO panel on gpiozero's real MockFactory: pins in, events out; patterns in, pin states out."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pydantic import ValidationError

from kiosk.errors import DeviceError
from kiosk.events import Button, ButtonHeld, ButtonPressed, ButtonReleased, Event
from kiosk.panel.gpio import GpioPanel, make_pin_factory
from kiosk.settings import ButtonSpec, InteractionSettings, LedSpec, PanelSettings


async def _until(predicate: Any, timeout_seconds: float = 3.0) -> None:
    """Wait for something gpiozero's own threads do in real time (LED animation, hold detection)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_seconds
    while not predicate():
        assert loop.time() < deadline, "gpiozero did not get there in time"
        await asyncio.sleep(0.02)


def _panel(factory: Any, events: list[Event], panel: PanelSettings | None = None,
           hold_seconds: float = 5.0) -> GpioPanel:
    return GpioPanel(panel or PanelSettings(cancel_button=ButtonSpec(pin=27)),
                     InteractionSettings(status_hold_seconds=hold_seconds), events.append,
                     loop=asyncio.get_running_loop(), pin_factory=factory)


async def test_buttons_post_pressed_released_in_order(mock_pin_factory: Any) -> None:
    events: list[Event] = []
    panel = _panel(mock_pin_factory, events)
    talk, cancel = mock_pin_factory.pin(17), mock_pin_factory.pin(27)
    talk.drive_low()
    talk.drive_high()
    cancel.drive_low()
    cancel.drive_high()
    await asyncio.sleep(0)  # the callbacks only scheduled the hand-over; the loop delivers it now
    assert events == [ButtonPressed(Button.TALK), ButtonReleased(Button.TALK),
                      ButtonPressed(Button.CANCEL), ButtonReleased(Button.CANCEL)]
    assert not panel.is_pressed(Button.TALK)
    panel.close()


async def test_pull_down_button_is_pressed_when_driven_high(mock_pin_factory: Any) -> None:
    events: list[Event] = []
    settings = PanelSettings(talk_button=ButtonSpec(pin=5, pull_up=False))
    panel = _panel(mock_pin_factory, events, settings)
    mock_pin_factory.pin(5).drive_high()
    await asyncio.sleep(0)
    assert events == [ButtonPressed(Button.TALK)] and panel.is_pressed(Button.TALK)
    panel.close()


async def test_long_hold_posts_held(mock_pin_factory: Any) -> None:
    events: list[Event] = []
    panel = _panel(mock_pin_factory, events, hold_seconds=0.2)
    mock_pin_factory.pin(17).drive_low()
    await _until(lambda: ButtonHeld(Button.TALK) in events)
    mock_pin_factory.pin(17).drive_high()
    await asyncio.sleep(0)
    assert events == [ButtonPressed(Button.TALK), ButtonHeld(Button.TALK), ButtonReleased(Button.TALK)]
    panel.close()


def _rgb(factory: Any, pins: tuple[int, int, int] = (22, 23, 24)) -> tuple[float, ...]:
    return tuple(float(factory.pin(p).state) for p in pins)


async def test_solid_patterns_set_the_rgb_pins(mock_pin_factory: Any) -> None:
    panel = _panel(mock_pin_factory, [])
    panel.show("listening")
    assert _rgb(mock_pin_factory) == (0.0, 1.0, 0.0)
    panel.show("recording_message")
    assert _rgb(mock_pin_factory) == (1.0, 0.0, 0.0)
    assert panel.readback() == [(1.0, 0.0, 0.0)]
    panel.close()


async def test_common_anode_rgb_inverts_the_pins(mock_pin_factory: Any) -> None:
    settings = PanelSettings(leds=[LedSpec(kind="rgb", pins=[22, 23, 24], active_high=False)])
    panel = _panel(mock_pin_factory, [], settings)
    panel.show("listening")
    assert _rgb(mock_pin_factory) == (1.0, 0.0, 1.0)  # green sinks current: its pin goes low
    assert panel.readback() == [(0.0, 1.0, 0.0)]
    panel.close()


async def test_blink_and_pulse_run_in_gpiozeros_threads(mock_pin_factory: Any) -> None:
    settings = PanelSettings(leds=[LedSpec(kind="rgb", pins=[22, 23, 24]), LedSpec(kind="pwm", pins=[5]),
                                   LedSpec(kind="led", pins=[6])])
    panel = _panel(mock_pin_factory, [], settings)
    red, pwm, onoff = (mock_pin_factory.pin(p) for p in (22, 5, 6))
    panel.show("error")  # red blink 0.2 / 0.2
    for pin in (red, pwm, onoff):
        pin.clear_states()
    await _until(lambda: len(red.states) >= 4 and len(onoff.states) >= 4)
    assert {s.state for s in red.states[1:]} == {0.0, 1.0}
    assert {float(s.state) for s in onoff.states[1:]} == {0.0, 1.0}
    assert float(mock_pin_factory.pin(23).state) == 0.0  # green stays dark
    panel.show("idle")  # blue breathing: intermediate PWM levels; the on/off LED blinks instead
    pwm.clear_states()
    await _until(lambda: any(0.05 < float(s.state) < 0.95 for s in pwm.states))
    panel.close()


def test_pin_validation_names_the_field_and_fix() -> None:
    with pytest.raises(ValidationError, match=r"cancel_button.pin: GPIO 17 is already used by talk_button.pin"):
        PanelSettings(cancel_button=ButtonSpec(pin=17))
    with pytest.raises(ValidationError, match=r"not a header GPIO"):
        PanelSettings(talk_button=ButtonSpec(pin=40))
    with pytest.raises(ValidationError, match=r"rgb LED needs 3 pin"):
        LedSpec(kind="rgb", pins=[1])


def test_pin_factory_by_name() -> None:
    from gpiozero.pins.mock import MockFactory, MockPWMPin

    factory = make_pin_factory("mock")
    assert isinstance(factory, MockFactory) and factory.pin_class is MockPWMPin
    assert make_pin_factory(None) is None
    with pytest.raises(DeviceError, match="not a gpiozero pin factory; use one of .*mock"):
        make_pin_factory("quantum")


async def test_a_pin_held_by_someone_else_is_a_device_error(mock_pin_factory: Any) -> None:
    first = _panel(mock_pin_factory, [])
    with pytest.raises(DeviceError, match="GPIO panel cannot start"):
        _panel(mock_pin_factory, [])
    first.close()
    _panel(mock_pin_factory, []).close()  # released pins can be used again


# ------------------------------------------------------------------------------------ virtual panel
async def test_keyboard_space_auto_repeat_holds_then_releases(mock_pin_factory: Any) -> None:
    from kiosk_dev.terminal import KeyboardControl, VirtualPanel

    events: list[Event] = []
    loop = asyncio.get_running_loop()
    panel = VirtualPanel(PanelSettings(), InteractionSettings(), events.append, loop=loop, factory=mock_pin_factory)
    assert panel.settings.cancel_button is not None  # the virtual panel always has a cancel button
    quit_seen: list[bool] = []
    keys = KeyboardControl(panel, loop, hold_seconds=0.1, on_quit=lambda: quit_seen.append(True),
                           release_gap_seconds=0.1, first_repeat_seconds=0.15)
    keys.feed(" ")
    for _ in range(5):  # auto-repeat every 50 ms keeps the button down
        await asyncio.sleep(0.05)
        keys.feed(" ")
        assert panel.is_pressed()
    await _until(lambda: not panel.is_pressed())
    assert events == [ButtonPressed(Button.TALK), ButtonReleased(Button.TALK)]
    keys.toggle = True
    keys.feed(" ")
    assert panel.is_pressed()
    keys.feed("t")
    assert not panel.is_pressed()
    keys.feed("c")
    await _until(lambda: ButtonReleased(Button.CANCEL) in events)
    keys.feed("q")
    assert quit_seen == [True]
    assert "pattern=" in panel.status_line(colour=False)
    panel.close()


@pytest.mark.slow
def test_kiosk_panel_runs_a_script_without_a_terminal(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from kiosk.__main__ import main

    script = tmp_path / "visit.txt"
    script.write_text("press talk\nwait 0.3\nrelease talk  # the scripted agent answers\nwait 4.5\n"
                      "network off\npress\nrelease\nwait 1.5\nquit\n")
    assert main(["panel", "--script", str(script), "--json"]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[out.index("{"):])
    states = [entry["state"] for entry in report["timeline"]]
    assert states[:7] == ["starting", "idle", "connecting", "listening", "thinking", "speaking", "listening"]
    assert states[-1] == "offline" and "pattern=offline" in out
    script.write_text("jump\n")
    assert main(["panel", "--script", str(script)]) == 2
    assert "not a panel command" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ doctor
def test_doctor_non_interactive(mock_pin_factory: Any) -> None:
    from kiosk.panel.doctor import check_gpio
    from kiosk.settings import Settings

    settings = Settings(panel=PanelSettings(cancel_button=ButtonSpec(pin=27)))
    results = check_gpio(settings, interactive=False, pin_factory=mock_pin_factory, blink_seconds=0.01)
    assert [r.status.value for r in results] == ["ok", "ok", "ok", "ok"]
    assert [r.name for r in results][1:] == ["led[0] (rgb on GPIO 22, 23, 24)", "talk button (GPIO 17)",
                                             "cancel button (GPIO 27)"]
    assert [s.state for s in mock_pin_factory.pin(23).states].count(1.0) == 1  # green lit once


def test_doctor_interactive_waits_for_each_button(mock_pin_factory: Any) -> None:
    import threading

    from kiosk.panel.doctor import check_gpio

    def say(text: str) -> None:
        if "Press and release the talk button" in text:
            def visitor() -> None:
                pin = mock_pin_factory.pin(17)
                pin.drive_low()
                pin.drive_high()
            threading.Timer(0.1, visitor).start()

    settings = PanelSettings(cancel_button=ButtonSpec(pin=27))
    results = check_gpio(settings, interactive=True, pin_factory=mock_pin_factory, ask=lambda q: "n", say=say,
                         button_timeout_seconds=0.5, blink_seconds=0.01)
    by_name = {r.name.split(" (")[0]: r for r in results}
    assert by_name["talk button"].status == "ok" and by_name["talk button"].summary == "press and release seen"
    assert by_name["cancel button"].status == "fail" and "no press within" in by_name["cancel button"].summary
    assert by_name["led[0]"].status == "fail" and "active_high" in by_name["led[0]"].summary


def test_doctor_reports_a_broken_pin_factory() -> None:
    from kiosk.panel.doctor import check_gpio

    results = check_gpio(PanelSettings(pin_factory="quantum"), interactive=False)
    assert len(results) == 1 and results[0].status == "fail" and "not a gpiozero pin factory" in results[0].summary
    assert results[0].fix is not None and "panel.pin_factory" in results[0].fix


def test_doctor_folds_gpiozero_fallback_warnings_into_the_check(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Off a Pi, gpiozero warns once per pin factory it cannot load; the report says so in one line."""
    import warnings

    from gpiozero import Device
    from gpiozero.exc import PinFactoryFallback
    from gpiozero.pins.mock import MockFactory

    from kiosk.panel.doctor import check_gpio

    def fallback() -> MockFactory:
        warnings.warn(PinFactoryFallback("Falling back from lgpio: No module named 'lgpio'"), stacklevel=1)
        return MockFactory()

    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    monkeypatch.setattr(Device, "_default_pin_factory", staticmethod(fallback))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning escaping the check would fail the test
        results = check_gpio(PanelSettings(), interactive=False, blink_seconds=0.01)
    assert results[0].name == "pin factory" and results[0].status == "ok"
    assert "Falling back from lgpio" in results[0].summary and "MockFactory" in results[0].summary
    assert "Falling back" not in capsys.readouterr().err


def test_mock_factory_from_the_environment_can_dim(monkeypatch: pytest.MonkeyPatch) -> None:
    from gpiozero.pins.mock import MockPWMPin

    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "mock")
    factory = make_pin_factory(None)
    assert factory is not None and factory.pin_class is MockPWMPin


async def test_open_panel_follows_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from kiosk.panel.gpio import open_panel

    loop = asyncio.get_running_loop()
    assert open_panel(PanelSettings(enabled=False), InteractionSettings(), print, loop=loop) is None
    panel = open_panel(PanelSettings(pin_factory="mock"), InteractionSettings(), print, loop=loop)
    assert panel is not None and panel.readback() == [(0.0, 0.0, 0.0)]
    panel.close()


# ------------------------------------------------------------------------------------ staff-call output
async def test_the_staff_output_pulses_and_is_off_at_start_and_close(mock_pin_factory: Any) -> None:
    from kiosk.settings import StaffOutputSpec

    events: list[Event] = []
    settings = PanelSettings(staff_output=StaffOutputSpec(pin=26, pulse_seconds=0.15))
    panel = _panel(mock_pin_factory, events, settings)
    pin = mock_pin_factory.pin(26)
    assert not pin.state
    panel.call_staff()
    await _until(lambda: bool(pin.state))
    await _until(lambda: not pin.state, 1.0)  # switched off by gpiozero's thread after pulse_seconds
    panel.call_staff()
    await _until(lambda: bool(pin.state))
    panel.close()  # closing mid-pulse never leaves a bell or beacon on
    assert not pin.state and events == []


async def test_without_a_staff_output_call_staff_says_what_to_set(mock_pin_factory: Any) -> None:
    panel = _panel(mock_pin_factory, [])
    with pytest.raises(DeviceError, match="panel.staff_output"):
        panel.call_staff()
    panel.close()


def test_doctor_claims_the_staff_output_and_pulses_it_only_with_someone_there(mock_pin_factory: Any) -> None:
    from kiosk.panel.doctor import check_gpio
    from kiosk.settings import StaffOutputSpec

    settings = PanelSettings(staff_output=StaffOutputSpec(pin=26, pulse_seconds=0.05))
    results = check_gpio(settings, interactive=False, pin_factory=mock_pin_factory, blink_seconds=0.01)
    staff = next(r for r in results if r.name.startswith("staff-call output"))
    assert staff.status == "ok" and "left off" in staff.summary
    assert [s.state for s in mock_pin_factory.pin(26).states].count(True) == 0  # nobody there: no bell
    answers = iter(["y", "y"])
    results = check_gpio(settings, interactive=True, pin_factory=mock_pin_factory, ask=lambda q: next(answers, "n"),
                         say=lambda text: None, button_timeout_seconds=0.05, blink_seconds=0.01)
    staff = next(r for r in results if r.name.startswith("staff-call output"))
    assert staff.status == "ok" and staff.summary == "seen switching on and off"
    assert [s.state for s in mock_pin_factory.pin(26).states].count(True) == 1
