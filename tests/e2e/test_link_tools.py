"""The agent's tools over the real LiveKit server: the stand-in agent calls ``kiosk.<tool>`` RPC methods on the
kiosk's room link, whose tool runner drives the staff-call output on gpiozero's mock pins and posts the events
the state machine acts on. Refusals: a disabled tool, bad arguments, the rate limit, and callers that are not the
session's agent (a standard participant, and an agent-kind participant the API did not name).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from livekit import api, rtc

from kiosk.events import (
    AgentState,
    AgentStateChanged,
    EndRequested,
    MessageRequested,
    StaffCalled,
    Tool,
    ToolFinished,
    ToolStarted,
)
from kiosk.fallback.sealing import encode_key, generate_keypair
from kiosk.panel.gpio import GpioPanel
from kiosk.settings import InteractionSettings
from kiosk.tools import KioskSnapshot, ToolRunner
from kiosk_dev.speech import SENTENCES, espeak
from kiosk_dev.stack import LinkHarness, LocalStack

pytestmark = [pytest.mark.livekit, pytest.mark.slow, pytest.mark.timeout(150)]

QUESTION = espeak(SENTENCES[0], "en-us")
STAFF_PIN = 26
SUMMARY = "Wants the sales team to call back about order 4471"


def _settings(enabled: list[str]) -> dict[str, Any]:
    return {
        "panel": {"staff_output": {"pin": STAFF_PIN, "pulse_seconds": 0.3, "min_interval_seconds": 60.0}},
        "tools": {"enabled": enabled},
        "spool": {"recipient_public_key": encode_key(generate_keypair()[1])},
    }


class ToolKiosk:
    """A room link with the real tool runner and the GPIO panel (staff-call output) on mock pins."""

    def __init__(self, stack: LocalStack, enabled: list[str] | None = None) -> None:
        from gpiozero.pins.mock import MockFactory, MockPWMPin

        self.factory = MockFactory(pin_class=MockPWMPin)
        self.panel: GpioPanel | None = None
        self.staff_on: list[float] = []  # monotonic times the staff-call pin was seen high
        self.harness = LinkHarness(stack, settings=_settings(enabled or [t.value for t in Tool]),
                                   tools=self._runner)

    def _runner(self, harness: LinkHarness) -> ToolRunner:
        self.panel = GpioPanel(harness.settings.panel, InteractionSettings(), harness.events,
                               loop=asyncio.get_running_loop(), pin_factory=self.factory)
        snapshot = KioskSnapshot(conversing=True, online=True, route="array", queued_messages=0)
        return ToolRunner(harness.settings, harness.events, metrics=harness.metrics, snapshot=lambda: snapshot,
                          staff=self.panel)

    def pin(self) -> bool:
        return bool(self.factory.pin(STAFF_PIN).state)

    def events(self, kind: type) -> list[Any]:
        return self.harness.events.of(kind)

    def outcome_count(self, tool: str, outcome: str) -> float:
        return self.harness.metrics.registry.get_sample_value(
            "kiosk_tool_calls_total", {"tool": tool, "outcome": outcome}) or 0.0

    async def aclose(self) -> None:
        await self.harness.link.aclose()
        if self.panel is not None:
            self.panel.close()
        self.factory.reset()


@pytest.fixture
async def make_kiosk(stack: LocalStack) -> AsyncIterator[Callable[..., ToolKiosk]]:
    made: list[ToolKiosk] = []

    def make(enabled: list[str] | None = None) -> ToolKiosk:
        made.append(ToolKiosk(stack, enabled))
        return made[-1]

    yield make
    for kiosk in made:
        await kiosk.aclose()


async def _watch_pin(kiosk: ToolKiosk, seconds: float) -> list[tuple[float, bool]]:
    """(time, level) of the staff-call pin about every 10 ms for ``seconds`` (gpiozero pulses it in its thread)."""
    levels = []
    end = time.monotonic() + seconds
    while (now := time.monotonic()) < end:
        levels.append((now, kiosk.pin()))
        await asyncio.sleep(0.01)
    return levels


def _pulse_seconds(levels: list[tuple[float, bool]]) -> float | None:
    """How long the pin was seen high (first high sample to the first low one after it), None if never."""
    on = next((t for t, high in levels if high), None)
    if on is None:
        return None
    off = next((t for t, high in levels if t > on and not high), None)
    return None if off is None else off - on


def _call(stack: LocalStack, session_id: str, tool: str, payload: str = "") -> dict[str, Any]:
    return stack.agent_call_tool(session_id, tool, payload)


async def _acall(stack: LocalStack, session_id: str, tool: str, payload: str = "") -> dict[str, Any]:
    # The stack's admin call blocks until the agent has its answer: off the loop, which serves the RPC.
    return await asyncio.to_thread(_call, stack, session_id, tool, payload)


async def test_each_tool_through_the_real_server(stack: LocalStack, make_kiosk: Callable[..., ToolKiosk],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    kiosk = make_kiosk()
    opened = await kiosk.harness.open()
    sid = opened.session_id

    status = await _acall(stack, sid, "kiosk_status")
    assert status["ok"] and status["result"]["online"] is True and status["result"]["route"] == "array"
    assert status["result"]["say"].startswith("The kiosk is online")

    assert not kiosk.pin()
    watcher = asyncio.ensure_future(_watch_pin(kiosk, 1.5))
    staff = await _acall(stack, sid, "call_staff", "{}")
    levels = await watcher
    assert staff["ok"] and "staff" in staff["result"]["say"]
    high = _pulse_seconds(levels)
    assert high is not None and not levels[-1][1], "the staff-call output did not pulse on the mock pin"
    assert 0.15 <= high <= 1.5, high  # pulse_seconds = 0.3, sampled about every 10 ms on a busy machine
    assert kiosk.events(StaffCalled) == [StaffCalled()]

    message = await _acall(stack, sid, "take_message", json.dumps({"summary": SUMMARY}))
    assert message["ok"] and "tone" in message["result"]["say"]
    requested = kiosk.events(MessageRequested)
    assert len(requested) == 1 and requested[0].note.text == SUMMARY

    end = await _acall(stack, sid, "end_conversation")
    assert end["ok"] and kiosk.events(EndRequested) == [EndRequested()]
    # Every call was bracketed for the state machine and counted; no log line carries the summary.
    assert len(kiosk.events(ToolStarted)) == len(kiosk.events(ToolFinished)) == 4
    for tool in Tool:
        assert kiosk.outcome_count(tool.value, "ok") == 1
    assert SUMMARY not in "\n".join(r.getMessage() for r in caplog.records)
    print("\nround trips (agent side): " + ", ".join(
        f"{c['tool']} {1000 * c['seconds']:.0f} ms" for c in (status, staff, message, end)))


async def test_refusals_bad_arguments_rate_limit_and_disabled(stack: LocalStack,
                                                              make_kiosk: Callable[..., ToolKiosk]) -> None:
    kiosk = make_kiosk(["call_staff", "kiosk_status"])
    sid = (await kiosk.harness.open()).session_id

    bad = await _acall(stack, sid, "kiosk_status", '{"verbose": true}')
    assert not bad["ok"] and bad["error_code"] == 2400 and bad["error_data"]["error"] == "bad_arguments"
    assert "verbose" in bad["error_data"]["detail"] and bad["error_message"]

    disabled = await _acall(stack, sid, "take_message", json.dumps({"summary": SUMMARY}))
    assert not disabled["ok"] and disabled["error_code"] == 2404 and disabled["error_data"]["error"] == "tool_disabled"
    assert kiosk.events(MessageRequested) == []

    first = await _acall(stack, sid, "call_staff")
    again = await _acall(stack, sid, "call_staff")
    assert first["ok"] and not again["ok"] and again["error_code"] == 2429
    assert 55 <= again["error_data"]["retry_after_seconds"] <= 60 and "on their way" in again["error_message"]
    assert kiosk.events(StaffCalled) == [StaffCalled()]  # one pulse only

    unknown = await _acall(stack, sid, "open_doors")  # not a tool: no such method on the kiosk
    assert not unknown["ok"] and unknown["error_code"] == rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD
    for tool, outcome in (("kiosk_status", "bad_arguments"), ("take_message", "tool_disabled"),
                          ("call_staff", "rate_limited"), ("call_staff", "ok")):
        assert kiosk.outcome_count(tool, outcome) == 1, (tool, outcome)


class Caller:
    """Someone else in the room who calls the kiosk's tools directly."""

    def __init__(self, stack: LocalStack, room: str, identity: str, *, agent_kind: bool = False) -> None:
        assert stack.server is not None
        grants = api.VideoGrants(room_join=True, room=room, can_publish=True, can_subscribe=True,
                                 can_publish_data=True)
        token = (api.AccessToken(stack.server.api_key, stack.server.api_secret).with_identity(identity)
                 .with_grants(grants))
        if agent_kind:
            token = token.with_kind("agent")
        self._token = token.to_jwt()
        self._url = stack.livekit_url
        self.room = rtc.Room()

    async def join(self) -> None:
        await self.room.connect(self._url, self._token, rtc.RoomOptions(auto_subscribe=False))

    async def call(self, destination: str, tool: str, payload: str = "") -> rtc.RpcError:
        with pytest.raises(rtc.RpcError) as refused:
            await self.room.local_participant.perform_rpc(destination_identity=destination, method=f"kiosk.{tool}",
                                                          payload=payload, response_timeout=5.0)
        return refused.value

    async def leave(self) -> None:
        await self.room.disconnect()


