"""After a barge-in, what of the agent's audio is the answer being cut short (dropped) and what is a new answer."""

from __future__ import annotations

from kiosk.link.livekit import INTERRUPT_QUIET_SECONDS, LiveKitRoomLink
from kiosk.settings import Settings
from kiosk_dev.stack import MemoryPlayout

FRAME = 0.01


def _frames(start: float, stop: float) -> list[float]:
    return [start + FRAME * k for k in range(round((stop - start) / FRAME))]


async def test_the_cut_answer_is_dropped_until_quiet_then_a_new_answer_plays() -> None:
    now = [100.0]
    link = LiveKitRoomLink(Settings(), lambda event: None, MemoryPlayout(), clock=lambda: now[0])
    await link.interrupt_agent()  # no room: the call "fails" at once, as an agent without the method would
    # The jitter buffer lets 0.8 s of the old answer out at real-time pace, then concealment silence.
    assert all(link._still_cut(t, voiced=True) for t in _frames(100.0, 100.8))
    quiet = _frames(100.8, 100.8 + INTERRUPT_QUIET_SECONDS)
    assert all(link._still_cut(t, voiced=False) for t in quiet)
    # Quiet long enough after the last of it: whatever comes next is the agent's new answer.
    assert not link._still_cut(100.8 + INTERRUPT_QUIET_SECONDS, voiced=False)
    assert not link._still_cut(103.0, voiced=True)


async def test_nothing_plays_while_the_interrupt_is_on_its_way() -> None:
    now = [100.0]
    link = LiveKitRoomLink(Settings(), lambda event: None, MemoryPlayout(), clock=lambda: now[0])
    await link.interrupt_agent()
    link._cut_replied_at = None  # the agent has not answered yet (the RPC on its way)
    # However long the agent takes, and with pauses in its answer, none of it plays...
    assert all(link._still_cut(t, voiced=True) for t in _frames(100.0, 101.0))
    assert all(link._still_cut(t, voiced=False) for t in _frames(101.0, 102.0))
    # ...until it answered, and its audio was quiet for long enough since.
    link._cut_replied_at = 102.0
    assert link._still_cut(102.2, voiced=False)
    assert not link._still_cut(102.0 + INTERRUPT_QUIET_SECONDS, voiced=True)


async def test_frames_after_no_frames_at_all_are_a_new_answer() -> None:
    now = [100.0]
    link = LiveKitRoomLink(Settings(), lambda event: None, MemoryPlayout(), clock=lambda: now[0])
    await link.interrupt_agent()
    assert link._still_cut(100.2, voiced=True)
    # The stream yielded nothing for a while (the track quiet): the next voiced frame is not the old answer.
    assert not link._still_cut(100.2 + INTERRUPT_QUIET_SECONDS, voiced=True)
