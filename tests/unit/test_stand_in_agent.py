"""The stand-in agent's own bookkeeping, which the end-to-end tests read as the agent's side of the story."""

import asyncio

import pytest
from livekit import rtc

from kiosk_dev.agent import StandInAgent


def _call(method: str) -> rtc.RpcInvocationData:
    return rtc.RpcInvocationData(request_id=method, caller_identity="kiosk", payload="", response_timeout=5.0,
                                 method=method)


@pytest.mark.parametrize("order", [("interrupt", "start_turn"), ("start_turn", "interrupt")])
async def test_one_press_interrupting_by_rpc_and_start_turn_counts_once(order: tuple[str, str]) -> None:
    # A press in push-to-talk sends the interrupt RPC and start_turn back to back; both can reach the agent
    # before its answer task has run its cancellation, and the report must still say one interruption.
    agent = StandInAgent("ws://127.0.0.1:1", "token", "room")
    answer = asyncio.ensure_future(asyncio.sleep(60))
    agent._speaking = answer
    agent._state = "speaking"
    for method in order:
        handler = agent._on_interrupt_rpc if method == "interrupt" else agent._on_turn_rpc
        await handler(_call(method))
    assert agent.report.interrupts_by_rpc == 1
    await asyncio.gather(answer, return_exceptions=True)
    assert answer.cancelled()
