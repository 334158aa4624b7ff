"""Manual turns over the real LiveKit server: the kiosk's press and release are the visitor's turn.

The kiosk side does what the controller does for ``BeginTurn``/``StartPublishing`` and
``StopPublishing``/``EndTurn`` (tests/integration/test_controller.py checks that order); the stand-in agent
registers ``start_turn``/``end_turn``/``cancel_turn`` as a LiveKit voice agent with manual turn detection does.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import numpy as np
import pytest

from kiosk_dev.speech import SENTENCES, espeak
from kiosk_dev.stack import LinkHarness, LocalStack, feed

pytestmark = [pytest.mark.livekit, pytest.mark.slow, pytest.mark.timeout(150)]

QUESTION = espeak(SENTENCES[0], "en-us")
# Longer than the agent's own end-of-turn silence (800 ms in the test stack): it would take the turn by itself.
HELD_PAUSE_SECONDS = 2.5


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(16000 * seconds), dtype=np.float32)


@pytest.fixture
async def kiosk(stack: LocalStack) -> AsyncIterator[LinkHarness]:
    k = LinkHarness(stack)
    yield k
    await k.link.aclose()


async def press(kiosk: LinkHarness) -> None:
    """The press, as the controller carries out BeginTurn then StartPublishing."""
    await kiosk.link.begin_turn()
    kiosk.link.set_publishing(True)


async def release(kiosk: LinkHarness, commit: bool) -> float:
    """The release, as the controller carries out StopPublishing then EndTurn; returns the release time."""
    kiosk.link.set_publishing(False)
    released = asyncio.get_running_loop().time()
    await kiosk.link.end_turn(commit)
    return released


def first_voiced_at(kiosk: LinkHarness, since: float) -> float | None:
    return next((t for t, pcm in kiosk.playout.frames if t >= since and int(np.abs(pcm).max(initial=0)) > 64), None)


async def test_the_agent_answers_only_after_the_release(stack: LocalStack, kiosk: LinkHarness) -> None:
    """The visitor asks, then keeps the button held through a long pause: no answer until the release."""
    await kiosk.open()
    loop = asyncio.get_running_loop()
    pressed = loop.time()
    await press(kiosk)
    await feed(kiosk.link, QUESTION, level=0.5)
    await feed(kiosk.link, silence(HELD_PAUSE_SECONDS))  # still held
    assert kiosk.playout.voiced_seconds(since=pressed) == 0.0, "the agent answered while the button was held"
    released = await release(kiosk, commit=True)
    assert await kiosk.playout.wait_voiced(1.0, released, 15) >= 1.0, "no answer after the release"
    first = first_voiced_at(kiosk, pressed)
    assert first is not None and first > released
    report = kiosk.agent_report()
    assert [r["method"] for r in report["turn_rpcs"]] == ["start_turn", "end_turn"]
    end_turn_at = report["turn_rpcs"][1]["at"]
    assert len(report["turns"]) == 1 and report["turns"][0]["manual"]
    question_seconds = QUESTION.size / 16000
    assert 0.6 * question_seconds <= report["turns"][0]["speech_seconds"] <= 1.2 * question_seconds
    # The agent's clock is this machine's CLOCK_MONOTONIC too: its first answer frame left after end_turn came.
    assert report["answers_sent_at"][0] > end_turn_at > released
    assert kiosk.metrics.registry.get_sample_value("kiosk_turn_rpcs_total",
                                                   {"method": "end_turn", "outcome": "ok"}) == 1
    print(f"\nrelease -> end_turn at the agent {1000 * (end_turn_at - released):.0f} ms, "
          f"release -> first answer audio at the kiosk {1000 * (first - released):.0f} ms")


async def test_a_release_without_speech_cancels_the_turn(stack: LocalStack, kiosk: LinkHarness) -> None:
    await kiosk.open()
    loop = asyncio.get_running_loop()
    pressed = loop.time()
    await press(kiosk)
    await feed(kiosk.link, QUESTION, level=0.5)  # the kiosk's VAD missed it: the controller says cancel
    await release(kiosk, commit=False)
    await asyncio.sleep(3.0)
    report = kiosk.agent_report()
    assert [r["method"] for r in report["turn_rpcs"]] == ["start_turn", "cancel_turn"]
    assert report["turns"] == [] and kiosk.playout.voiced_seconds(since=pressed) == 0.0


async def test_a_press_while_the_agent_speaks_takes_the_turn(stack: LocalStack, kiosk: LinkHarness) -> None:
    await kiosk.open()
    await press(kiosk)
    await feed(kiosk.link, QUESTION, level=0.5)
    await feed(kiosk.link, silence(0.5))
    released = await release(kiosk, commit=True)
    assert await kiosk.playout.wait_voiced(0.8, released, 15) >= 0.8
    await press(kiosk)  # start_turn stops the agent, as a LiveKit agent's start_user_turn does
    await asyncio.sleep(1.0)
    report = kiosk.agent_report()
    assert report["interrupts_by_rpc"] == 1 and report["turns"][-1]["interrupted"]
    await release(kiosk, commit=False)


async def test_an_agent_without_turn_methods_keeps_its_own_turns(stack: LocalStack,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The methods are missing: said once in the log, not asked again, and the agent still answers."""
    caplog.set_level(logging.DEBUG, logger="kiosk.link.livekit")
    stack.set_agent_options(manual_turns=False)
    kiosk = LinkHarness(stack)
    try:
        await kiosk.open()
        for _ in range(2):
            loop = asyncio.get_running_loop()
            pressed = loop.time()
            await press(kiosk)
            await feed(kiosk.link, QUESTION, level=0.5)
            await feed(kiosk.link, silence(1.2))  # the agent's own end of turn takes it
            await release(kiosk, commit=True)
            assert await kiosk.playout.wait_voiced(0.8, pressed, 15) >= 0.8
            await asyncio.sleep(4.0)  # let the answer finish
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "no start_turn" in r.getMessage()]
        assert len(warnings) == 1 and "detects the end of the visitor's turn itself" in warnings[0].getMessage()
        assert kiosk.metrics.registry.get_sample_value("kiosk_turn_rpcs_total",
                                                       {"method": "start_turn", "outcome": "unsupported"}) == 1
        report = kiosk.agent_report()
        assert report["turn_rpcs"] == [] and len(report["turns"]) == 2 and not report["turns"][0]["manual"]
    finally:
        await kiosk.link.aclose()


