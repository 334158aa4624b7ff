"""The field bench's kiosk process: loop callbacks that use the CPU are named in its trace; waiting is not."""

from __future__ import annotations

import asyncio
import json
import os
import time

from kiosk_dev.kiosk_process import SLOW_CALLBACK_CPU_MS, Trace, _timed_callbacks


async def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


async def _rest() -> None:
    await asyncio.sleep(0.05)


async def test_a_callback_that_uses_the_cpu_is_reported_with_its_coroutine() -> None:
    read_fd, write_fd = os.pipe()
    trace = Trace(write_fd, asyncio.get_running_loop())
    with _timed_callbacks(trace):
        await asyncio.create_task(_burn(3 * SLOW_CALLBACK_CPU_MS / 1000))
        await asyncio.create_task(_rest())
        await asyncio.sleep(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as lines:
        slow = [json.loads(line) for line in lines if '"slow"' in line]
    assert [record["what"] for record in slow] == ["_burn"]
    assert slow[0]["ms"] >= 3 * SLOW_CALLBACK_CPU_MS * 0.9
    assert asyncio.Handle._run is not None and asyncio.Handle._run.__name__ == "_run"  # put back


async def _outer() -> None:
    await _inner()


async def _inner() -> None:
    await _burn(3 * SLOW_CALLBACK_CPU_MS / 1000)
    await asyncio.sleep(0.05)


async def test_the_report_names_where_the_task_then_waited() -> None:
    read_fd, write_fd = os.pipe()
    trace = Trace(write_fd, asyncio.get_running_loop())
    with _timed_callbacks(trace):
        await asyncio.create_task(_outer())
    os.close(write_fd)
    with os.fdopen(read_fd) as lines:
        slow = [json.loads(line)["what"] for line in lines if '"slow"' in line]
    assert len(slow) == 1 and slow[0].startswith("_outer (then waiting in _inner:"), slow