@pytest.mark.parametrize("agent_kind", [False, True], ids=["standard participant", "agent the API did not name"])
async def test_a_participant_that_is_not_the_agent_is_refused(stack: LocalStack,
                                                              make_kiosk: Callable[..., ToolKiosk],
                                                              agent_kind: bool) -> None:
    kiosk = make_kiosk()
    opened = await kiosk.harness.open()
    room = stack.room_of(opened.session_id)
    caller = Caller(stack, room, "agent-impostor" if agent_kind else "intruder", agent_kind=agent_kind)
    try:
        await caller.join()
        assert kiosk.harness.link.room is not None
        kiosk_identity = kiosk.harness.link.room.local_participant.identity
        watcher = asyncio.ensure_future(_watch_pin(kiosk, 1.0))
        refused = await caller.call(kiosk_identity, "call_staff")
        assert not any(high for _, high in await watcher), "someone who is not the agent pulsed the staff-call output"
        assert refused.code == 2403 and json.loads(refused.data or "{}")["error"] == "not_agent"
        refused = await caller.call(kiosk_identity, "take_message", json.dumps({"summary": "forged"}))
        assert refused.code == 2403
        assert kiosk.events(StaffCalled) == [] and kiosk.events(MessageRequested) == []
        assert kiosk.events(ToolStarted) == []  # nothing ran
        assert kiosk.outcome_count("call_staff", "not_agent") == 1
        # The real agent still may.
        assert (await _acall(stack, opened.session_id, "call_staff"))["ok"]
    finally:
        await caller.leave()