async def test_the_release_keeps_the_words_a_lagging_capture_path_still_holds(stack: LocalStack,
                                                                             kiosk: LinkHarness) -> None:
    """On a busy machine the capture path hands frames over a second late: the release comes before the last
    words reach the link. They were captured before it, so they still go out, and end_turn follows them."""
    lag_seconds = 1.2
    await kiosk.open()
    loop = asyncio.get_running_loop()
    await press(kiosk)
    pcm = (np.clip(QUESTION * 0.5, -1, 1) * 32767).astype(np.int16)
    frames = pcm.size // 160
    start = loop.time()

    async def capture() -> None:  # the engine's reader, lag_seconds behind the microphone
        for i in range(frames):
            delay = start + i * 0.01 + lag_seconds - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            kiosk.link.push_frame(pcm[i * 160:(i + 1) * 160], captured_at=start + i * 0.01)

    lagging = asyncio.create_task(capture())
    await asyncio.sleep(start + frames * 0.01 + 0.1 - loop.time())  # let go just after the last word was said
    released = await release(kiosk, commit=True)
    await lagging
    assert await kiosk.playout.wait_voiced(1.0, released, 15) >= 1.0, "no answer after the release"
    report = kiosk.agent_report()
    question_seconds = QUESTION.size / 16000
    # Before: the release dropped what was queued and everything after it; the agent heard the question's
    # first part only (or nothing, with a longer lag) and its end_turn came before the last words.
    assert len(report["turns"]) == 1 and report["turns"][0]["speech_seconds"] >= 0.8 * question_seconds, report
