"""Link benchmark on the local stack: kiosk-added latency on the capture and playout paths, pre-warm and cold sessions.

``run`` starts the local stack (``kiosk_dev.stack``: private network, real LiveKit server, stand-in session
API and agent) and measures each figure as a distribution; ``kiosk bench link`` prints them and with
``--write`` puts them under the ``## Link`` heading of docs/performance.md (the rest of the file is kept).
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiosk.settings import Settings
from kiosk_dev.agent import ONSET_PEAK
from kiosk_dev.bench import BenchSection, TargetCheck

if TYPE_CHECKING:
    from kiosk_dev.stack import LocalStack

SECTION_HEADING = "## Link"


def run(settings: Settings, *, quick: bool = False) -> list[BenchSection]:
    """Start the local stack and measure; returns the report sections."""
    from kiosk_dev.stack import LocalStack

    # The stack must be entered before the loop and the rtc SDK start their threads (private network).
    with LocalStack(agent_options={"linger_seconds": 2.0}) as stack:
        return asyncio.run(_bench(stack, settings, quick=quick))


def _ms_row(name: str, values_s: Sequence[float]) -> list[str | float | int | None]:
    import numpy as np

    if not values_s:
        return [name, 0, None, None, None]
    v = np.asarray(values_s) * 1000.0
    return [name, int(v.size), float(np.percentile(v, 50)), float(np.percentile(v, 95)), float(v.max())]


def _p95(values_s: Sequence[float]) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values_s), 95)) if values_s else float("nan")


async def _bench(stack: LocalStack, base: Settings, *, quick: bool) -> list[BenchSection]:
    import numpy as np

    from kiosk.events import AgentState, AgentStateChanged, SessionOpened
    from kiosk.link.livekit import LiveKitRoomLink
    from kiosk.metrics import Metrics
    from kiosk_dev.speech import SENTENCES, espeak
    from kiosk_dev.stack import EventLog, MemoryPlayout

    loop = asyncio.get_running_loop()
    # The stack's private network is plain http/ws between two namespaces of this machine.
    settings = base.model_copy(update={"session": stack.session_settings(), "security": base.security.model_copy(
        update={"allow_insecure_transport": True})})
    cold_runs = 4 if quick else 10
    turns = 3 if quick else 6

    async def wait_for(events: EventLog, predicate: Any, within_seconds: float, start: int = 0) -> None:
        await events.wait_for(predicate, within_seconds, start)

    # Cold sessions: API + connect + agent audio path ready.
    cold: list[float] = []
    api_part: list[float] = []
    connect_part: list[float] = []
    agent_part: list[float] = []
    for _ in range(cold_runs):
        events = EventLog()
        link = LiveKitRoomLink(settings, events, MemoryPlayout(), metrics=Metrics())
        await link.open()
        await wait_for(events, lambda e: isinstance(e, SessionOpened), 15)
        marks = dict((what, t) for t, what in link.timeline)
        cold.append(marks["session opened"] - marks["session requested"])
        api_part.append(marks["session granted"] - marks["session requested"])
        connect_part.append(marks["connected"] - marks["session granted"])
        agent_part.append(marks["session opened"] - marks["connected"])
        await link.aclose()
        await asyncio.sleep(0.3)

    # One pre-warmed session: muted until each "press", then a spoken question and the agent's answer.
    events = EventLog()
    playout = MemoryPlayout()
    link = LiveKitRoomLink(settings, events, playout, metrics=Metrics())
    await link.open()
    await wait_for(events, lambda e: isinstance(e, SessionOpened), 15)
    rooms = {s["session_id"]: s["room"] for s in stack.sessions()}
    room = rooms[link.session_id]
    presses: list[tuple[float, float]] = []  # (press time, lead-in of the question's first loud frame)
    to_first_audio: list[float] = []
    for i in range(turns):
        question = espeak(SENTENCES[i % len(SENTENCES)], "en-us")
        pcm = (question * 0.5 * 32767).astype(np.int16)
        loud = np.flatnonzero(np.abs(pcm) >= ONSET_PEAK)
        lead_in_s = (int(loud[0]) // 160) * 0.01 if loud.size else 0.0
        await asyncio.sleep(0.8)  # quiet before each press, so the agent sees a fresh onset
        start = len(events.events)
        pressed = loop.time()
        link.set_publishing(True)
        presses.append((pressed, lead_in_s))
        await _device_thread_feed(link, pcm)
        stopped = loop.time()
        link.note_visitor_stopped(stopped)
        await _device_thread_feed(link, np.zeros(8000, dtype=np.int16))
        link.set_publishing(False)
        await wait_for(events, lambda e: isinstance(e, AgentStateChanged) and e.state is AgentState.SPEAKING,
                       20, start)
        speaking = len(events.events)
        await wait_for(events, lambda e: isinstance(e, AgentStateChanged) and e.state is AgentState.LISTENING,
                       30, speaking)
        voiced = [t for t, f in playout.frames if t >= stopped and int(np.abs(f).max(initial=0)) > 16]
        if voiced:
            to_first_audio.append(voiced[0] - stopped)
    await asyncio.sleep(0.5)
    report = stack.agent_reports()[room]
    await link.aclose()

    # End-to-end figures from the agent's clock (CLOCK_MONOTONIC, shared by both processes).
    onsets = list(report["onsets_at"])
    mic_live: list[float] = []
    for pressed, lead_in_s in presses:
        after = [t for t in onsets if t >= pressed]
        if after:
            mic_live.append(after[0] - pressed - lead_in_s)
    transit_down: list[float] = []
    for sent in report["answers_sent_at"]:
        got = [t for t, f in playout.frames if t >= sent and int(np.abs(f).max(initial=0)) >= ONSET_PEAK]
        if got:
            transit_down.append(got[0] - sent)

    capture = list(link.capture_latencies_s)
    playout_s = list(link.playout_latencies_s)
    press = list(link.press_to_live_s)
    columns = ["figure", "n", "p50 ms", "p95 ms", "max ms"]
    kiosk_added = BenchSection(
        title="Link: kiosk-added latency",
        columns=columns,
        rows=[_ms_row("capture path (device thread stamp -> handed to LiveKit)", capture),
              _ms_row("playout path (received -> written to the playout sink)", playout_s),
              _ms_row("pre-warm press -> first frame handed to LiveKit", press)],
        targets=[TargetCheck("capture path p95", _p95(capture) * 1000, "<= 30 ms", _p95(capture) <= 0.030),
                 TargetCheck("playout path p95 (link part)", _p95(playout_s) * 1000, "<= 60 ms",
                             _p95(playout_s) <= 0.060),
                 TargetCheck("pre-warm press to mic live p95", _p95(press) * 1000, "<= 100 ms",
                             _p95(press) <= 0.100)],
        notes=["Capture frames are stamped in a thread standing in for the device callback and handed over with "
               "call_soon_threadsafe, as the audio engine does; the engine's own processing (AEC, VAD) is "
               "measured in the audio sections. The engine passes its stamp as push_frame(pcm, captured_at=...).",
               "The playout path ends when the frame is in the playout buffer; the device's buffer (audio "
               "engine, see the audio sections) adds its own part."],
    )
    sessions = BenchSection(
        title="Link: sessions on the local stack",
        columns=columns,
        rows=[_ms_row("cold session (API + connect + agent audio ready)", cold),
              _ms_row("  session API (catalog check + session)", api_part),
              _ms_row("  rtc connect (signalling + WebRTC)", connect_part),
              _ms_row("  publish + agent's audio track subscribed", agent_part),
              _ms_row("pre-warm press -> visitor audio heard by the agent (end to end)", mic_live),
              _ms_row("agent audio sent -> received by the kiosk (WebRTC transit)", transit_down),
              _ms_row("visitor stopped -> first agent audio (stand-in agent: 500 ms end of turn + TTS)",
                      to_first_audio)],
        targets=[TargetCheck("cold session p95", _p95(cold), "<= 1.5 s", _p95(cold) <= 1.5)],
        notes=["Local stack: livekit-server and the stand-in agent in a private network namespace on this "
               "machine; a real deployment adds the network round trips and the model's own latency.",
               "End-to-end rows use the stand-in agent's clock (the same monotonic clock) and include the "
               "WebRTC jitter buffers; they are context for the kiosk-added figures above."],
    )
    return [kiosk_added, sessions]


async def _device_thread_feed(link: Any, pcm: Any) -> None:
    """Feed 10 ms frames the way a PortAudio callback does: from its own thread, stamped at capture.

    The thread hands each frame over with ``call_soon_threadsafe`` (stamp = the loop's clock, monotonic), so
    the capture-path figure includes the hand-over into the loop and the loop's scheduling under load.
    """
    import threading
    import time

    loop = asyncio.get_running_loop()
    done = loop.create_future()
    frames = [pcm[i * 160:(i + 1) * 160] for i in range(pcm.size // 160)]

    def device() -> None:
        # Stands in for the audio device's callback thread: it only stamps and hands over.
        start = time.monotonic()
        for i, frame in enumerate(frames):
            delay = start + (i + 1) * 0.01 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            loop.call_soon_threadsafe(link.push_frame, frame, time.monotonic())
        loop.call_soon_threadsafe(done.set_result, None)

    thread = threading.Thread(target=device, name="bench-device", daemon=True)
    thread.start()
    await done


def render_section(sections: Sequence[BenchSection], *, command: str, when: dt.datetime) -> str:
    """The ``## Link`` section: where the figures come from, then the tables."""
    from kiosk_dev.bench.report import machine_description

    m = machine_description()
    lines = [SECTION_HEADING, "",
             f"Measured {when.strftime('%Y-%m-%d %H:%M UTC')} with `{command}` on {m.get('cpu', '?')}, "
             f"{m.get('cores', '?')} cores, {m.get('os', '?')}, Python {m.get('python', '?')}.", ""]
    return "\n".join(lines) + "\n" + "\n".join(s.to_markdown() for s in sections)


def write_section(path: Path, section: str) -> None:
    """Replace the ``## Link`` section of ``path`` (up to the next ``## `` heading), or append it."""
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION_HEADING), None)
    if start is None:
        new = text + ("\n" if text and not text.endswith("\n\n") else "") + section
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        new = "".join(lines[:start]) + section + ("\n" if end < len(lines) else "") + "".join(lines[end:])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(new)
