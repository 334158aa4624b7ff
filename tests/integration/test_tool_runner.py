"""The tool runner with the real GPIO panel on gpiozero's mock pins: every check in order, the staff-call output
seen on its pin, the events the state machine gets, one metric and one log line per call (no arguments)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest

from kiosk.errors import DeviceError
from kiosk.events import EndRequested, Event, MessageRequested, StaffCalled, Tool, ToolFinished, ToolStarted
from kiosk.fallback.sealing import encode_key, generate_keypair
from kiosk.metrics import Metrics
from kiosk.panel.gpio import GpioPanel
from kiosk.settings import InteractionSettings, Settings
from kiosk.tools import KioskSnapshot, ToolError, ToolRefused, ToolRunner

SUMMARY = "Visitor wants a call back about the broken printer"
STAFF_PIN = 26


def _settings(**tools: Any) -> Settings:
    return Settings(
        panel={"staff_output": {"pin": STAFF_PIN, "pulse_seconds": 0.2, "min_interval_seconds": 30.0,
                                "pattern_seconds": 5.0}},
        tools={"enabled": list(Tool), **tools},
        spool={"recipient_public_key": encode_key(generate_keypair()[1])},
    )


class Kit:
    """A runner wired to a GpioPanel on mock pins; events and the snapshot are plain attributes."""

    def __init__(self, factory: Any, settings: Settings) -> None:
        self.events: list[Event] = []
        self.metrics = Metrics()
        self.snapshot = KioskSnapshot(conversing=True, online=True, route="array", queued_messages=2)
        self.panel = GpioPanel(settings.panel, InteractionSettings(), self.events.append,
                               loop=asyncio.get_running_loop(), pin_factory=factory)
        self.runner = ToolRunner(settings, self.events.append, metrics=self.metrics, snapshot=lambda: self.snapshot,
                                 staff=self.panel)

    async def call(self, tool: Tool, payload: str = "", *, trusted: bool = True, session: str = "s1") -> Any:
        return json.loads(await self.runner.call(tool, payload, trusted=trusted, session_id=session))

    async def refused(self, tool: Tool, payload: str = "", *, trusted: bool = True, session: str = "s1") -> ToolRefused:
        with pytest.raises(ToolRefused) as caught:
            await self.runner.call(tool, payload, trusted=trusted, session_id=session)
        return caught.value

    def count(self, tool: Tool, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value("kiosk_tool_calls_total", {"tool": tool.value,
                                                                                  "outcome": outcome})
        return value or 0.0


@pytest.fixture
async def kit(mock_pin_factory: Any) -> Any:
    made = Kit(mock_pin_factory, _settings())
    yield made
    made.panel.close()


async def _pin_goes(factory: Any, level: bool, within_seconds: float = 2.0) -> float:
    started = time.monotonic()
    while bool(factory.pin(STAFF_PIN).state) is not level:
        assert time.monotonic() - started < within_seconds, f"GPIO {STAFF_PIN} did not go {level}"
        await asyncio.sleep(0.01)
    return time.monotonic() - started


async def test_call_staff_pulses_the_output_once_then_rate_limits(kit: Kit, mock_pin_factory: Any) -> None:
    assert not mock_pin_factory.pin(STAFF_PIN).state  # off from the start
    result = await kit.call(Tool.CALL_STAFF, "{}")
    assert "staff" in result["say"]
    await _pin_goes(mock_pin_factory, True)
    off_after = await _pin_goes(mock_pin_factory, False)
    assert off_after < 1.0  # pulse_seconds = 0.2, switched off by gpiozero's own thread
    assert kit.events == [ToolStarted(Tool.CALL_STAFF), StaffCalled(), ToolFinished(Tool.CALL_STAFF, "ok")]
    refused = await kit.refused(Tool.CALL_STAFF)
    assert refused.error is ToolError.RATE_LIMITED and refused.rpc_code == 2429
    assert 25 < json.loads(refused.data())["retry_after_seconds"] <= 30
    assert not mock_pin_factory.pin(STAFF_PIN).state  # the refused call did not touch the pin
    assert kit.count(Tool.CALL_STAFF, "ok") == 1 and kit.count(Tool.CALL_STAFF, "rate_limited") == 1


async def test_an_active_low_relay_module_is_held_off(mock_pin_factory: Any) -> None:
    settings = _settings()
    settings.panel.staff_output = settings.panel.staff_output.model_copy(update={"active_high": False})  # type: ignore[union-attr]
    made = Kit(mock_pin_factory, settings)
    try:
        assert mock_pin_factory.pin(STAFF_PIN).state  # high = off for an active-low input
        await made.call(Tool.CALL_STAFF)
        await _pin_goes(mock_pin_factory, False)
        await _pin_goes(mock_pin_factory, True)
    finally:
        made.panel.close()


async def test_refusals_in_order_each_counted_and_logged_without_arguments(
        kit: Kit, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="kiosk.tools")
    payload = json.dumps({"summary": SUMMARY})
    # Not the agent: refused before anything else is looked at, even a valid call.
    assert (await kit.refused(Tool.TAKE_MESSAGE, payload, trusted=False)).error is ToolError.NOT_AGENT
    assert (await kit.refused(Tool.TAKE_MESSAGE, '{"summary": "a\\nb"}')).error is ToolError.BAD_ARGUMENTS
    result = await kit.call(Tool.TAKE_MESSAGE, payload)
    assert "tone" in result["say"]
    requested = [e for e in kit.events if isinstance(e, MessageRequested)]
    assert len(requested) == 1 and requested[0].note is not None and requested[0].note.text == SUMMARY
    kit.snapshot = KioskSnapshot(conversing=False, online=True, route="array", queued_messages=0)
    assert (await kit.refused(Tool.END_CONVERSATION)).error is ToolError.UNAVAILABLE
    logged = [r.getMessage() for r in caplog.records if r.name == "kiosk.tools"]
    assert logged[0].startswith("tool take_message: not_agent in ") and logged[0].endswith(" ms")
    assert [line.split(":")[1].split(" in ")[0].strip() for line in logged] == [
        "not_agent", "bad_arguments", "ok", "unavailable"]
    text = "\n".join(r.getMessage() + repr(r.args) for r in caplog.records)
    assert SUMMARY not in text and "printer" not in text  # the summary is personal data
    assert kit.count(Tool.TAKE_MESSAGE, "not_agent") == 1 and kit.count(Tool.TAKE_MESSAGE, "ok") == 1
    assert kit.metrics.registry.get_sample_value("kiosk_tool_seconds_count", {"tool": "take_message"}) == 3


async def test_a_disabled_tool_is_refused(mock_pin_factory: Any) -> None:
    made = Kit(mock_pin_factory, _settings(enabled=["kiosk_status"]))
    try:
        refused = await made.refused(Tool.CALL_STAFF)
        assert refused.error is ToolError.TOOL_DISABLED and "tools.enabled" in refused.detail
        assert not mock_pin_factory.pin(STAFF_PIN).state
        status = await made.call(Tool.KIOSK_STATUS)
        assert status == {"say": "The kiosk is online, using the microphone array; 2 messages are waiting for "
                                 "delivery.", "online": True, "route": "array", "queued_messages": 2}
    finally:
        made.panel.close()


async def test_the_per_session_cap(mock_pin_factory: Any) -> None:
    made = Kit(mock_pin_factory, _settings(max_calls_per_session=2))
    try:
        await made.call(Tool.KIOSK_STATUS)
        await made.call(Tool.KIOSK_STATUS)
        assert (await made.refused(Tool.KIOSK_STATUS)).error is ToolError.RATE_LIMITED
        await made.call(Tool.KIOSK_STATUS, session="s2")
    finally:
        made.panel.close()


async def test_end_conversation_asks_the_machine(kit: Kit) -> None:
    result = await kit.call(Tool.END_CONVERSATION)
    assert result["say"] and EndRequested() in kit.events


class _HungOutput:
    """A GPIO driver that hangs (a wedged chip): the one failure mock pins cannot produce."""

    def call_staff(self) -> None:
        time.sleep(1.0)


class _BrokenOutput:
    def call_staff(self) -> None:
        raise DeviceError("the staff-call output on GPIO 26 failed: chip gone", code="gpio_staff_output")


async def test_a_hung_output_times_out_and_a_broken_one_fails(mock_pin_factory: Any) -> None:
    made = Kit(mock_pin_factory, _settings(timeout_seconds=0.2))
    try:
        made.runner.staff = _HungOutput()
        started = time.monotonic()
        refused = await made.refused(Tool.CALL_STAFF)
        assert refused.error is ToolError.TIMEOUT and time.monotonic() - started < 0.8
        assert made.events[-1] == ToolFinished(Tool.CALL_STAFF, "timeout")  # the machine's flag is cleared
        made.runner.staff = _BrokenOutput()
        refused = await made.refused(Tool.CALL_STAFF)
        assert refused.error is ToolError.FAILED and refused.rpc_code == 2500
        assert made.events[-1] == ToolFinished(Tool.CALL_STAFF, "failed")
        assert StaffCalled() not in made.events
    finally:
        made.panel.close()


async def test_one_tool_at_a_time(kit: Kit) -> None:
    kit.runner.staff = _HungOutput()
    first = asyncio.ensure_future(kit.runner.call(Tool.CALL_STAFF, "", trusted=True, session_id="s1"))
    await asyncio.sleep(0.05)
    second = asyncio.ensure_future(kit.runner.call(Tool.KIOSK_STATUS, "", trusted=True, session_id="s1"))
    await asyncio.gather(first, second)
    kinds = [(type(e).__name__, e.tool) for e in kit.events if isinstance(e, ToolStarted | ToolFinished)]
    assert kinds == [("ToolStarted", Tool.CALL_STAFF), ("ToolFinished", Tool.CALL_STAFF),
                     ("ToolStarted", Tool.KIOSK_STATUS), ("ToolFinished", Tool.KIOSK_STATUS)]


def test_enabling_a_tool_that_cannot_act_is_a_config_error() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="panel.staff_output"):
        Settings(tools={"enabled": ["call_staff"]})
    with pytest.raises(ValidationError, match="spool.recipient_public_key"):
        Settings(tools={"enabled": ["take_message"]})
    with pytest.raises(ValidationError, match="already used by talk_button"):
        Settings(panel={"staff_output": {"pin": 17}})
    assert Settings(tools={"enabled": ["kiosk_status", "end_conversation", "kiosk_status"]}).tools.enabled == [
        Tool.KIOSK_STATUS, Tool.END_CONVERSATION]
