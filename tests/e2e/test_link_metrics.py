"""Metrics and the status endpoint over real HTTP, fed by a real conversation on the local stack."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from kiosk.events import AgentState, AgentStateChanged
from kiosk.metrics import MetricsServer, credit_burn_per_talk_minute
from kiosk.settings import MetricsSettings
from kiosk_dev.agent import DEFAULT_ANSWER
from kiosk_dev.speech import SENTENCES, espeak
from kiosk_dev.stack import LinkHarness, LocalStack

QUESTION = espeak(SENTENCES[0], "en-us")

pytestmark = [pytest.mark.livekit, pytest.mark.slow, pytest.mark.timeout(90)]


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the exposition")


async def test_metrics_and_status_follow_a_session(stack: LocalStack) -> None:
    kiosk = LinkHarness(stack)
    settings = MetricsSettings(port=0)
    server = MetricsServer(settings, kiosk.metrics, kiosk.status)
    await server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        opened = await kiosk.open()
        start = len(kiosk.events.events)
        await kiosk.ask(QUESTION)
        speaking = await kiosk.wait_state(AgentState.SPEAKING, start)
        await kiosk.wait_state(AgentState.LISTENING, speaking)
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/status") as reply:
                live_text = await reply.text()
                live = json.loads(live_text)
            await kiosk.link.close()
            async with http.get(base + "/metrics") as reply:
                exposition = await reply.text()
            async with http.get(base + "/status") as reply:
                after = await reply.json()
    finally:
        await kiosk.link.aclose()
        await server.aclose()

    assert live["session_id"] == opened.session_id and live["connected"] is True
    # The status follows the posted agent states (the agent may already be on its next state).
    posted = {e.state.value for e in kiosk.events.of(AgentStateChanged)}  # type: ignore[attr-defined]
    assert live["agent_state"] in posted and "speaking" in posted
    # The exchange's size, never its words (captions are personal data).
    assert live["last_exchange"]["agent_chars"] == len(DEFAULT_ANSWER) and live["last_exchange"]["visitor_chars"] > 0
    assert "registration desk" not in live_text and "visitor spoke for" not in live_text
    assert after["connected"] is False and after["session_id"] == ""

    assert _sample(exposition, "kiosk_sessions_total") == 1.0
    assert _sample(exposition, "kiosk_connect_seconds_count") == 1.0
    assert _sample(exposition, "kiosk_first_agent_audio_seconds_count") == 1.0
    frames = _sample(exposition, "kiosk_capture_path_seconds_count")
    assert frames >= (QUESTION.size + 8000) // 160 - 12
    streamed = _sample(exposition, "kiosk_streamed_audio_seconds_total")
    assert streamed == pytest.approx(frames * 0.01, rel=1e-6)
    agent_s = _sample(exposition, "kiosk_agent_audio_seconds_total")
    session_s = _sample(exposition, "kiosk_session_seconds_total")
    assert agent_s > 2.0 and session_s > streamed
    summary = after["summary"]
    assert 0 < summary["streamed_fraction"] < 1
    assert summary["credit_burn_per_talk_minute"] == pytest.approx(
        credit_burn_per_talk_minute(streamed, agent_s, session_s, settings), rel=1e-6)
    assert _sample(exposition, "kiosk_credit_burn_per_talk_minute") == pytest.approx(
        summary["credit_burn_per_talk_minute"], rel=1e-3)


def test_credit_burn_formula() -> None:
    settings = MetricsSettings(input_audio_tokens_per_second=10, output_audio_tokens_per_second=20,
                               input_credits_per_million_tokens=32, output_credits_per_million_tokens=64)
    # 30 s in, 30 s out over one minute: (30*10*32 + 30*20*64) / 1e6 = 0.048 per minute.
    assert credit_burn_per_talk_minute(30, 30, 60, settings) == pytest.approx(0.048)
    assert credit_burn_per_talk_minute(30, 30, 0, settings) == 0.0
