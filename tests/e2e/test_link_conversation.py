"""End to end over the real LiveKit server and real WebRTC: the kiosk's room link and the stand-in agent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest

from kiosk.events import AgentState, AgentStateChanged
from kiosk.settings import SessionSource
from kiosk_dev.agent import DEFAULT_ANSWER
from kiosk_dev.speech import SENTENCES, espeak
from kiosk_dev.stack import LinkHarness, LocalStack, feed

pytestmark = [pytest.mark.livekit, pytest.mark.slow, pytest.mark.timeout(120)]

QUESTION = espeak(SENTENCES[0], "en-us")


@pytest.fixture
async def kiosk(stack: LocalStack) -> AsyncIterator[LinkHarness]:
    k = LinkHarness(stack)
    yield k
    await k.link.aclose()


def _envelope(pcm: np.ndarray, hop: int = 320) -> np.ndarray:
    x = pcm.astype(np.float64)
    n = x.size // hop
    return np.sqrt(np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1))


def _aligned_envelope_similarity(received: np.ndarray, reference: np.ndarray, chunk: int = 50) -> float:
    """Mean best correlation of 1 s chunks of the reference's 20 ms envelope against the received one.

    Each chunk finds its own lag (the jitter buffer stretches and shortens pauses), within the received
    audio's extra length plus 200 ms either way.
    """
    a, b = _envelope(received), _envelope(reference)
    slack = max(0, a.size - b.size) + 10
    scores = []
    for start in range(0, b.size - chunk + 1, chunk):
        seg = b[start: start + chunk]
        if seg.std() == 0:
            continue
        best = 0.0
        for lag in range(max(0, start - 10), min(a.size - chunk, start + slack) + 1):
            cand = a[lag: lag + chunk]
            if cand.std() > 0:
                best = max(best, float(np.corrcoef(cand, seg)[0, 1]))
        scores.append(best)
    return float(np.mean(scores)) if scores else 0.0


async def test_question_reaches_the_agent_and_the_answer_plays(stack: LocalStack, kiosk: LinkHarness,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    opened = await kiosk.open()
    assert opened.session_id == kiosk.link.session_id
    start = len(kiosk.events.events)
    stopped = await kiosk.ask(QUESTION)
    speaking = await kiosk.wait_state(AgentState.SPEAKING, start)
    await kiosk.wait_state(AgentState.LISTENING, speaking)
    await asyncio.sleep(0.5)  # the tail of the answer is still in flight when the state changes

    report = kiosk.agent_report()
    turns = report["turns"]
    assert isinstance(turns, list) and len(turns) == 1
    question_seconds = QUESTION.size / 16000
    # The agent heard one turn about as long as the question (VAD trims the edges).
    assert 0.6 * question_seconds <= turns[0]["speech_seconds"] <= 1.2 * question_seconds
    assert turns[0]["rms_dbfs"] > -40
    # The whole answer came out of the playout sink, and it is the agent's speech (envelope matches).
    answer = espeak(DEFAULT_ANSWER, "en-us", 175)
    received_voiced = kiosk.playout.voiced_seconds(since=stopped)
    assert abs(received_voiced - turns[0]["answered_seconds"]) <= 0.25 * turns[0]["answered_seconds"]
    similarity = _aligned_envelope_similarity(kiosk.playout.audio(since=stopped), (answer * 32767).astype(np.int16))
    assert similarity > 0.7, similarity  # measured: 0.8-1.0 for the answer, below 0.3 for other speech or noise
    # States and captions as a LiveKit voice agent shows them.
    states = [e.state for e in kiosk.events.of(AgentStateChanged)]
    assert states[-3:] == [AgentState.THINKING, AgentState.SPEAKING, AgentState.LISTENING]
    await asyncio.sleep(0.3)
    # Captions are read (in memory, for the demo's report) but only their lengths are logged and in Status.
    texts = {c.speaker: c.text for c in kiosk.link.captions}
    assert texts["agent"] == DEFAULT_ANSWER and texts["visitor"].startswith("(visitor spoke for")
    assert kiosk.status.last_exchange.agent_chars == len(DEFAULT_ANSWER)
    assert kiosk.status.last_exchange.visitor_chars == len(texts["visitor"])
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("kiosk"))
    assert "caption from the agent" in logged
    assert DEFAULT_ANSWER not in logged and "visitor spoke for" not in logged and "registration desk" not in logged
    # Metrics: every streamed frame timed on the capture path, answer frames on the playout path.
    assert len(kiosk.link.capture_latencies_s) >= (QUESTION.size + 8000) // 160 - 12
    assert len(kiosk.link.playout_latencies_s) >= 100
    assert kiosk.link.connect_seconds is not None
    first_audio = kiosk.metrics.first_agent_audio_seconds.collect()[0]
    assert any(s.name.endswith("_count") and s.value == 1 for s in first_audio.samples)


async def test_interrupt_stops_the_agent(stack: LocalStack, kiosk: LinkHarness) -> None:
    await kiosk.open()
    start = len(kiosk.events.events)
    stopped = await kiosk.ask(QUESTION)
    speaking = await kiosk.wait_state(AgentState.SPEAKING, start)
    loop = asyncio.get_running_loop()
    assert await kiosk.playout.wait_voiced(0.8, stopped, 10) >= 0.8
    interrupted_at = loop.time()
    await kiosk.link.interrupt_agent()
    await kiosk.wait_state(AgentState.LISTENING, speaking)
    await asyncio.sleep(1.5)
    report = kiosk.agent_report()
    turns = report["turns"]
    assert isinstance(turns, list)
    assert report["interrupts_by_rpc"] == 1 and turns[-1]["interrupted"]
    full = espeak(DEFAULT_ANSWER, "en-us", 175).size / 16000
    assert 0.8 <= turns[-1]["answered_seconds"] < full - 1.0, turns  # the kiosk had heard 0.8 s of it
    # Nothing of the answer reached the playout sink after the interrupt, and the sink was cleared.
    assert kiosk.playout.voiced_seconds(since=interrupted_at) == 0.0
    assert kiosk.playout.clears and kiosk.playout.clears[-1] >= interrupted_at


async def test_the_answer_stays_cut_while_the_agent_stops_late(stack: LocalStack, kiosk: LinkHarness) -> None:
    """The agent answers the interrupt at once but speaks on for 1 s: none of that reaches the playout sink.

    A fixed 300 ms window from the interrupt let it play (as it let 0.5 s of an answer still on its way play after a
    press on a busy machine).
    """
    stack.set_agent_options(stop_lag_ms=1000, answer=" ".join([DEFAULT_ANSWER] * 3))
    await kiosk.open()
    start = len(kiosk.events.events)
    stopped = await kiosk.ask(QUESTION)
    speaking = await kiosk.wait_state(AgentState.SPEAKING, start)
    assert await kiosk.playout.wait_voiced(0.8, stopped, 10) >= 0.8
    interrupted_at = asyncio.get_running_loop().time()
    await kiosk.link.interrupt_agent()
    await kiosk.wait_state(AgentState.LISTENING, speaking)
    assert asyncio.get_running_loop().time() - interrupted_at >= 0.9  # it spoke on for its second
    await asyncio.sleep(1.0)
    report = kiosk.agent_report()
    assert report["interrupts_by_rpc"] == 1, report
    turns = report["turns"]
    assert isinstance(turns, list)
    assert turns[-1]["answered_seconds"] >= 1.8, turns  # 0.8 s heard before the interrupt, 1 s after it
    assert kiosk.playout.voiced_seconds(since=interrupted_at) == 0.0


async def test_muted_until_published_then_live(stack: LocalStack, kiosk: LinkHarness) -> None:
    """Pre-warm: connected with the microphone muted; nothing reaches the agent until publishing is on."""
    await kiosk.open()
    await feed(kiosk.link, QUESTION, level=0.5)  # gate closed: dropped, not streamed
    await asyncio.sleep(1.0)
    assert kiosk.agent_report()["turns"] == []
    assert len(kiosk.link.capture_latencies_s) == 0
    start = len(kiosk.events.events)
    await kiosk.ask(QUESTION)
    await kiosk.wait_state(AgentState.SPEAKING, start)
    assert len(kiosk.agent_report()["turns"]) == 1  # type: ignore[arg-type]
    assert len(kiosk.link.press_to_live_s) == 1 and kiosk.link.press_to_live_s[0] < 1.0


async def test_standard_token_endpoint_source(stack: LocalStack) -> None:
    k = LinkHarness(stack, source=SessionSource.TOKEN_ENDPOINT, token_endpoint_url=stack.api_url + "/token")
    try:
        opened = await k.open()
        assert opened.session_id.startswith("kiosk-")
    finally:
        await k.link.aclose()
