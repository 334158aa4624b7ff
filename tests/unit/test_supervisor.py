"""The field bench's supervisor: systemd/kiosk.service read as systemd reads it, and real processes restarted,
watched and given up on as the unit says (the child speaks sd_notify with the kiosk's own ``kiosk.health``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiosk_dev.supervisor import ServiceUnit, Supervisor, UnitError, parse_timespan, parse_unit

ROOT = Path(__file__).resolve().parents[2]

# A child that says READY=1 and then pings the watchdog (or not), as the kiosk's health module does.
CHILD = """
import os, sys, time
from kiosk.health import Notifier
notifier = Notifier.from_environment()
mode = sys.argv[1]
if mode == "exit":
    sys.exit(1)
if mode != "never_ready":
    notifier.ready("idle")
while True:
    if mode == "healthy":
        notifier.watchdog()
    time.sleep(0.05)
"""


def test_the_kiosk_unit_is_read_as_systemd_reads_it(tmp_path: Path) -> None:
    unit = ServiceUnit.from_file(ROOT / "systemd" / "kiosk.service", runtime_dir=tmp_path)
    assert unit.notify and unit.restart == "always" and unit.restart_seconds == 0.2
    assert (unit.start_limit_interval_seconds, unit.start_limit_burst) == (600.0, 10)
    assert unit.watchdog_seconds == 10.0 and unit.timeout_start_seconds == 60.0 and unit.timeout_stop_seconds == 15.0
    assert unit.nice == -5
    assert unit.environment["PYTHONFAULTHANDLER"] == "1" and unit.environment["LG_WD"] == f"{tmp_path}/kiosk"
    assert unit.restarts_after("signal") and unit.restarts_after("clean")


def test_time_spans_and_unit_errors() -> None:
    assert parse_timespan("3s") == 3.0 and parse_timespan("10min") == 600.0 and parse_timespan("90") == 90.0
    assert parse_timespan("1min 30s") == 90.0 and parse_timespan("500ms") == 0.5
    for bad in ("3 parsecs", "soon", "3s later"):
        with pytest.raises(UnitError, match="time span"):
            parse_timespan(bad)
    with pytest.raises(UnitError, match="line 1"):
        parse_unit("Restart=always\n")
    assert parse_unit("[Service]\nEnvironment=A=1\nEnvironment=\nEnvironment=B=2\n") == {"Service": {"Environment":
                                                                                                     ["B=2"]}}
    with pytest.raises(UnitError, match="restart policy"):
        ServiceUnit.from_text("[Service]\nRestart=sometimes\n")


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.text(max_size=200))
def test_any_unit_text_parses_or_says_why(text: str) -> None:
    with contextlib.suppress(UnitError):
        ServiceUnit.from_text(text)
    with contextlib.suppress(UnitError):
        assert parse_timespan(text) >= 0


def _supervisor(tmp_path: Path, mode: str, **unit: object) -> Supervisor:
    fields: dict[str, object] = {"notify": True, "restart": "always", "restart_seconds": 0.1,
                                 "start_limit_interval_seconds": 60.0, "start_limit_burst": 5,
                                 "timeout_start_seconds": 20.0, "timeout_stop_seconds": 2.0}
    fields.update(unit)
    log = (tmp_path / "service.log").open("ab")
    return Supervisor(ServiceUnit(**fields), [sys.executable, "-c", CHILD, mode],  # type: ignore[arg-type]
                      env=dict(os.environ), runtime_dir=tmp_path / "run", log=log)


async def test_a_killed_service_is_restarted_and_its_end_is_marked_planned(tmp_path: Path) -> None:
    supervisor = _supervisor(tmp_path, "healthy", watchdog_seconds=2.0)
    await supervisor.start()
    assert await supervisor.wait_ready(20)
    first = supervisor.pid
    assert supervisor.kill() == first
    for _ in range(200):
        if len(supervisor.incarnations) == 2 and supervisor.ready:
            break
        await asyncio.sleep(0.05)
    assert len(supervisor.incarnations) == 2 and supervisor.ready and supervisor.pid != first
    killed = supervisor.incarnations[0]
    assert killed.planned and killed.cause == "signal" and killed.returncode == -signal.SIGKILL
    await asyncio.sleep(2.5)  # longer than WatchdogSec: the pings keep it alive
    assert len(supervisor.incarnations) == 2
    await supervisor.stop()
    last = supervisor.incarnations[-1]
    assert last.planned and last.cause in ("signal", "clean"), last


async def test_a_missed_watchdog_ping_aborts_and_restarts(tmp_path: Path) -> None:
    supervisor = _supervisor(tmp_path, "ready_only", watchdog_seconds=0.5)
    await supervisor.start()
    for _ in range(300):
        if len(supervisor.incarnations) >= 2:
            break
        await asyncio.sleep(0.05)
    await supervisor.stop()
    first = supervisor.incarnations[0]
    assert first.cause == "watchdog" and not first.planned and first.returncode == -signal.SIGABRT, first


async def test_no_ready_within_the_start_timeout_fails_the_start(tmp_path: Path) -> None:
    supervisor = _supervisor(tmp_path, "never_ready", timeout_start_seconds=0.5, restart="no")
    await supervisor.start()
    assert not await supervisor.wait_ready(10)  # returns once the unit gave up, not after the whole wait
    await supervisor.stop()
    assert [i.cause for i in supervisor.incarnations] == ["timeout"]


async def test_a_crash_loop_hits_the_start_limit(tmp_path: Path) -> None:
    supervisor = _supervisor(tmp_path, "exit", start_limit_burst=3)
    await supervisor.start()
    assert not await supervisor.wait_ready(20)
    await supervisor.stop()
    assert supervisor.failed and len(supervisor.incarnations) == 3
    assert all(i.cause == "exit-code" and not i.planned for i in supervisor.incarnations)
    assert "ended: exit-code (exit status 1)" in (tmp_path / "service.log").read_text()
