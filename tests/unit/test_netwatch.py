"""The kernel's news of the network coming back (rtnetlink): parsed, fuzzed, and heard in a private namespace."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiosk.fallback.netwatch import IFF_RUNNING, IFF_UP, RTM_NEWADDR, RTM_NEWLINK, comings_up

RTM_DELLINK = 17
RTM_DELADDR = 21


def message(kind: int, body: bytes = b"") -> bytes:
    length = 16 + len(body)
    padded = body + b"\0" * (-length % 4)
    return struct.pack("=IHHII", length, kind, 0, 0, 0) + padded


def link(flags: int) -> bytes:
    return message(RTM_NEWLINK, struct.pack("=BxHiII", 0, 1, 2, flags, 0xFFFFFFFF))


def test_only_what_came_up_counts() -> None:
    assert comings_up(link(IFF_UP | IFF_RUNNING)) == 1
    assert comings_up(link(IFF_UP)) == 0  # up, but no carrier yet
    assert comings_up(link(0)) == 0  # went down
    assert comings_up(message(RTM_NEWADDR, b"\0" * 8)) == 1
    assert comings_up(message(RTM_DELADDR, b"\0" * 8) + message(RTM_DELLINK, b"\0" * 16)) == 0
    # Several messages in one datagram, each 4-byte aligned.
    assert comings_up(message(RTM_NEWADDR, b"\0" * 5) + link(IFF_UP | IFF_RUNNING) + message(RTM_NEWADDR)) == 3


def test_a_truncated_or_lying_datagram_ends_the_count() -> None:
    whole = link(IFF_UP | IFF_RUNNING) + message(RTM_NEWADDR)
    assert comings_up(whole[:-4]) == 1  # the second message is cut short
    assert comings_up(struct.pack("=IHHII", 4, RTM_NEWADDR, 0, 0, 0)) == 0  # a length shorter than its header
    assert comings_up(message(RTM_NEWLINK, b"\0" * 4)) == 0  # a link message too short for its flags


@settings(max_examples=400, deadline=None, derandomize=True)
@given(st.binary(max_size=200), st.lists(st.sampled_from([link(IFF_UP | IFF_RUNNING), message(RTM_NEWADDR)]),
                                         max_size=3))
def test_any_datagram_is_counted_without_an_error(noise: bytes, good: list[bytes]) -> None:
    count = comings_up(b"".join(good) + noise)
    assert len(good) <= count <= len(good) + len(noise) // 16


_IN_A_NAMESPACE = textwrap.dedent("""
    import asyncio, random, subprocess, time
    from kiosk.fallback.netwatch import NetworkWatch
    from kiosk.events import RefusalReason
    from kiosk.fallback.offline import Probe
    from kiosk.link.backoff import Backoff

    async def main():
        watch = NetworkWatch()
        assert watch.start()
        checks = []

        async def check():
            checks.append(time.monotonic())
            return None if len(checks) > 1 else RefusalReason.UNREACHABLE

        class Longest(random.Random):
            def uniform(self, a, b):
                return b

        # The probe asks after 0.1 s, is refused, then waits 30 s; the network comes up 1 s into that wait.
        backoff = Backoff(base_seconds=0.1, max_seconds=30.0, factor=300.0, rng=Longest())
        probe = Probe(check, lambda event: None, backoff, sleep=watch.sleep)
        quiet = await watch.sleep(0.3)
        task = asyncio.create_task(probe.run())
        await asyncio.sleep(1.0)
        assert len(checks) == 1
        up = time.monotonic()
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        await asyncio.wait_for(task, 90)
        watch.close()
        print(f"quiet={quiet} changes={watch.changes} asked_after={checks[-1] - up:.3f} checks={len(checks)}")

    asyncio.run(main())
""")


@pytest.mark.skipif(shutil.which("unshare") is None or shutil.which("ip") is None, reason="needs unshare and ip")
def test_the_probe_asks_as_soon_as_the_network_comes_up() -> None:
    """In a private network namespace: the loopback link coming up wakes a probe that would sleep 30 s."""
    done = subprocess.run(["unshare", "-n", sys.executable, "-c", _IN_A_NAMESPACE], capture_output=True, text=True,
                          timeout=120)
    if done.returncode != 0 and "unshare failed" in done.stderr:
        pytest.skip(f"no private network namespace here (needs root): {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    figures = dict(part.split("=") for part in done.stdout.split())
    assert figures["quiet"] == "False"  # nothing came up while nothing changed
    assert int(figures["changes"]) >= 1
    # Without the news the second check would come 30 s (the backoff) after the first.
    assert float(figures["asked_after"]) < 10.0, figures
