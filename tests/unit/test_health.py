"""kiosk.health: sd_notify over a real unix datagram socket; the watchdog pings only while healthy."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kiosk.health import HealthReport, HealthWatchdog, Notifier, progress_check


class Manager:
    """A stand-in service manager: a bound unix datagram socket, as systemd's notify socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def messages(self) -> list[dict[str, str]]:
        """Every datagram received so far, parsed into KEY=value fields."""
        out = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return out
            out.append(dict(line.split("=", 1) for line in data.decode().split("\n")))


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[Manager]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    yield Manager(sock)
    sock.close()


def test_messages_arrive_as_sd_notify_datagrams(manager: Manager) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": manager.sock.getsockname()})
    assert notifier.enabled
    assert notifier.ready("idle, 2 devices open")
    assert notifier.status("line one\nline two")
    assert notifier.watchdog()
    assert notifier.extend_timeout(2.5)
    assert notifier.stopping()
    assert manager.messages() == [
        {"READY": "1", "STATUS": "idle, 2 devices open"},
        {"STATUS": "line one line two"},  # a newline would have started a bogus assignment
        {"WATCHDOG": "1"},
        {"EXTEND_TIMEOUT_USEC": "2500000"},
        {"STOPPING": "1"},
    ]
    notifier.close()


def test_abstract_socket_address() -> None:
    name = f"kiosk-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(2)
    try:
        assert Notifier.from_environment({"NOTIFY_SOCKET": "@" + name}).ready()
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()


def test_without_a_service_manager_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environment({})
    assert not notifier.enabled
    assert notifier.watchdog_seconds is None
    assert not notifier.ready() and not notifier.watchdog()


def test_a_vanished_socket_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = Notifier(str(tmp_path / "gone"))
    assert notifier.enabled and not notifier.watchdog()


def test_watchdog_usec_and_pid() -> None:
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "10000000"}
    assert Notifier.from_environment(env).watchdog_seconds == 10.0
    assert Notifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_seconds == 10.0
    # The watchdog was armed for another process (e.g. a parent that exec'd a helper): not ours.
    assert Notifier.from_environment({**env, "WATCHDOG_PID": "1"}).watchdog_seconds is None
    # Pings every half period, as sd_watchdog_enabled(3) advises.
    assert HealthWatchdog(Notifier.from_environment(env), []).interval_seconds == 5.0


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_pings_only_while_every_check_passes(manager: Manager) -> None:
    clock = Clock()
    frames = [0]
    ticks = [0]
    notifier = Notifier(manager.sock.getsockname(), watchdog_usec=4_000_000)
    watchdog = HealthWatchdog(notifier, [
        progress_check("capture", lambda: frames[0], max_stall_seconds=2.0, now=clock),
        progress_check("controller", lambda: ticks[0], max_stall_seconds=2.0, now=clock),
    ])
    pinged = []
    # 0-3 s: both advance. 3-6 s: capture stalls (a PortAudio thread stuck in ALSA). 6-8 s: it recovers.
    for step in range(17):
        clock.t = 100.0 + step * 0.5
        ticks[0] += 1
        if not 3.0 <= step * 0.5 < 6.0:
            frames[0] += 16
        report = watchdog.step()
        got = manager.messages()
        pinged.append(any(m.get("WATCHDOG") == "1" for m in got))
        assert report.ok == pinged[-1]
    # Frames last moved at 2.5 s; beyond 2 s of stall (from 5.0 s on) the pings stop, until 6.0 s.
    assert pinged == [True] * 10 + [False] * 2 + [True] * 5
    assert watchdog.pings == 15


def test_a_lost_device_the_kiosk_handles_is_no_reason_to_stop_pinging() -> None:
    """Field bench: with the array out and no headset, the capture check withheld the pings and systemd aborted
    the kiosk every 13 s. A lost device is a state the kiosk shows and keeps reopening; a deaf engine that
    believes its device works still fails the check."""
    clock = Clock()
    lost = [False]
    check = progress_check("capture", lambda: 0, max_stall_seconds=2.0, now=clock, excused=lambda: lost[0])
    assert check()[0]
    lost[0] = True
    for _ in range(10):  # 30 s with the device gone: pings go on
        clock.t += 3.0
        assert check() == (True, "capture not expected (excused)")
    lost[0] = False  # reopened: frames are expected again, the clock starts now
    clock.t += 1.5
    assert check()[0]
    clock.t += 1.0
    assert check() == (False, "capture stalled for 2.5 s (limit 2 s)")


def test_status_names_the_stalled_part(manager: Manager) -> None:
    clock = Clock()
    watchdog = HealthWatchdog(Notifier(manager.sock.getsockname()), [
        progress_check("capture", lambda: 0, max_stall_seconds=2.0, now=clock),
        lambda: (True, "controller ok"),
    ], interval_seconds=1.0)
    watchdog.step()
    clock.t += 2.5
    report = watchdog.step()
    assert not report.ok and report.problems == ["capture stalled for 2.5 s (limit 2 s)"]
    messages = manager.messages()
    assert {"WATCHDOG": "1"} in messages
    assert messages[-1] == {"STATUS": "unhealthy: capture stalled for 2.5 s (limit 2 s)"}


def test_a_raising_check_counts_as_unhealthy(manager: Manager) -> None:
    def broken() -> tuple[bool, str]:
        raise RuntimeError("no engine")

    watchdog = HealthWatchdog(Notifier(manager.sock.getsockname()), [broken], interval_seconds=1.0)
    report = watchdog.step()
    assert not report.ok and "no engine" in report.problems[0]
    assert not any("WATCHDOG" in m for m in manager.messages())


async def test_run_pings_on_the_loop_and_stops(manager: Manager) -> None:
    loop = asyncio.get_running_loop()
    ticks = [0]

    async def controller() -> None:
        while True:
            ticks[0] += 1
            await asyncio.sleep(0.005)

    task = asyncio.create_task(controller())
    three_pings = asyncio.Event()

    class Watched(HealthWatchdog):
        def step(self) -> HealthReport:
            report = super().step()
            if self.pings >= 3:
                three_pings.set()
            return report

    watchdog = Watched(Notifier(manager.sock.getsockname()), [
        progress_check("controller", lambda: ticks[0], max_stall_seconds=0.5, now=loop.time),
    ], interval_seconds=0.02)
    runner = asyncio.create_task(watchdog.run())
    await asyncio.wait_for(three_pings.wait(), 5.0)
    await watchdog.aclose()
    await asyncio.wait_for(runner, 1.0)
    task.cancel()
    pings = [m for m in manager.messages() if m.get("WATCHDOG") == "1"]
    assert len(pings) == watchdog.pings >= 3
