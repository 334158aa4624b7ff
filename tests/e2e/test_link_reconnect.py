"""Reconnects and outages over the real LiveKit server: the visitor's session survives what it should."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from livekit import rtc

from kiosk.events import (
    AgentState,
    ApiRefused,
    LinkLost,
    LinkReconnecting,
    LinkUp,
    RefusalReason,
    SessionClosed,
    SessionOpened,
)
from kiosk_dev.speech import SENTENCES, espeak
from kiosk_dev.stack import LinkHarness, LocalStack

QUESTION = espeak(SENTENCES[0], "en-us")

pytestmark = [pytest.mark.livekit, pytest.mark.slow, pytest.mark.timeout(150)]


@pytest.fixture
async def kiosk(stack: LocalStack) -> AsyncIterator[LinkHarness]:
    k = LinkHarness(stack)
    yield k
    await k.link.aclose()


async def _turn_is_answered(stack: LocalStack, kiosk: LinkHarness) -> None:
    before = len(kiosk.agent_report()["turns"])  # type: ignore[arg-type]
    start = len(kiosk.events.events)
    stopped = await kiosk.ask(QUESTION)
    await kiosk.wait_state(AgentState.SPEAKING, start)
    assert await kiosk.playout.wait_voiced(1.0, stopped, 10) >= 1.0, kiosk.link.timeline
    assert len(kiosk.agent_report()["turns"]) == before + 1  # type: ignore[arg-type]


def _no_session_end(kiosk: LinkHarness) -> None:
    assert kiosk.events.of(LinkLost) == [] and kiosk.events.of(SessionClosed) == []
    assert len(kiosk.events.of(SessionOpened)) == 1


@pytest.mark.parametrize("scenario", [rtc.SimulateScenarioKind.SIMULATE_SIGNAL_RECONNECT,
                                      rtc.SimulateScenarioKind.SIMULATE_FULL_RECONNECT],
                         ids=["resume", "full_reconnect"])
async def test_sdk_reconnect_keeps_the_session(stack: LocalStack, kiosk: LinkHarness, scenario: int) -> None:
    opened = await kiosk.open()
    assert kiosk.link.room is not None
    start = len(kiosk.events.events)
    await kiosk.link.room.simulate_scenario(scenario)
    await kiosk.events.wait_for(lambda e: isinstance(e, LinkReconnecting), 10, start)
    await kiosk.events.wait_for(lambda e: isinstance(e, LinkUp), 20, start)
    await asyncio.sleep(1.0)
    await _turn_is_answered(stack, kiosk)
    _no_session_end(kiosk)
    assert kiosk.link.session_id == opened.session_id
    assert kiosk.metrics.reconnects._value.get() >= 1  # type: ignore[attr-defined]


async def test_short_outage_keeps_the_session(stack: LocalStack, kiosk: LinkHarness) -> None:
    opened = await kiosk.open()
    assert stack.network is not None
    stack.network.set_link(False)
    await asyncio.sleep(4.0)
    stack.network.set_link(True)
    await asyncio.sleep(1.0)
    await _turn_is_answered(stack, kiosk)
    _no_session_end(kiosk)
    assert kiosk.link.session_id == opened.session_id


async def test_long_outage_loses_the_link_then_a_fresh_session_opens(stack: LocalStack) -> None:
    kiosk = LinkHarness(stack)
    kiosk.settings.livekit.reconnect_give_up_seconds = 4.0
    try:
        first = await kiosk.open()
        assert stack.network is not None
        stack.network.set_link(False)
        # The SDK notices after its ping timeout (about 15 s), reconnects in vain, and the kiosk gives up.
        await kiosk.events.wait_for(lambda e: isinstance(e, LinkReconnecting), 30)
        lost = await kiosk.events.wait_for(lambda e: isinstance(e, LinkLost), 15)
        assert isinstance(lost, LinkLost) and "reconnect" in lost.reason
        assert not kiosk.link.connected and kiosk.status.connected is False
        # Still offline: the session API is unreachable.
        start = len(kiosk.events.events)
        await kiosk.link.open()
        refused = await kiosk.events.wait_for(lambda e: isinstance(e, ApiRefused), 15, start)
        assert isinstance(refused, ApiRefused) and refused.reason in (RefusalReason.UNREACHABLE,
                                                                      RefusalReason.TIMEOUT)
        # Back online: a fresh session in a fresh room.
        stack.network.set_link(True)
        second = await kiosk.open()
        assert second.session_id != first.session_id
        await _turn_is_answered(stack, kiosk)
    finally:
        await kiosk.link.aclose()