async def test_the_agent_calls_a_tool_in_the_middle_of_an_answer(stack: LocalStack,
                                                                 make_kiosk: Callable[..., ToolKiosk]) -> None:
    kiosk = make_kiosk(["kiosk_status"])
    harness = kiosk.harness
    sid = (await harness.open()).session_id
    await asyncio.to_thread(stack.agent_plan_tool, sid, "kiosk_status")
    start = len(harness.events.events)
    stopped = await harness.ask(QUESTION)
    speaking = await harness.wait_state(AgentState.SPEAKING, start)
    # thinking (the tool), speaking again (its result and the rest of the answer), then listening.
    again = await harness.wait_state(AgentState.SPEAKING, speaking + 1, within_seconds=30)
    await harness.wait_state(AgentState.LISTENING, again, within_seconds=30)
    await asyncio.sleep(0.5)
    report = harness.agent_report()
    calls = report["tool_calls"]
    assert len(calls) == 1 and calls[0]["mid_answer"] and calls[0]["ok"] and calls[0]["tool"] == "kiosk_status"
    states = [e.state for e in harness.events.of(AgentStateChanged)][-5:]
    assert states == [AgentState.THINKING, AgentState.SPEAKING, AgentState.THINKING, AgentState.SPEAKING,
                      AgentState.LISTENING]
    # The tool ran while the answer was under way: after the first half was heard, before the rest.
    started_at = next(t for t, e in harness.events.events if isinstance(e, ToolStarted))
    first_half = harness.playout.voiced_seconds(since=stopped) - harness.playout.voiced_seconds(since=started_at)
    assert first_half > 1.0 and harness.playout.voiced_seconds(since=started_at) > 2.0
    audio = harness.playout.audio(since=started_at)
    assert int(np.abs(audio).max(initial=0)) > 1000  # the spoken status and the rest of the answer
