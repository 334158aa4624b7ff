"""Memory a session leaves behind: ``kiosk bench sessions`` opens and closes sessions in one process.

On the local stack (``kiosk_dev.stack``) one process opens and closes ``count`` sessions, one way each run:

- ``link``: the kiosk's room link (``LinkHarness``): open, a question, the agent's answer, close;
- ``connect``: a bare ``rtc.Room`` connected for 2 s and left;
- ``publish``: the same with a microphone track published;
- ``subscribe``: the same, and the agent's audio received for 2 s through an ``rtc.AudioStream``.

After each close: a full garbage collection and glibc's ``malloc_trim(0)`` (memory freed but held by the
allocator is given back first), then resident memory from ``/proc``, threads, live FFI handles. The figure is
the least-squares slope of resident memory over the sessions after the first (which loads the SDK). With
``--tracemalloc`` it also prints where Python's heap grew between session 5 and the end (to tell Python
references from native memory). docs/field.md, "Memory", has the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import os
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from kiosk.recycle import resident_mib

if TYPE_CHECKING:
    from kiosk_dev.stack import LocalStack

MODES = ("link", "connect", "publish", "subscribe")
HOLD_SECONDS = 2.0


@dataclass
class SessionsResult:
    """One run's readings, one per closed session."""

    mode: str
    count: int
    resident_mib: list[float] = field(default_factory=list)
    threads: list[int] = field(default_factory=list)
    live_handles: list[int] = field(default_factory=list)
    seconds: float = 0.0
    python_growth: list[str] = field(default_factory=list)

    @property
    def kept_mib_per_session(self) -> float | None:
        """Slope of resident memory over the sessions after the first (None with fewer than three)."""
        import numpy as np

        values = self.resident_mib[1:]
        if len(values) < 2:
            return None
        return float(np.polyfit(np.arange(len(values)), np.asarray(values), 1)[0])


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def run(mode: str, count: int, *, trace: bool = False) -> SessionsResult:
    """Start the local stack and measure ``count`` sessions of ``mode``."""
    from kiosk_dev.stack import LocalStack

    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
    with LocalStack(agent_options={"linger_seconds": 1.0}) as stack:
        return asyncio.run(_measure(stack, mode, count, trace))


async def _measure(stack: LocalStack, mode: str, count: int, trace: bool) -> SessionsResult:
    from livekit.rtc import _ffi_client

    libc = ctypes.CDLL("libc.so.6")
    result = SessionsResult(mode, count)
    one = await _session_maker(stack, mode)
    started = time.monotonic()
    snapshot = None
    if trace:
        tracemalloc.start(10)
    for number in range(count):
        await one()
        await asyncio.sleep(0.3)
        gc.collect()
        libc.malloc_trim(0)
        result.resident_mib.append(round(resident_mib() or 0.0, 2))
        result.threads.append(_threads())
        result.live_handles.append(len(_ffi_client._live_handles))
        print(f"{mode} {number + 1}/{count}: {result.resident_mib[-1]:.1f} MiB, {result.threads[-1]} threads, "
              f"{result.live_handles[-1]} live FFI handles", flush=True)
        if trace and number == 4:
            snapshot = tracemalloc.take_snapshot()
    if snapshot is not None:
        grown = tracemalloc.take_snapshot().compare_to(snapshot, "lineno")
        result.python_growth = [str(stat) for stat in grown[:10]]
        tracemalloc.stop()
    result.seconds = round(time.monotonic() - started, 1)
    return result


async def _session_maker(stack: LocalStack, mode: str) -> Callable[[], Awaitable[None]]:
    """A coroutine function that opens and closes one session of ``mode``."""
    from livekit import rtc

    from kiosk.events import AgentState
    from kiosk.link.session_api import SessionApi
    from kiosk.settings import Settings
    from kiosk_dev.speech import SENTENCES, espeak
    from kiosk_dev.stack import LinkHarness

    if mode == "link":
        harness = LinkHarness(stack)
        question = espeak(SENTENCES[0], "en-us")

        async def link_session() -> None:
            await harness.open()
            start = len(harness.events.events)
            await harness.ask(question)
            speaking = await harness.wait_state(AgentState.SPEAKING, start, within_seconds=30.0)
            await harness.wait_state(AgentState.LISTENING, speaking, within_seconds=60.0)
            await harness.link.close()
            harness.playout.frames.clear()  # the harness's own record of the answer is not the link's memory

        return link_session

    settings = Settings(session=stack.session_settings(), security={"allow_insecure_transport": True})
    api = SessionApi.from_settings(settings)

    async def bare_session() -> None:
        grant = await api.open_session()
        room = rtc.Room()
        subscribed: asyncio.Queue[rtc.Track] = asyncio.Queue()
        room.on("track_subscribed", lambda track, *_: subscribed.put_nowait(track))
        await room.connect(grant.livekit_url, grant.token.get_secret_value(),
                           rtc.RoomOptions(auto_subscribe=mode == "subscribe"))
        source = None
        try:
            if mode in ("publish", "subscribe"):
                source = rtc.AudioSource(16000, 1)
                track = rtc.LocalAudioTrack.create_audio_track("mic", source)
                await room.local_participant.publish_track(
                    track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE))
            if mode == "subscribe":
                stream = rtc.AudioStream(await asyncio.wait_for(subscribed.get(), 15.0), sample_rate=16000,
                                         num_channels=1)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(_drain(stream), HOLD_SECONDS)
                await stream.aclose()
            else:
                await asyncio.sleep(HOLD_SECONDS)
        finally:
            await room.disconnect()
            if source is not None:
                await source.aclose()

    return bare_session


async def _drain(stream: Any) -> None:
    async for _event in stream:
        pass


def render(result: SessionsResult) -> str:
    """The figures as text."""
    kept = result.kept_mib_per_session
    lines = [f"mode {result.mode}: {result.count} sessions in {result.seconds:.0f} s",
             f"resident memory {result.resident_mib[0]:.1f} -> {result.resident_mib[-1]:.1f} MiB; kept per session "
             f"(slope after the first): {'-' if kept is None else f'{kept:.2f}'} MiB",
             f"threads {min(result.threads)}-{max(result.threads)}; live FFI handles after each close: "
             f"{min(result.live_handles)}-{max(result.live_handles)}"]
    if result.python_growth:
        lines.append("Python heap growth since session 5 (tracemalloc, top 10):")
        lines.extend("  " + line for line in result.python_growth)
    return "\n".join(lines)


def to_json(result: SessionsResult) -> str:
    """The readings and the figure as JSON."""
    return json.dumps({**asdict(result), "kept_mib_per_session": result.kept_mib_per_session}, indent=2)

